"""Batched generation with left padding, exact completion boundaries and resumable JSONL output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from tqdm.auto import tqdm

from .anatomy import end_of_turn_ids, format_prompts
from .errors import SafesteerError
from .prompts import Prompt
from .utils import append_jsonl, read_jsonl


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64  # the paper's evaluation length
    do_sample: bool = False  # greedy by default: reproducible evaluation
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    num_samples: int = 1  # completions per prompt (sampled runs)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SafesteerError("max_new_tokens must be >= 1")
        if self.batch_size < 1:
            raise SafesteerError("batch_size must be >= 1")
        if self.num_samples > 1 and not self.do_sample:
            raise SafesteerError("num_samples > 1 needs sampling; pass --sample (greedy gives identical copies)")
        if self.do_sample and self.temperature <= 0:
            raise SafesteerError("temperature must be > 0 when sampling")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def completion_mask(sequences: torch.Tensor, prompt_len: int, eot_ids: Sequence[int]) -> torch.Tensor:
    """1 for completion tokens up to and including the first end-of-turn token, else 0.

    Decided by position, never by comparing with the pad id: when pad == eos, the eos that ends a
    turn counts and the padding after it does not.
    """
    completion = sequences[:, prompt_len:]
    is_eot = torch.zeros_like(completion, dtype=torch.bool)
    for tid in eot_ids:
        is_eot |= completion == tid
    # Tokens strictly after the first eot: cumulative count of eots before this position > 0.
    before = torch.cumsum(is_eot.int(), dim=1) - is_eot.int()
    return (before == 0).to(torch.long)


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, formatted: list[str], config: GenerationConfig,
                   eot_ids: Sequence[int] | None = None, context: Callable[[], ContextManager] | None = None) -> dict:
    """Generate for one batch of already-formatted prompts.

    Returns sequences [B, P+N], prompt_len P, the completion mask [B, N], decoded responses and the
    number of completion tokens each.
    """
    eot_ids = list(eot_ids or end_of_turn_ids(tokenizer, model))
    device = next(model.parameters()).device
    enc = tokenizer(formatted, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eot_ids)
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with (context() if context else contextlib.nullcontext()):
        sequences = model.generate(**enc, **kwargs)
    prompt_len = enc["input_ids"].shape[1]
    mask = completion_mask(sequences, prompt_len, eot_ids)
    lengths = mask.sum(1).tolist()
    completion = sequences[:, prompt_len:]
    responses = []
    for row, n in zip(completion.tolist(), lengths):
        ids = [t for t in row[:n] if t not in eot_ids]
        responses.append(tokenizer.decode(ids, skip_special_tokens=True))
    finished = [bool(any(t in eot_ids for t in row[:n])) for row, n in zip(completion.tolist(), lengths)]
    return {"sequences": sequences, "prompt_len": prompt_len, "attention_mask": enc["attention_mask"],
            "completion_mask": mask, "responses": responses, "n_tokens": lengths, "finished": finished}


def generate_responses(model: Any, tokenizer: Any, prompts: list[Prompt], config: GenerationConfig,
                       out_path: str | Path | None = None, context: Callable[[], ContextManager] | None = None,
                       desc: str = "generating", extra: dict | None = None, progress: bool = True) -> list[dict]:
    """Answer every prompt (num_samples times); resumable when `out_path` is given.

    Rows already in `out_path` with the same prompt, sample index and settings are reused, so a
    rerun after a crash only does what is missing. Each finished batch is appended (and fsynced).
    Returns the rows for `prompts` in input order (sample-major within a prompt).
    """
    if not prompts:
        raise SafesteerError("no prompts to generate for")
    key = config.key()
    settings = asdict(config) | (extra or {})
    done: dict[tuple[str, int], dict] = {}
    if out_path is not None:
        for row in read_jsonl(out_path):
            if row.get("settings_key") == key:
                done[(row["prompt_uid"], row["sample"])] = row
    todo = [(p, s) for p in prompts for s in range(config.num_samples) if (p.uid, s) not in done]
    eot_ids = end_of_turn_ids(tokenizer, model)
    # Similar lengths in a batch waste less compute on padding.
    lengths = {p.uid: len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p, _ in todo}
    todo.sort(key=lambda item: lengths[item[0].uid])
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, unit="resp")
    new_tokens, t0 = 0, time.time()
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start: start + config.batch_size]
        # Seed per batch from its content so a resumed run samples what the full run would have.
        torch.manual_seed(config.seed + int(batch[0][0].uid[:8], 16) % 100_000 + 7919 * batch[0][1])
        out = generate_batch(model, tokenizer, format_prompts(tokenizer, [p.text for p, _ in batch]), config,
                             eot_ids, context)
        rows = []
        for (p, s), resp, n, fin in zip(batch, out["responses"], out["n_tokens"], out["finished"]):
            row = {"prompt": p.text, "prompt_uid": p.uid, "sample": s, "source": p.source, "category": p.category,
                   "response": resp, "n_tokens": n, "finished": fin, "settings_key": key, "settings": settings}
            done[(p.uid, s)] = row
            rows.append(row)
        if out_path is not None:
            append_jsonl(out_path, rows)
        new_tokens += sum(out["n_tokens"])
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    generate_responses.last_stats = {"new_tokens": new_tokens, "seconds": time.time() - t0, "generated": len(todo)}
    return [done[(p.uid, s)] for p in prompts for s in range(config.num_samples)]
