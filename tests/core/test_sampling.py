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


def test_gumbel_choice_samples_the_tempered_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    n = 6000
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    draws = torch.cat([sampling._gumbel_choice(logits, [g], 0.7, 1.0) for g in gens])
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.softmax(logits[0].double() / 0.7, -1)
    assert torch.allclose(freq, expected, atol=0.02)
    # top_p = 0.8: the nucleus of softmax(logits) is {0, 1} (0.64 + 0.24 >= 0.8), renormalised.
    draws = torch.cat([sampling._gumbel_choice(logits, [g], 1.0, 0.8) for g in gens[:3000]])
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
