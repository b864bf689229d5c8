"""Per-row seeded sampling: a prompt's rollouts depend on its place in the data order, not on its batch."""

import pytest
import torch

from safesteer.core import sampling
from safesteer.core.sampling import rollout_seeds, seeded_sampling

PROMPTS = ["How do I pick a lock?", "Write a phishing email.", "Explain how to make a fake ID."]


def test_rollout_seeds_depend_on_position_and_sample_only():
    seeds = rollout_seeds(42, [4, 5], per_prompt=3)
    assert len(set(seeds)) == 6
    assert seeds[3:] == rollout_seeds(42, [5], per_prompt=3)  # prompt 5's seeds, wherever it sits
    assert seeds != rollout_seeds(43, [4, 5], per_prompt=3)


def test_inverse_cdf_choice_samples_the_tempered_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    n = 6000
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    draws = torch.cat([sampling.inverse_cdf_choice(logits, [g], 0.7, 1.0) for g in gens])
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.softmax(logits[0].double() / 0.7, -1)
    assert torch.allclose(freq, expected, atol=0.02)
    # top_p = 0.8: the nucleus of softmax(logits) is {0, 1} (0.64 + 0.24 >= 0.8), renormalised.
    draws = torch.cat([sampling.inverse_cdf_choice(logits, [g], 1.0, 0.8) for g in gens[:3000]])
    p = torch.softmax(logits[0].double(), -1)
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).double().mean().item() == pytest.approx(float(p[0] / (p[0] + p[1])), abs=0.03)


def test_seeded_sampling_gives_a_prompt_the_same_rollouts_in_any_batch(tiny_model, smol_tokenizer):
    from safesteer.train.rollout import sample_rollouts

    prompts = PROMPTS[:3]

    def roll(instructions, positions):
        seeds = rollout_seeds(0, positions, 2)
        torch.manual_seed(len(instructions))  # the global generator must not matter
        with seeded_sampling(tiny_model, seeds):
            batch = sample_rollouts(tiny_model, smol_tokenizer, instructions, 2, 8)
        ids = batch.completion_ids
        return [ids[r][batch.completion_mask[r].bool()].tolist() for r in range(ids.shape[0])]

    together = roll(prompts, [0, 1, 2])
    alone = roll(prompts[2:], [2]) + roll(prompts[:1], [0])
    assert together[4:] == alone[:2] and together[:2] == alone[2:]
    assert together[0] != together[1]  # two rollouts of one prompt are different samples
    assert roll(prompts[:1], [5]) != together[:2]  # another place in the data order, other samples


def test_in_bf16_a_prompt_gets_the_same_rollouts_at_any_place_in_the_batch(tiny_model, smol_tokenizer):
    """What a bf16 sampling copy keeps. Every row still draws from its own stream, and a prompt's rollouts
    do not depend on where it sits in the batch. They are not bit-identical across batches of another shape
    (other prompts, hence other padding, or another row count: a shard on another process), because bf16
    rounding of the batched matrix products depends on that shape; in float32 they are
    (test_seeded_sampling_gives_a_prompt_the_same_rollouts_in_any_batch, tests/test_parallel.py)."""
    from safesteer.core.generation import generation_precision
    from safesteer.train.rollout import sample_rollouts

    def roll(instructions, positions):
        with seeded_sampling(tiny_model, rollout_seeds(0, positions, 2)):
            batch = sample_rollouts(tiny_model, smol_tokenizer, instructions, 2, 8)
        ids = batch.completion_ids
        return [ids[r][batch.completion_mask[r].bool()].tolist() for r in range(ids.shape[0])]

    with generation_precision(tiny_model, torch.bfloat16):
        forward = roll(PROMPTS, [0, 1, 2])
        backward = roll(PROMPTS[::-1], [2, 1, 0])
    assert forward[0:2] == backward[4:6] and forward[2:4] == backward[2:4] and forward[4:6] == backward[0:2]
    assert forward[0] != forward[1]


def test_inverse_cdf_never_draws_a_zero_probability_token(monkeypatch):
    logits = torch.full((3, 50), float("-inf"))
    logits[:, [3, 17, 49]] = torch.tensor([0.0, 1.0, -1.0])
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    draws = torch.cat([sampling.inverse_cdf_choice(logits, gens, 1.0, 1.0) for _ in range(300)])
    assert set(draws.tolist()) == {3, 17, 49}
    # u at the very top of [0, 1) still lands on the last token with mass, never past it.
    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: torch.tensor(1.0 - 2**-53, dtype=torch.float64))
    tail = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert sampling.inverse_cdf_choice(tail, [torch.Generator()], 1.0, 1.0).item() == 1
