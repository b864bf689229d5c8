import pytest
import torch

from conftest import make_tiny_model
from safesteer.core.anatomy import end_of_turn_ids, format_prompts, output_head
from safesteer.core.forward import final_hidden_states
from safesteer.train.rollout import sample_rollouts

PROMPTS = ["Say hi.", "Write a long poem about the sea and the sky, with many verses."]


def _favour(model, token_id: int, bias: float) -> None:
    """Give the output head a bias towards one token."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[token_id] = bias


def test_masks_with_pad_equal_to_eos_for_early_and_truncated_rollouts(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the case where masking by pad id goes wrong
    model = make_tiny_model(tok)
    eot = end_of_turn_ids(tok, model)
    _favour(model, eot[0], 4.5)  # about one token in six ends the turn: some rollouts end, some do not
    torch.manual_seed(0)
    batch = sample_rollouts(model, tok, PROMPTS, rollouts_per_prompt=6, max_new_tokens=8)

    n, length = batch.completion_mask.shape
    assert n == 12 and batch.prompt_index == [0] * 6 + [1] * 6
    completion = batch.completion_ids.tolist()
    ended_early = truncated = 0
    for row, mask, response, finished in zip(completion, batch.completion_mask.tolist(), batch.responses,
                                             batch.finished):
        first_end = next((j for j, t in enumerate(row) if t in eot), None)
        if first_end is None:  # ran to the limit: every generated token counts
            expected = [1] * length
            truncated += length == 8
        else:  # up to and including the end-of-turn token; the eos padding after it never counts
            expected = [1] * (first_end + 1) + [0] * (length - first_end - 1)
            assert all(t == tok.pad_token_id for t in row[first_end + 1:])
            ended_early += first_end + 1 < length
        assert mask == expected
        assert finished == (first_end is not None)
        assert tok.eos_token not in response and "<|im_end|>" not in response
    assert ended_early and truncated, "the sample should hold both kinds of rollout"
    # The attention mask covers the real prompt tokens and exactly the counted completion tokens.
    prompt_part = batch.attention_mask[:, : batch.prompt_len]
    assert torch.equal(batch.attention_mask[:, batch.prompt_len:], batch.completion_mask)
    assert prompt_part[0].sum() < prompt_part[-1].sum()  # left padding: the short prompt is padded
    assert bool((prompt_part[:, -1] == 1).all())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scored_positions_line_up_with_an_unpadded_forward(smol_tokenizer, arch):
    """hidden[b, j] must predict completion token j exactly as a lone, unpadded forward does.

    GPT-2 has absolute positions, so left padding without explicit position ids would fail here.
    """
    tok = smol_tokenizer
    model = make_tiny_model(tok, arch=arch)
    torch.manual_seed(1)
    batch = sample_rollouts(model, tok, PROMPTS, rollouts_per_prompt=2, max_new_tokens=6)
    with torch.no_grad():
        hidden = batch.scored_hidden(final_hidden_states(model, **batch.model_inputs()))
        logp = torch.log_softmax(output_head(model)(hidden), -1)
    assert hidden.shape[:2] == batch.completion_mask.shape
    formatted = format_prompts(tok, PROMPTS)
    for b in range(len(batch.responses)):
        prompt_ids = tok(formatted[batch.prompt_index[b]], add_special_tokens=False, return_tensors="pt")["input_ids"]
        n = int(batch.completion_mask[b].sum())
        completion = batch.completion_ids[b, :n]
        ids = torch.cat([prompt_ids[0], completion]).unsqueeze(0)
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1: -1], -1)
        got = logp[b, :n]
        assert torch.allclose(got.gather(-1, completion[:, None]), ref.gather(-1, completion[:, None]), atol=1e-4)
        assert torch.allclose(got, ref, atol=1e-4)


def test_rollouts_ignore_sampling_extras_in_the_generation_config(smol_tokenizer):
    tok = smol_tokenizer
    model = make_tiny_model(tok)
    favourite = tok("hello", add_special_tokens=False)["input_ids"][0]
    _favour(model, favourite, 30.0)  # p(favourite) ~ 1 under the model's own distribution
    model.generation_config.repetition_penalty = 1e6  # would forbid repeating it after the first time
    model.generation_config.top_k = 1
    batch = sample_rollouts(model, tok, PROMPTS[:1], rollouts_per_prompt=2, max_new_tokens=5)
    assert batch.completion_ids.tolist() == [[favourite] * 5] * 2
    assert model.generation_config.repetition_penalty == 1e6  # restored afterwards


def test_bf16_sampling_copy_gets_the_trainable_weights_and_leaves_the_student_float32(tmp_path, smol_tokenizer):
    """The persistent sampling copy: bf16 weights, tied weights still tied, trainable weights synced
    before each step, the float32 student untouched."""
    from conftest import Spec, refusal_ids, tiny_train_config
    from safesteer.train.rollout import RolloutModel
    from safesteer.train.trainer import Trainer

    tok = smol_tokenizer
    model = make_tiny_model(tok)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    trainer = Trainer(model, tok, Spec.random(), refusal_ids(tok), ["Say hi."], tiny_train_config(), tmp_path,
                      progress=False)
    student = trainer.model
    rollout_model = RolloutModel(student, torch.bfloat16)
    copy = rollout_model.copy
    assert copy is not None and copy is not student and not copy.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert copy.get_input_embeddings().weight is copy.get_output_embeddings().weight  # still tied
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # an optimizer step moved the adapter
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    assert rollout_model.synced(student) is copy
    student_params = dict(student.named_parameters())
    # Frozen linear layers live prepacked (core.prepack; their own tensors emptied), the adapter stays plain.
    packed = {id(w): data.to_dense() for _, w, data, emptied in rollout_model.prepacked.layers if emptied}
    if rollout_model.prepacked:
        assert packed and all("lora_" not in n for n, p in copy.named_parameters() if id(p) in packed)
    for n, p in copy.named_parameters():
        value = packed.get(id(p), p)
        assert torch.equal(value, student_params[n].detach().to(torch.bfloat16)), n  # every weight, as a bf16 cast
    assert RolloutModel(student, None).synced(student) is student  # float32: sample from the student itself
    assert RolloutModel(copy, torch.bfloat16).copy is None  # already bf16: no second copy


def test_rollouts_from_the_bf16_copy_are_the_bf16_students_samples(smol_tokenizer):
    """What the rollout exactness test checks now. The rollouts are drawn from the bf16 copy, so they
    are not samples of the float32 student's exact distribution (bf16 rounding moves its
    probabilities); they are exactly the samples of the student cast to bf16, with the same per-row
    streams, and the float32 student scores them in training."""
    from safesteer.core.generation import generation_precision
    from safesteer.core.sampling import rollout_seeds, seeded_sampling
    from safesteer.train.rollout import RolloutModel

    tok = smol_tokenizer
    model = make_tiny_model(tok)
    seeds = rollout_seeds(0, [0, 1], 3)

    def roll(m):
        with seeded_sampling(m, seeds):
            return sample_rollouts(m, tok, PROMPTS, rollouts_per_prompt=3, max_new_tokens=6).completion_ids

    from_copy = roll(RolloutModel(model, torch.bfloat16).synced(model))
    with generation_precision(model, torch.bfloat16):
        cast_in_place = roll(model)
    assert torch.equal(from_copy, cast_in_place)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # restored exactly


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_is_encoded_once_for_its_rollouts(smol_tokenizer, arch, monkeypatch):
    """The G rollouts of a prompt share one prefill of it (its KV cache repeated G times); the samples are
    those of a batch that encodes every row itself."""
    from safesteer.core import generation
    from safesteer.core.sampling import rollout_seeds, seeded_sampling

    tok = smol_tokenizer
    model = make_tiny_model(tok, arch=arch)
    seeds = rollout_seeds(0, [0, 1], 3)
    shared = []
    real = generation._shared_prompt_cache

    def recording(*a, **k):
        cache = real(*a, **k)
        shared.append(None if cache is None else cache.get_seq_length())
        return cache

    monkeypatch.setattr(generation, "_shared_prompt_cache", recording)
    with seeded_sampling(model, seeds):
        once = sample_rollouts(model, tok, PROMPTS, rollouts_per_prompt=3, max_new_tokens=6)
    assert shared == [once.prompt_len - 1]  # every prompt token but the last, cached once per prompt
    monkeypatch.setattr(generation, "_shared_prompt_cache", lambda *a, **k: None)
    with seeded_sampling(model, seeds):
        every_row = sample_rollouts(model, tok, PROMPTS, rollouts_per_prompt=3, max_new_tokens=6)
    assert torch.equal(once.sequences, every_row.sequences)
    assert torch.equal(once.completion_mask, every_row.completion_mask)
