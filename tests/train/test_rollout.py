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
