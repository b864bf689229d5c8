"""MMLU letter scoring, GSM8K answer extraction and KL drift: the measurements behind the capability suites."""

import pytest
import torch

from conftest import perturbed_copy
from safesteer.eval.capability import (answers_match, extract_answer, letter_token_ids, load_mmlu,
                                       mmlu_letter_logprobs, mmlu_prompt, mmlu_subset, token_drift)
from safesteer.eval.suites import ModelEntry


# ----------------------------------------------------------------------------- MMLU


def test_mmlu_subset_is_seeded_and_stratified():
    rows = load_mmlu()
    assert len(rows) == 14042 and all(r["correct_answer"] in "ABCD" for r in rows)
    topics = {r["topic"] for r in rows}
    a, b, c = mmlu_subset(rows, 130, 0), mmlu_subset(rows, 130, 0), mmlu_subset(rows, 130, 1)
    assert a == b and a != c and len(a) == 130
    counts = {t: sum(r["topic"] == t for r in a) for t in topics}
    assert set(counts.values()) <= {2, 3}  # 130 = 57 * 2 + 16: every subject, none twice over
    assert mmlu_subset(rows, 60, 0) == a[:60]  # a smaller subset is a prefix of a larger one


def test_mmlu_letter_scoring_is_deterministic_and_matches_an_independent_argmax(tiny_model, smol_tokenizer):
    rows = mmlu_subset(load_mmlu(), 6, 0)
    scores = mmlu_letter_logprobs(tiny_model, smol_tokenizer, rows, batch_size=4)
    assert torch.equal(scores, mmlu_letter_logprobs(tiny_model, smol_tokenizer, rows, batch_size=4))
    letters = letter_token_ids(smol_tokenizer)
    for i, row in enumerate(rows):
        text = smol_tokenizer.apply_chat_template([{"role": "user", "content": mmlu_prompt(row)}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = torch.tensor([smol_tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(ids).logits[0, -1].float(), -1)
        ref = []
        for L in "ABCD":
            ids_l = [e[0] for e in (smol_tokenizer.encode(t, add_special_tokens=False) for t in (L, " " + L)) if len(e) == 1]
            ref.append(torch.logsumexp(logp[ids_l], 0).item())
        assert scores[i].tolist() == pytest.approx(ref, abs=1e-4)  # batched (padded) = one at a time
        assert int(scores[i].argmax()) == max(range(4), key=lambda j: ref[j])
    # Both spellings of a letter ("A" and " A") are counted for this tokenizer.
    assert all(len(v) == 2 for v in letters.values())


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("response, expected", [
    ("She has 5 + 3 = 8 apples.\n#### 8", "8"),
    ("#### 12\nLater we might get 15 more.", "12"),
    ("Adding up: 300 + 400 = 700. The answer is $1,234.", "1234"),
    ("So the result is \\boxed{42} in total, not 7.", "42"),
    ("The answer is: **-3.5**", "-3.5"),
    ("First 3 apples, then 4 more, so 7 apples.", "7"),
    ("The answer is 18.00.", "18"),
    ("I am not sure how to solve this.", None),
])
def test_gsm8k_answer_extraction(response, expected):
    assert extract_answer(response) == expected


def test_gsm8k_answer_matching():
    assert answers_match("1234", "1,234") and answers_match("18", "18.0")
    assert not answers_match("17", "18") and not answers_match(None, "18")


# ----------------------------------------------------------------------------- drift


def test_kl_drift_of_a_model_against_itself_is_zero(tiny_model, smol_tokenizer):
    prompts = ["Say hello.", "What is the capital of France?", "Name three colours, please."]
    completions = [[100, 200, 300, 2], [7, 8], [1000, 1001, 1002, 1003, 1004]]
    entry = ModelEntry("base", tiny_model, smol_tokenizer)
    same = token_drift(entry, entry, prompts, completions, chunk_tokens=3)
    assert [r["n_tokens"] for r in same] == [4, 2, 5]
    assert all(r["kl_sum"] == 0.0 for r in same) and all(r["agree"] == r["n_tokens"] for r in same)
    other = ModelEntry("perturbed", perturbed_copy(tiny_model), smol_tokenizer)
    moved = token_drift(entry, other, prompts, completions, chunk_tokens=3)
    assert all(r["kl_sum"] > 0 for r in moved)
    # Chunking does not change the numbers.
    chunked = [r["kl_sum"] for r in token_drift(entry, other, prompts, completions, 1000)]
    assert [r["kl_sum"] for r in moved] == pytest.approx(chunked, rel=1e-4)


def test_kl_drift_runs_the_layers_both_models_share_once(tiny_model, smol_tokenizer, monkeypatch):
    """A model that differs from the reference only from layer 1 up starts there, from the reference's input
    to that layer, and its head, equal to the reference's, is packed once: the same numbers as two full
    forwards with the models' own heads (the packed head rounds differently in float32)."""
    import safesteer.core.anatomy as anatomy
    import safesteer.core.prepack as prepack
    from safesteer.core.anatomy import decoder_layers

    prompts = ["Say hello.", "What is the capital of France?"]
    completions = [[100, 200, 300, 2], [1000, 1001, 1002]]
    entry = ModelEntry("base", tiny_model, smol_tokenizer)
    other = ModelEntry("perturbed", perturbed_copy(tiny_model), smol_tokenizer)  # layer 1 and up differ
    runs = []
    # On the layer's attention: a layer handed through still calls its own hooks, not its submodules.
    handle = decoder_layers(other.model)[0].self_attn.register_forward_hook(lambda *_: runs.append(1))
    shared = token_drift(entry, other, prompts, completions)
    assert runs == []  # the other model's layer 0 never ran
    monkeypatch.setattr(anatomy, "identical_lower_layers", lambda a, b: 0)
    monkeypatch.setattr(prepack, "packed_copy", lambda module: None)
    separate = token_drift(entry, other, prompts, completions)
    handle.remove()
    assert runs == [1]
    assert [r["agree"] for r in shared] == [r["agree"] for r in separate]
    assert [r["kl_sum"] for r in shared] == pytest.approx([r["kl_sum"] for r in separate], rel=1e-4)
    assert all(r["kl_sum"] > 0 for r in shared)
