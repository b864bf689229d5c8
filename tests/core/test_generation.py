import json

import pytest
import torch

from safesteer.core.anatomy import end_of_turn_ids
from safesteer.errors import SafesteerError
from safesteer.core.generation import GenerationConfig, completion_mask, generate_responses
from safesteer.io.prompts import Prompt


def test_completion_mask_with_pad_equal_to_eos():
    eos = 2  # pad == eos: the first eos counts, the padding after it does not
    seqs = torch.tensor([
        [9, 9, 5, 6, eos, eos, eos],  # ends early, then padded with eos
        [9, 9, 5, 6, 7, 8, 4],        # runs to the limit, no eos
        [9, 9, eos, eos, eos, eos, eos],  # empty answer: just the end-of-turn token
    ])
    mask = completion_mask(seqs, prompt_len=2, eot_ids=[eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_completion_mask_with_several_end_tokens():
    seqs = torch.tensor([[1, 5, 7, 3, 3], [1, 5, 3, 7, 0]])
    assert completion_mask(seqs, 1, [3, 7]).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_generation_is_batch_invariant_and_resumable(tmp_path, tiny_model, smol_tokenizer):
    prompts = [Prompt(t) for t in ["Say hi.", "Write a long poem about the sea and the sky.", "Count to three.",
                                   "Name a colour."]]
    config = GenerationConfig(max_new_tokens=6, batch_size=4)
    out = tmp_path / "r.jsonl"
    rows, stats = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False)
    assert [r["prompt"] for r in rows] == [p.text for p in prompts]
    assert stats.generated == 4 and stats.new_tokens == sum(r["n_tokens"] for r in rows)
    # Left padding: the batched answers equal one-at-a-time answers.
    single, _ = generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=1),
                                   progress=False)
    assert [r["response"] for r in rows] == [r["response"] for r in single]
    # Resume: a rerun with the same settings generates nothing new.
    before = out.read_text()
    again, stats = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False)
    assert stats.generated == 0 and stats.new_tokens == 0
    assert out.read_text() == before and [r["response"] for r in again] == [r["response"] for r in rows]
    # A crash mid-file (torn last line) loses only that line.
    lines = before.splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    _, stats = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False)
    assert stats.generated == 2
    rows_on_disk = [json.loads(l) for l in out.read_text().splitlines() if l.strip().startswith("{") and l.strip().endswith("}")]
    assert {r["prompt"] for r in rows_on_disk} == {p.text for p in prompts}


def test_eot_token_ends_generation_and_is_not_in_response(tiny_model, smol_tokenizer):
    eot = end_of_turn_ids(smol_tokenizer, tiny_model)[0]
    with torch.no_grad():  # make the end-of-turn token the model's favourite
        tiny_model.lm_head.bias = torch.nn.Parameter(torch.zeros(tiny_model.lm_head.out_features))
        tiny_model.lm_head.bias[eot] = 1e4
    rows, _ = generate_responses(tiny_model, smol_tokenizer, [Prompt("Hello")], GenerationConfig(max_new_tokens=5),
                                 progress=False)
    assert rows[0]["n_tokens"] == 1 and rows[0]["finished"]
    assert rows[0]["response"] == ""


def test_sampling_settings_are_validated():
    with pytest.raises(SafesteerError, match="needs sampling"):
        GenerationConfig(num_samples=4)
    with pytest.raises(SafesteerError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0)
