"""Stage 1: the refusal direction r and the steered safety teacher pi_t = pi_0 + r at one layer.

What is computed (method.md, stage 1; Arditi et al. 2024):

* refusal score of a prompt: one forward pass; at the last prompt position
  P(R) = total next-token probability of the tokenizer's refusal-opening tokens and
  score = log P(R) - log(1 - P(R)), both terms from log-sum-exp in float64;
* filtering: harmful prompts are kept when score > 0, harmless ones when score < 0 (train and val);
* candidates: r[i, l] = mean_harmful h_l[i] - mean_harmless h_l[i] for every decoder-layer input l
  and every post-instruction position i (float64 sums, only those positions are ever kept);
* selection: bypass (mean refusal score on harmful-val with r_hat ablated everywhere), induce (mean
  refusal score on harmless-val with r added at layer l, coefficient 1.0) and KL (last-position
  KL(base || ablated) on harmless-val); discard l >= 0.8 * n_layers, KL > 0.1, induce < 0; choose
  the lowest bypass.

The choice is exactly the method's, but it costs far less than scoring every candidate three times:

* candidates removed by the layer (or a user's --layers/--positions) restriction are never scored,
  nor are zero ones (layer 0 at template positions: the same token embedding in both sets);
* bypass is computed for every remaining candidate; KL and induce are then evaluated in increasing
  order of bypass and the first candidate that passes both filters is, by definition, the argmin of
  bypass over the survivors. Candidates ranked below it keep NaN for KL/induce unless
  `full_scores` asks for everything;
* KL is non-negative per prompt, so its evaluation stops as soon as the rows seen so far prove
  KL > threshold (the recorded value is then that lower bound, with a note);
* when harmful-val is small (the filter often keeps a third of it), several candidates are
  ablated in one batch, each on its own copy of the prompts;
* the filtering pass on the training prompts also accumulates their activations, and the
  un-steered harmless-val logits from the filtering pass are the KL baseline;
* the template prefix shared by all prompts of a set (system prompt, `<|im_start|>user\\n`, ...)
  is run once per forward and its KV cache reused for every row (`prefix_cache`);
* each set is tokenised once and batched by length.

Artifacts (written atomically into the stage directory): `direction.safetensors` (the raw,
un-normalised r as "direction", float32), `direction.json` (choice, every candidate's scores,
refusal tokens, prompt counts and hashes, model identity, timings, config) and
`direction_scores.png` (bypass, induce and KL over layer x position, the report's panel).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from ..core.anatomy import decoder_layers, format_prompts, post_instruction_length, unwrap_model
from ..core.forward import left_padded, model_device, positions_from_mask, repeated_cache, shared_prefix_length
from ..core.generation import effective_dtype_name, generation_precision, resolve_generation_dtype
from ..core.steering import ablate_direction, ablate_directions_per_copy, add_direction, hidden_of
from ..errors import SafesteerError
from ..io.models import comparable_identity, safetensors_problem, stored_result_matches
from ..io.run_dir import changed_settings
from ..io.prompts import prompt_texts
from ..parallel import all_reduce_sum, gather_objects, shard, world_size
from ..utils import atomic_path, help_field, phase, preset_config, read_json, sha256_texts, write_json_atomic

DIRECTION_FILE = "direction.safetensors"
META_FILE = "direction.json"
PLOT_FILE = "direction_scores.png"
FAILED_FILE = "direction_failed.json"  # written instead of the artifacts when no candidate survives
FAILED_PLOT_FILE = "direction_failed.png"
FORMAT_VERSION = 1

# Openings of a refusal; only the first token each produces matters, so variants that share it
# ("I", "I'm", "I cannot") collapse into one id.
REFUSAL_OPENINGS = (
    "I", "I'm", "I am", "I cannot", "I can't", "I apologize", "I'm sorry",
    "Sorry", "As", "As an AI", "Unfortunately",
)

_PROBE_INSTRUCTION = "Tell me about the weather."
_LOG_FLOOR = -1e4


# ----------------------------------------------------------------------------- configuration


@dataclass
class DirectionConfig:
    seed: int = help_field(0, "seed of the built-in prompt splits")
    batch_size: int = help_field(32, "prompts per forward pass")
    n_train: int = help_field(128, "harmful and harmless prompts used to build the candidates (before filtering)")
    n_val: int = help_field(32, "harmful and harmless prompts used to score the candidates (before filtering)")
    max_layer_frac: float = help_field(0.8, "discard candidates at layers >= this fraction of the depth")
    kl_threshold: float = help_field(0.1, "discard candidates whose ablation moves harmless-val next-token "
                                          "distributions by more KL than this")
    induce_threshold: float = help_field(0.0,
        "discard candidates whose addition leaves the mean harmless-val refusal score below this")
    induce_fraction: float | None = help_field(None,
        "instead of induce_threshold, require the addition to move the mean harmless-val refusal score this "
        "fraction of the way from its own baseline to the harmful-val baseline (0.5: halfway; the cpu preset)")
    positions: tuple[int, ...] | None = help_field(None,
        "only score these post-instruction positions, negative from the end (--positions=-1,-2; default: all)")
    layers: tuple[int, ...] | None = help_field(None,
        "only score these layers, e.g. 6-14 or 8,10,12 (default: all below max_layer_frac)")
    filter_prompts: bool = help_field(True,
        "keep harmful prompts the model refuses (score > 0) and harmless ones it answers (score < 0)")
    min_filtered: int = help_field(4,
        "if filtering leaves fewer prompts than this in a set, use that set unfiltered (and say so)")
    full_scores: bool = help_field(False,
        "compute KL and induce for every candidate, not only for those needed to find the choice")
    prefix_cache: bool = help_field(True,
        "run the template prefix shared by all prompts once per forward and reuse its KV cache")
    selection_dtype: str = help_field("auto",
        "dtype of the selection forwards (bypass, KL with its baseline, induce): auto (bfloat16 on a CPU with "
        "avx512_bf16/AMX or a CUDA device with bf16, else the model's own), float32, bfloat16. The activations "
        "and the filter's refusal scores: activation_dtype")
    activation_dtype: str = help_field("float32",
        "dtype of the forwards that read the activations and the filter's refusal scores (training and "
        "validation prompts): float32 (the model's own, the method as published), bfloat16, or auto (bfloat16 "
        "where selection_dtype's auto would be). The difference of means is accumulated in float64 either way")

    def __post_init__(self):
        if self.batch_size < 1:
            raise SafesteerError("batch_size must be >= 1")
        if self.n_train < 1 or self.n_val < 1:
            raise SafesteerError("n_train and n_val must be >= 1")
        if not 0 < self.max_layer_frac <= 1:
            raise SafesteerError("max_layer_frac must be in (0, 1]")
        if self.kl_threshold <= 0:
            raise SafesteerError("kl_threshold must be > 0")
        if self.induce_fraction is not None and not 0 <= self.induce_fraction <= 1:
            raise SafesteerError("induce_fraction must be in [0, 1] (or unset to use induce_threshold)")
        if self.positions is not None:
            self.positions = tuple(int(p) for p in self.positions)
            if any(p >= 0 for p in self.positions):
                raise SafesteerError("positions count from the end and must be negative, e.g. -1,-2")
        if self.layers is not None:
            self.layers = tuple(int(layer) for layer in self.layers)
        for name in ("selection_dtype", "activation_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16", "float16"):
                raise SafesteerError(f"unknown {name} '{getattr(self, name)}'; use auto, float32 or bfloat16")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DirectionConfig":
        """A preset's settings (DIRECTION_PRESETS), then `overrides` (None values are ignored)."""
        return preset_config(cls, DIRECTION_PRESETS, name, overrides, "direction preset")

    def induce_threshold_for(self, harmful_baseline: float, harmless_baseline: float) -> float:
        """The induce filter's threshold: absolute, or relative to the validation sets' baselines."""
        if self.induce_fraction is None:
            return self.induce_threshold
        return harmless_baseline + self.induce_fraction * (harmful_baseline - harmless_baseline)

    def result_key(self) -> dict:
        """The settings that change the result; a stored stage is reused only if these match."""
        d = asdict(self)
        for k in ("batch_size", "prefix_cache"):
            d.pop(k)
        if d["activation_dtype"] == "float32":  # what every result made before the setting existed used
            d.pop("activation_dtype")
        d["positions"] = list(self.positions) if self.positions is not None else None
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


DIRECTION_PRESETS: dict[str, dict[str, Any]] = {
    # Arditi et al.'s filters as the method gives them: adding r must make harmless prompts refused
    # on average (mean refusal score >= 0).
    "paper": {},
    # Small models (the 0.5B default): no candidate below 0.8 x depth reaches a mean score of 0 at
    # coefficient 1 (the best moves harmless-val from -3.7 to -0.3 while harmful-val sits at +1.0),
    # so the induce filter asks for half of the harmless-to-harmful gap instead. The bypass ranking and
    # the KL filter are the paper's.
    "cpu": {"induce_fraction": 0.5,
            # The 256 training and 64 validation forwards in bf16 where bf16 is fast (40 -> 19 s on 2 cores).
            # On the 0.5B default the same candidate wins; the filter keeps 55 instead of 56 harmful-train
            # and 124 instead of 123 harmless-train prompts (scores within rounding of 0), and r moves by
            # 1.9% (cosine 0.9998). The paper preset keeps float32.
            "activation_dtype": "auto"},
}


# ----------------------------------------------------------------------------- refusal tokens


def refusal_token_ids(tokenizer: Any, openings: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """The first token the model would emit for each refusal opening, deduplicated, in order.

    Each opening is appended to a formatted prompt and the combined text is tokenised; the token
    that starts where the prompt's text ends is the one the model must produce. This respects the
    tokenizer's own handling of the template's trailing newline and of word-initial spaces.
    """
    prompt = format_prompts(tokenizer, [_PROBE_INSTRUCTION])[0]
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    for opening in openings:
        enc = tokenizer(prompt + opening, add_special_tokens=False, return_offsets_mapping=True)
        first = None
        for tid, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"]):
            if start >= len(prompt) and stop > start:
                first = int(tid)
                break
        if first is None or first in special:
            continue  # the opening merged into the template's last token: not a token the model emits
        if first not in ids:
            ids.append(first)
    if not ids:
        raise SafesteerError("no refusal-opening token found for this tokenizer; check that its chat template renders text")
    return ids


def refusal_scores_from_logits(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log P(R) - log(1 - P(R)) from next-token logits [..., V], R = refusal_ids.

    Both terms are log-sum-exps over disjoint parts of the vocabulary (no 1 - p cancellation) in
    float64, clamped at -1e4 so that a distribution entirely on one side gives a large finite score
    instead of +-inf (any real model's log-probabilities are far above the floor).
    """
    logits = logits.double()
    ids = torch.as_tensor(list(refusal_ids), device=logits.device, dtype=torch.long)
    total = logits.logsumexp(-1)
    in_r = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    in_r[ids] = True
    log_p = logits.index_select(-1, ids).logsumexp(-1) - total
    log_not = logits.masked_fill(in_r, float("-inf")).logsumexp(-1) - total
    return log_p.clamp(min=_LOG_FLOOR) - log_not.clamp(min=_LOG_FLOOR)


# ----------------------------------------------------------------------------- batched forwards


class _Encoded:
    """A prompt set tokenised once: full ids per row plus the prefix all rows share."""

    def __init__(self, tokenizer: Any, instructions: Sequence[str], prefix_cache: bool = True, keep_suffix: int = 1):
        if not instructions:
            raise SafesteerError("an empty prompt set reached the direction stage; give at least one prompt")
        formatted = format_prompts(tokenizer, list(instructions))
        self.ids = [tokenizer(f, add_special_tokens=False)["input_ids"] for f in formatted]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        # Each row keeps at least `keep_suffix` tokens of its own, so the positions read off the
        # suffix (last prompt token, post-instruction tokens) are never inside the cached prefix.
        n = shared_prefix_length(self.ids, keep=keep_suffix) if prefix_cache else 0
        self.prefix = list(self.ids[0][:n])

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, batch_size: int, first: int | None = None) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """(row indices, left-padded suffix ids, suffix mask), longest rows first to limit padding.

        `first` makes the first chunk smaller, for callers that may stop after it.
        """
        p = len(self.prefix)
        order = sorted(range(len(self.ids)), key=lambda i: -len(self.ids[i]))
        bounds = [0] + ([min(first, len(order))] if first else [])
        while bounds[-1] < len(order):
            bounds.append(min(bounds[-1] + batch_size, len(order)))
        for start, stop in zip(bounds, bounds[1:]):
            rows = order[start:stop]
            ids, mask = left_padded([self.ids[i][p:] for i in rows], self.pad_id)
            yield rows, ids, mask


def _model_call(model: nn.Module, ids, mask, positions, cache) -> torch.Tensor:
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    if cache is not None:
        kwargs.update(past_key_values=cache, use_cache=True)
    else:
        kwargs.update(use_cache=False)
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError as exc:  # custom code without logits_to_keep: full logits, last column
        if "logits_to_keep" not in str(exc):
            raise
        out = model(**kwargs)
    return out.logits[:, -1]


@torch.no_grad()
def _last_logits(model: nn.Module, enc: _Encoded, batch_size: int, reduce: Callable[[torch.Tensor, list[int]], Any],
                 context: Callable[[], ContextManager] | None = None,
                 during: Callable[[list[int]], ContextManager] | None = None,
                 first_chunk: int | None = None, stop: Callable[[], bool] | None = None,
                 copies: int = 1) -> list[Any]:
    """Forward every row once (steered by `context`, if given) and reduce each chunk's last logits.

    `during(rows)` wraps only the per-chunk forwards (not the shared-prefix pass); activation
    capture uses it. Positions are explicit (cumulative mask), so left padding never shifts them.
    `stop()` is asked after each chunk; when it says so, the remaining rows are skipped.
    `copies` > 1 runs each chunk that many times in one batch, copy-major (the logits passed to
    `reduce` are [copies * len(rows), V]), for hooks that steer each copy differently.
    """
    device = model_device(model)
    out = []
    with (context() if context else nullcontext()):
        prefix_cache = None
        p = len(enc.prefix)
        if p:
            prefix_ids = torch.tensor([enc.prefix] * copies, device=device)
            prefix_cache = model(input_ids=prefix_ids, position_ids=torch.arange(p, device=device)[None].expand(copies, -1),
                                 use_cache=True).past_key_values
        for rows, ids, mask in enc.chunks(batch_size, first_chunk):
            ids, mask = ids.repeat(copies, 1).to(device), mask.repeat(copies, 1).to(device)
            positions = p + positions_from_mask(mask)
            cache = None
            full_mask = mask
            if prefix_cache is not None:
                cache = repeated_cache(prefix_cache, len(rows))  # copy k's prefix serves copy k's rows
                full_mask = torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=device), mask], 1)
            with (during(rows) if during else nullcontext()):
                logits = _model_call(model, ids, full_mask, positions, cache)
            out.append(reduce(logits.float(), rows))
            if stop is not None and stop():
                break
    return out


def _scatter(chunks: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """Put per-chunk results back in the original row order."""
    first = chunks[0][1]
    result = torch.empty((n,) + tuple(first.shape[1:]), dtype=first.dtype)
    for rows, values in chunks:
        result[torch.tensor(rows)] = values.cpu()
    return result


def _scores_of(enc: _Encoded, model, refusal_ids, batch_size, context=None) -> torch.Tensor:
    chunks = _last_logits(model, enc, batch_size, lambda lg, rows: (rows, refusal_scores_from_logits(lg, refusal_ids)),
                          context=context)
    return _scatter(chunks, len(enc))


def refusal_scores(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], refusal_ids: Sequence[int],
                   batch_size: int = 16, context: Callable[[], ContextManager] | None = None,
                   prefix_cache: bool = True) -> torch.Tensor:
    """Refusal score (float64, [N]) of each instruction at the last position of its formatted prompt."""
    enc = _Encoded(tokenizer, prompt_texts(prompts), prefix_cache=prefix_cache)
    return _scores_of(enc, model, refusal_ids, batch_size, context)


def _keep(scores: torch.Tensor, harmful: bool) -> torch.Tensor:
    return scores > 0 if harmful else scores < 0


@dataclass
class FilterResult:
    harmful: list
    harmless: list
    harmful_scores: torch.Tensor
    harmless_scores: torch.Tensor


def filter_by_refusal(model: nn.Module, tokenizer: Any, harmful: Sequence[Any], harmless: Sequence[Any],
                      refusal_ids: Sequence[int], batch_size: int = 16,
                      context: Callable[[], ContextManager] | None = None) -> FilterResult:
    """Keep harmful prompts with refusal score > 0 and harmless ones with score < 0."""
    hs = refusal_scores(model, tokenizer, harmful, refusal_ids, batch_size, context)
    ls = refusal_scores(model, tokenizer, harmless, refusal_ids, batch_size, context)
    return FilterResult([p for p, k in zip(harmful, _keep(hs, True)) if k],
                        [p for p, k in zip(harmless, _keep(ls, False)) if k], hs, ls)


# ----------------------------------------------------------------------------- candidate directions


def _template_suffix(tokenizer: Any, n_pos: int) -> list[int]:
    text = format_prompts(tokenizer, [_PROBE_INSTRUCTION])[0]
    return tokenizer(text, add_special_tokens=False)["input_ids"][-n_pos:]


@contextmanager
def _capture_last_positions(layers: nn.ModuleList, n_pos: int, store: list) -> Iterator[None]:
    """Pre-hooks that keep only the last n_pos positions of every decoder-layer input."""
    handles = []

    def make(index):
        def hook(_module, args, kwargs):
            hidden, _ = hidden_of(args, kwargs)
            store[index] = hidden[:, -n_pos:, :].detach()
        return hook

    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make(index), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _ActivationSums:
    """Float64 sums [n_pos, n_layers, d] of the post-instruction activations, all rows and kept rows."""

    total: torch.Tensor
    n_total: int
    kept: torch.Tensor
    n_kept: int
    scores: torch.Tensor | None

    def mean(self, filtered: bool) -> torch.Tensor:
        return self.kept / self.n_kept if filtered else self.total / self.n_total


@torch.no_grad()
def _activation_sums(model: nn.Module, tokenizer: Any, enc: _Encoded, batch_size: int,
                     refusal_ids: Sequence[int] | None = None, harmful: bool = True) -> _ActivationSums:
    layers = decoder_layers(model)
    n_pos = post_instruction_length(tokenizer)
    suffix = _template_suffix(tokenizer, n_pos)
    store: list = [None] * len(layers)
    state: dict = {"total": None, "kept": None, "n_kept": 0}

    def reduce(logits, rows):
        # Left padding puts every row's post-instruction tokens in the last n_pos columns; if the
        # template ever rendered them differently the means would mix unrelated tokens.
        if any(enc.ids[i][-n_pos:] != suffix for i in rows):
            raise SafesteerError(
                "the last post-instruction tokens differ between prompts (the chat template does not end every "
                "user turn with the same tokens); candidate directions need aligned positions")
        acts = torch.stack(store, dim=2).double().cpu()  # [b, n_pos, n_layers, d]
        scores = refusal_scores_from_logits(logits, refusal_ids).cpu() if refusal_ids is not None else None
        keep = _keep(scores, harmful) if scores is not None else torch.ones(len(rows), dtype=torch.bool)
        batch_total, batch_kept = acts.sum(0), acts[keep].sum(0)
        state["total"] = batch_total if state["total"] is None else state["total"] + batch_total
        state["kept"] = batch_kept if state["kept"] is None else state["kept"] + batch_kept
        state["n_kept"] += int(keep.sum())
        return rows, scores if scores is not None else torch.zeros(len(rows), dtype=torch.float64)

    chunks = _last_logits(model, enc, batch_size, reduce,
                          during=lambda rows: _capture_last_positions(layers, n_pos, store))
    return _ActivationSums(state["total"], len(enc), state["kept"], state["n_kept"],
                           _scatter(chunks, len(enc)) if refusal_ids is not None else None)


def _summed_over_processes(sums: _ActivationSums) -> _ActivationSums:
    """Each process summed its shard of a prompt set: add sums and counts, concatenate the scores."""
    if world_size() == 1:
        return sums
    counts = all_reduce_sum(torch.tensor([sums.n_total, sums.n_kept], dtype=torch.float64))
    scores = None if sums.scores is None else torch.tensor(gather_objects(sums.scores.tolist()), dtype=torch.float64)
    return _ActivationSums(all_reduce_sum(sums.total), int(counts[0]), all_reduce_sum(sums.kept), int(counts[1]), scores)


def candidate_directions(model: nn.Module, tokenizer: Any, harmful: Sequence[Any], harmless: Sequence[Any],
                         batch_size: int = 32, prefix_cache: bool = True) -> torch.Tensor:
    """r[i, l] = mean_harmful h_l[i] - mean_harmless h_l[i], float64 [n_pos, n_layers, d].

    h_l is the input of decoder layer l; i runs over the `post_instruction_length` template tokens
    after the user's text (index 0 is the earliest, n_pos - 1 the last prompt token).
    """
    n_pos = post_instruction_length(tokenizer)
    keep = n_pos + 1
    h = _activation_sums(model, tokenizer, _Encoded(tokenizer, prompt_texts(harmful), prefix_cache, keep), batch_size)
    b = _activation_sums(model, tokenizer, _Encoded(tokenizer, prompt_texts(harmless), prefix_cache, keep), batch_size)
    return h.mean(False) - b.mean(False)


# ----------------------------------------------------------------------------- selection


@dataclass
class Candidate:
    """One (position, layer) candidate; NaN marks a score that was not computed."""

    position: int  # negative, from the end of the prompt
    layer: int
    bypass: float = float("nan")
    induce: float = float("nan")
    kl: float = float("nan")
    excluded: str | None = None
    chosen: bool = False
    note: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("bypass", "induce", "kl"):
            d[k] = None if math.isnan(d[k]) else d[k]  # strict JSON has no NaN
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        d = dict(d)
        for k in ("bypass", "induce", "kl"):
            d[k] = float("nan") if d.get(k) is None else float(d[k])
        return cls(**d)


def layer_exclusion(position: int, layer: int, n_layers: int, max_layer_frac: float = 0.8,
                    positions: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> str | None:
    if layer >= max_layer_frac * n_layers:
        return f"layer >= {max_layer_frac:g} * n_layers"
    if layers is not None and layer not in layers:
        return "layer not in the requested layers"
    if positions is not None and position not in positions:
        return "position not in the requested positions"
    return None


def score_exclusion(c: Candidate, kl_threshold: float = 0.1, induce_threshold: float = 0.0) -> str | None:
    if c.kl > kl_threshold:
        return f"KL {c.kl:.3g} > {kl_threshold:g}"
    if c.induce < induce_threshold:
        return f"induce {c.induce:.3g} < {induce_threshold:g}"
    return None


def choose_candidate(table: list[Candidate], n_layers: int, max_layer_frac: float = 0.8,
                     kl_threshold: float = 0.1, induce_threshold: float = 0.0) -> int:
    """Index of the lowest-bypass candidate that passes every filter (all scores known)."""
    best = None
    for i, c in enumerate(table):
        if layer_exclusion(c.position, c.layer, n_layers, max_layer_frac) or score_exclusion(c, kl_threshold, induce_threshold):
            continue
        if math.isnan(c.bypass) or math.isnan(c.kl) or math.isnan(c.induce):
            continue
        if best is None or c.bypass < table[best].bypass:
            best = i
    if best is None:
        raise _no_survivor_error(table, n_layers, max_layer_frac, kl_threshold, induce_threshold)
    return best


def _no_survivor_error(table: list[Candidate], n_layers: int, max_layer_frac: float, kl_threshold: float,
                       induce_threshold: float = 0.0) -> SafesteerError:
    from ..cli import stage_options

    counts = {"requested": 0, "layer": 0, "zero": 0, "KL": 0, "induce": 0}  # "requested" before "layer"
    for c in table:
        reason = (c.excluded or layer_exclusion(c.position, c.layer, n_layers, max_layer_frac)
                  or score_exclusion(c, kl_threshold, induce_threshold) or "")
        for key in counts:
            if key in reason:
                counts[key] += 1
                break
    return SafesteerError(
        f"no candidate direction survives the filters ({len(table)} candidates: {counts['layer']} at layers >= "
        f"{max_layer_frac:g}*{n_layers}, {counts['requested']} outside the requested layers/positions, "
        f"{counts['zero']} zero, {counts['KL']} with KL > {kl_threshold:g}, {counts['induce']} with induce score < "
        f"{induce_threshold:g}); try a larger KL threshold, widen the requested layers/positions, use more or clearer "
        f"harmful/harmless prompts, or check that the model refuses harmful requests at all (for a model that barely "
        f"refuses, a lower induce threshold); the options: "
        f"{stage_options('direction', 'kl_threshold', 'layers', 'positions', 'induce_threshold')}")


def _evaluate(table: list[Candidate], n_layers: int, config: DirectionConfig,
              bypass_fn: Callable[[list[Candidate]], list[float]], kl_fn: Callable[[Candidate], float],
              induce_fn: Callable[[Candidate], float], progress: bool = True,
              other_exclusion: Callable[[Candidate], str | None] | None = None, group: int = 1) -> int:
    """Fill in the table and return the chosen index; same choice as `choose_candidate` on full scores.

    `bypass_fn` scores `group` candidates at a time.
    """
    from tqdm.auto import tqdm

    for c in table:
        c.excluded = layer_exclusion(c.position, c.layer, n_layers, config.max_layer_frac, config.positions, config.layers)
        if c.excluded is None and other_exclusion is not None:
            c.excluded = other_exclusion(c)
    eligible = [c for c in table if c.excluded is None]
    if not eligible:
        raise _no_survivor_error(table, n_layers, config.max_layer_frac, config.kl_threshold, config.induce_threshold)
    bar = tqdm(total=len(eligible), desc="bypass scores", disable=not progress, leave=False)
    for start in range(0, len(eligible), group):
        part = eligible[start:start + group]
        for c, value in zip(part, bypass_fn(part), strict=True):
            c.bypass = float(value)
        bar.update(len(part))
    bar.close()
    order = sorted(eligible, key=lambda c: (math.isnan(c.bypass), c.bypass))
    chosen = None
    bar = tqdm(total=len(order), desc="KL, induce (lowest bypass first)", disable=not progress, leave=False)
    for c in order:
        if chosen is not None and not config.full_scores:
            break
        bar.update(1)
        c.kl = float(kl_fn(c))
        if c.kl > config.kl_threshold and not config.full_scores:
            c.excluded = score_exclusion(c, config.kl_threshold, config.induce_threshold)
            continue
        c.induce = float(induce_fn(c))
        c.excluded = score_exclusion(c, config.kl_threshold, config.induce_threshold)
        if c.excluded is None and chosen is None and not math.isnan(c.bypass):
            chosen = c
    bar.close()
    if chosen is None:
        raise _no_survivor_error(table, n_layers, config.max_layer_frac, config.kl_threshold, config.induce_threshold)
    chosen.chosen = True
    return table.index(chosen)


@dataclass
class Selection:
    position: int
    layer: int
    direction: torch.Tensor  # raw r, float64 [d]
    candidates: list[Candidate]

    @property
    def choice(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)


def _kl_rows(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || steered) per row in float64 (identical logits give exactly 0)."""
    lp = logits.double().log_softmax(-1)
    base = base_logits.to(lp.device).double().log_softmax(-1)
    return (base.exp() * (base - lp)).sum(-1)


def _select(model: nn.Module, candidates: torch.Tensor, harmful_val: _Encoded, harmless_val: _Encoded,
            harmless_base_logits: torch.Tensor, refusal_ids: Sequence[int], config: DirectionConfig,
            progress: bool = True) -> Selection:
    n_pos, n_layers, _ = candidates.shape
    table = [Candidate(position=i - n_pos, layer=layer) for layer in range(n_layers) for i in range(n_pos)]

    def vec(c: Candidate) -> torch.Tensor:
        return candidates[c.position + n_pos, c.layer]

    n_harmful = len(harmful_val)
    # With few harmful-val prompts a forward is mostly overhead: score several candidates per batch.
    group = min(8, max(1, round(config.batch_size / n_harmful)))

    def bypass(cs):
        if len(cs) == 1:
            r = vec(cs[0])
            return [_scores_of(harmful_val, model, refusal_ids, config.batch_size,
                               context=lambda: ablate_direction(model, r)).mean().item()]
        units = torch.stack([vec(c) / vec(c).norm() for c in cs]).float()
        chunks = _last_logits(model, harmful_val, n_harmful,
                              lambda lg, rows: (rows, refusal_scores_from_logits(lg, refusal_ids).view(len(cs), -1).cpu()),
                              context=lambda: ablate_directions_per_copy(model, units), copies=len(cs))
        return (sum(values.sum(1) for _, values in chunks) / n_harmful).tolist()

    def kl(c):
        r = vec(c)
        n = len(harmless_val)
        seen = {"rows": 0, "sum": 0.0}

        def reduce(logits, rows):
            values = _kl_rows(harmless_base_logits[torch.tensor(rows)], logits).cpu()
            seen["rows"] += len(rows)
            seen["sum"] += float(values.sum())
            return rows, values

        def enough():
            # KL is non-negative per prompt, so sum-so-far / n already bounds the mean from below:
            # once that bound exceeds the threshold the candidate is out, whatever the other rows say.
            return not config.full_scores and seen["sum"] / n > config.kl_threshold

        _last_logits(model, harmless_val, config.batch_size, reduce, context=lambda: ablate_direction(model, r),
                     first_chunk=min(8, config.batch_size), stop=enough)
        if seen["rows"] < n:
            c.note = f"KL is a lower bound from {seen['rows']} of {n} prompts (enough to exclude)"
        return seen["sum"] / n

    def induce(c):
        r = vec(c)
        return _scores_of(harmless_val, model, refusal_ids, config.batch_size,
                          context=lambda: add_direction(model, r, c.layer, coeff=1.0)).mean().item()

    norms = candidates.norm(dim=-1)
    tiny = 1e-6 * float(norms.max()) if norms.numel() else 0.0

    def degenerate(c):
        # The first layer's input at template positions is the same token embedding for every
        # prompt, so its difference of means is exactly zero and has no direction to ablate.
        return "zero direction (identical activations in both sets)" if float(norms[c.position + n_pos, c.layer]) <= tiny else None

    try:
        index = _evaluate(table, n_layers, config, bypass, kl, induce, progress, other_exclusion=degenerate, group=group)
    except SafesteerError as exc:
        exc.candidates = table  # the caller stores them so the user can see why
        raise
    chosen = table[index]
    return Selection(chosen.position, chosen.layer, vec(chosen).clone(), table)


def select_direction(model: nn.Module, tokenizer: Any, candidates: torch.Tensor, harmful_val: Sequence[Any],
                     harmless_val: Sequence[Any], refusal_ids: Sequence[int], config: DirectionConfig | None = None,
                     progress: bool = True) -> Selection:
    """Score the candidates on the validation prompts and pick one (see the module docstring)."""
    config = config or DirectionConfig()
    n_pos = candidates.shape[0]
    hv = _Encoded(tokenizer, prompt_texts(harmful_val), config.prefix_cache, n_pos + 1)
    lv = _Encoded(tokenizer, prompt_texts(harmless_val), config.prefix_cache, n_pos + 1)
    base = _scatter(_last_logits(model, lv, config.batch_size, lambda lg, rows: (rows, lg)), len(lv))
    if config.induce_fraction is not None:  # baselines in the model's dtype, as run_direction_stage's filter pass
        harmful_baseline = float(_scores_of(hv, model, refusal_ids, config.batch_size).mean())
        harmless_baseline = float(refusal_scores_from_logits(base, refusal_ids).mean())
        config = replace(config, induce_threshold=config.induce_threshold_for(harmful_baseline, harmless_baseline),
                         induce_fraction=None)
    with generation_precision(model, resolve_generation_dtype(config.selection_dtype, model)) as cast:
        if cast:  # the KL baseline in the dtype of the ablated forwards
            base = _scatter(_last_logits(model, lv, config.batch_size, lambda lg, rows: (rows, lg)), len(lv))
        return _select(model, candidates, hv, lv, base, refusal_ids, config, progress)


# ----------------------------------------------------------------------------- the stage


@dataclass
class SteeringSpec:
    """The safety teacher: `coeff * direction` added to the input of decoder layer `layer`."""

    direction: torch.Tensor  # raw r, float32 [d]
    layer: int
    coeff: float = 1.0
    position: int | None = None
    meta: dict = field(default_factory=dict)

    def check(self, model: nn.Module) -> None:
        hidden = getattr(unwrap_model(model).config, "hidden_size", None)
        if hidden is None and unwrap_model(model).get_input_embeddings() is not None:
            hidden = unwrap_model(model).get_input_embeddings().weight.shape[-1]
        n_layers = len(decoder_layers(model))
        identity = self.meta.get("identity") if isinstance(self.meta, dict) else None
        made_for = (identity.get("name") if isinstance(identity, dict) else None) or "another model"
        if hidden is not None and hidden != self.direction.shape[0]:
            raise SafesteerError(
                f"the refusal direction was made for {made_for} (hidden size {self.direction.shape[0]}) but this model's "
                f"hidden size is {hidden}; run `safesteer direction` for this model")
        if not 0 <= self.layer < n_layers:
            raise SafesteerError(
                f"the refusal direction is for layer {self.layer} but this model has layers 0-{n_layers - 1}; "
                f"it was made for {made_for}: run `safesteer direction` for this model")

    def teacher(self, model: nn.Module) -> ContextManager:
        """Context manager that turns `model` into the steered teacher while it is open."""
        self.check(model)
        return add_direction(model, self.direction, self.layer, self.coeff)


def load_direction(out_dir: str | Path, model: nn.Module | None = None) -> SteeringSpec:
    """Read a stage-1 result; with `model`, also check that it was made for a model of its shape."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    meta_path, tensor_path = out_dir / META_FILE, out_dir / DIRECTION_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise SafesteerError(f"no refusal direction in {out_dir} (need {META_FILE} and {DIRECTION_FILE}); "
                             f"run `safesteer direction --out {out_dir}` first")
    redo = f"rerun `safesteer direction --out {out_dir} --force`"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise SafesteerError(f"{meta_path} is unreadable ({type(exc).__name__}); {redo}") from None
    layer, coeff, position = (meta.get(k) for k in ("layer", "coeff", "position")) if isinstance(meta, dict) else (None,) * 3
    if not _is_int(layer) or not _is_int(position, none_ok=True) or not (
            coeff is None or (isinstance(coeff, (int, float)) and not isinstance(coeff, bool) and math.isfinite(coeff))):
        raise SafesteerError(f"{meta_path} does not hold a layer (integer), coefficient (number) and position "
                             f"(integer or null); {redo}")
    problem = safetensors_problem(tensor_path)
    if problem:
        raise SafesteerError(f"{tensor_path} is truncated or corrupted ({problem}); {redo}")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # noqa: BLE001 - whatever safetensors says, the file is unusable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SafesteerError(f"{tensor_path} cannot be read ({first}); {redo}") from None
    direction = tensors.get("direction")
    if direction is None or direction.ndim != 1 or not direction.is_floating_point() or direction.numel() == 0:
        what = "no 'direction' tensor" if direction is None else f"a {direction.dtype} tensor of shape {list(direction.shape)}"
        raise SafesteerError(f"{tensor_path} holds {what}, not a one-dimensional float direction; {redo}")
    if not torch.isfinite(direction).all():
        raise SafesteerError(f"{tensor_path} holds NaN or infinite values; {redo}")
    spec = SteeringSpec(direction=direction, layer=layer, coeff=1.0 if coeff is None else float(coeff),
                        position=position, meta=meta)
    if model is not None:
        spec.check(model)
    return spec


def _is_int(value: Any, none_ok: bool = False) -> bool:
    return (value is None and none_ok) or (isinstance(value, int) and not isinstance(value, bool))


def _reusable(out_dir: Path, identity: dict, hashes: dict, config: DirectionConfig) -> bool:
    return stored_result_matches(out_dir / META_FILE, (out_dir / DIRECTION_FILE, out_dir / PLOT_FILE), FORMAT_VERSION,
                                 identity, prompt_sha256=hashes, config_key=config.result_key())


def stored_direction_changes(out_dir: Path, identity: dict, hashes: dict, config: DirectionConfig) -> list[str]:
    """How the finished stage-1 result in `out_dir` was made differently from this run: one
    'SETTING OLD -> NEW' line per difference in model, prompts and settings; [] when they match or
    there is no readable result (a damaged one is computed again, see `run_direction_stage`)."""
    try:
        meta = read_json(out_dir / META_FILE) if (out_dir / META_FILE).is_file() else None
    except (OSError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        return []
    if meta.get("format") != FORMAT_VERSION:
        return [f"{META_FILE} format {meta.get('format')} -> {FORMAT_VERSION} (made by another safesteer version)"]
    return (changed_settings(meta.get("config_key") or {}, config.result_key(), "direction.")
            + changed_settings(comparable_identity(meta.get("identity") or {}), comparable_identity(identity), "model.")
            + changed_settings(meta.get("prompt_sha256") or {}, hashes, "direction prompts "))


def _apply_filter(acts: dict[str, _ActivationSums], val_scores: dict[str, torch.Tensor],
                  config: DirectionConfig) -> tuple[dict, dict, dict]:
    """The refusal filter on the four sets: training activation means and kept validation rows by set,
    prompt counts before and after, and which sets fell back to all their prompts (the filter kept too few)."""
    filtered, counts, fallback = {}, {}, {}
    for k, a in acts.items():
        use_kept = config.filter_prompts and a.n_kept >= min(config.min_filtered, a.n_total)
        fallback[k] = config.filter_prompts and not use_kept
        if fallback[k]:
            _warn_fallback(a.n_kept, a.n_total, k)
        filtered[k] = a.mean(use_kept)
        counts[k] = {"before": a.n_total, "after": a.n_kept if use_kept else a.n_total}
    for k, scores in val_scores.items():
        rows = list(range(len(scores)))
        kept = [i for i, keep in zip(rows, _keep(scores, k.startswith("harmful"))) if keep]
        fallback[k] = config.filter_prompts and len(kept) < min(config.min_filtered, len(rows))
        if fallback[k]:
            _warn_fallback(len(kept), len(rows), k)
        filtered[k] = rows if fallback[k] or not config.filter_prompts else kept
        counts[k] = {"before": len(rows), "after": len(filtered[k])}
    return filtered, counts, fallback


def _warn_fallback(kept: int, total: int, name: str) -> None:
    warnings.warn(f"refusal filter kept only {kept} of {total} {name} prompts; using all of them (the model may not "
                  f"{'refuse' if name.startswith('harmful') else 'answer'} these reliably)", stacklevel=4)


def _plot_scores(candidates: list[Candidate], n_layers: int, config: DirectionConfig, induce_threshold: float,
                 position_labels: list[str], path: Path) -> None:
    """The stage's PNG: the report's candidate-score panel (`report.figures.plot_direction_scores`)."""
    from ..report.figures import candidate_rows, plot_direction_scores, save_png

    save_png(plot_direction_scores(candidate_rows([c.as_dict() for c in candidates]), n_layers, config.max_layer_frac,
                                   induce_threshold, config.kl_threshold, position_labels), path)


def _config_record(config: DirectionConfig) -> dict:
    """The settings as the artifacts record them (lists, not tuples, for positions and layers)."""
    return {**asdict(config), "positions": config.result_key()["positions"], "layers": config.result_key()["layers"]}


def _write_failure(out_dir: Path, record: dict, table: list[Candidate], n_layers: int, config: DirectionConfig,
                   induce_threshold: float, labels: list[str]) -> None:
    """No candidate survived: keep every candidate's scores (JSON and PNG) so the user can see why."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / FAILED_FILE, record)
    _plot_scores(table, n_layers, config, induce_threshold, labels, out_dir / FAILED_PLOT_FILE)


def run_direction_stage(model: nn.Module, tokenizer: Any, identity: dict, out_dir: str | Path,
                        harmful_train: Sequence[Any], harmless_train: Sequence[Any], harmful_val: Sequence[Any],
                        harmless_val: Sequence[Any], config: DirectionConfig | None = None, progress: bool = True,
                        force: bool = False, on_change: Callable[[list[str]], None] | None = None) -> SteeringSpec:
    """Stage 1 end to end; reuses the artifacts in `out_dir` when model, prompts and settings match.

    A stored result made with another model, other prompts or other settings is computed again, unless
    `on_change` is given: it is called first with the differences (`stored_direction_changes`), so that
    `align` can stop instead of replacing a direction its later stages were built on.
    """
    from safetensors.torch import save_file

    config = config or DirectionConfig()
    # "auto" made concrete for this model and machine: recorded, and compared on reuse, as what ran.
    config = replace(config, selection_dtype=effective_dtype_name(config.selection_dtype, model),
                     activation_dtype=effective_dtype_name(config.activation_dtype, model))
    out_dir = Path(out_dir)
    sets = {"harmful_train": prompt_texts(harmful_train)[:config.n_train],
            "harmless_train": prompt_texts(harmless_train)[:config.n_train],
            "harmful_val": prompt_texts(harmful_val)[:config.n_val],
            "harmless_val": prompt_texts(harmless_val)[:config.n_val]}
    hashes = {k: sha256_texts(v) for k, v in sets.items()}
    changes = [] if force or on_change is None else stored_direction_changes(out_dir, identity, hashes, config)
    if changes:
        on_change(changes)
    if not force and _reusable(out_dir, identity, hashes, config):
        try:
            spec = load_direction(out_dir, model)
        except SafesteerError as exc:  # a damaged artifact is recomputed, never reused
            warnings.warn(f"not reusing the refusal direction in {out_dir}: {str(exc).split('; rerun')[0]}; computing it again",
                          stacklevel=2)
        else:
            print(f"[direction] reusing the refusal direction in {out_dir} (same model, prompts and settings)")
            return spec
    phase("direction")  # computing from here (the kill -9 soak test stops runs at these announced points)

    def log(msg):
        if progress:
            print(f"[direction] {msg}", flush=True)

    timings: dict[str, float] = {}
    t_all = t0 = time.time()
    n_layers = len(decoder_layers(model))
    n_pos = post_instruction_length(tokenizer)
    refusal_ids = refusal_token_ids(tokenizer)
    labels = [tokenizer.decode([i]) for i in _template_suffix(tokenizer, n_pos)]
    # Several processes: each takes a share of the training prompts and the activation sums are added up.
    enc = {k: _Encoded(tokenizer, shard(v) if k.endswith("_train") else v, config.prefix_cache, n_pos + 1)
           for k, v in sets.items()}

    # Training prompts: one pass gives both the refusal scores (filter) and the activations.
    log(f"activations of {len(sets['harmful_train'])}+{len(sets['harmless_train'])} training prompts at "
        f"{n_pos} positions x {n_layers} layers")
    with generation_precision(model, config.activation_dtype):
        acts = {k: _summed_over_processes(_activation_sums(model, tokenizer, enc[k], config.batch_size, refusal_ids,
                                                           harmful=k.startswith("harmful")))
                for k in ("harmful_train", "harmless_train")}
        timings["train_pass_s"] = time.time() - t0

        # Validation prompts: scores for the filter; harmless logits double as the KL baseline.
        t0 = time.time()
        hv_scores = _scores_of(enc["harmful_val"], model, refusal_ids, config.batch_size)
        lv_chunks = _last_logits(model, enc["harmless_val"], config.batch_size, lambda lg, rows: (rows, lg))
        lv_logits = _scatter(lv_chunks, len(enc["harmless_val"]))  # also the KL baseline
        lv_scores = refusal_scores_from_logits(lv_logits, refusal_ids)
        timings["val_pass_s"] = time.time() - t0

    filtered, counts, fallback = _apply_filter(acts, {"harmful_val": hv_scores, "harmless_val": lv_scores}, config)
    log("prompts kept by the refusal filter: " + ", ".join(f"{k} {v['after']}/{v['before']}" for k, v in counts.items()))

    candidates = filtered["harmful_train"] - filtered["harmless_train"]
    hv_enc = _Encoded(tokenizer, [sets["harmful_val"][i] for i in filtered["harmful_val"]], config.prefix_cache, n_pos + 1)
    lv_enc = _Encoded(tokenizer, [sets["harmless_val"][i] for i in filtered["harmless_val"]], config.prefix_cache, n_pos + 1)
    base_logits = lv_logits[torch.tensor(filtered["harmless_val"])]

    t0 = time.time()
    log(f"scoring candidates ({n_pos} positions x {n_layers} layers) on {len(hv_enc)} harmful-val and "
        f"{len(lv_enc)} harmless-val prompts")
    baseline = {"harmful_val_refusal_score": float(hv_scores[torch.tensor(filtered["harmful_val"])].mean()),
                "harmless_val_refusal_score": float(lv_scores[torch.tensor(filtered["harmless_val"])].mean())}
    induce_threshold = config.induce_threshold_for(baseline["harmful_val_refusal_score"], baseline["harmless_val_refusal_score"])
    if config.induce_fraction is not None:
        log(f"induce filter: mean harmless-val refusal score >= {induce_threshold:.3f} ({config.induce_fraction:g} of the "
            f"way from {baseline['harmless_val_refusal_score']:.3f} to {baseline['harmful_val_refusal_score']:.3f})")
    select_config = replace(config, induce_threshold=induce_threshold, induce_fraction=None)
    try:
        same_pass = config.activation_dtype == config.selection_dtype and len(lv_enc) == len(enc["harmless_val"])
        with generation_precision(model, resolve_generation_dtype(config.selection_dtype, model)) as cast:
            # The KL baseline in the same dtype as the ablated forwards, or KL would measure rounding. The
            # validation pass's logits are that baseline already when it ran in this dtype on the same prompts.
            if cast and not same_pass:
                base_logits = _scatter(_last_logits(model, lv_enc, config.batch_size, lambda lg, rows: (rows, lg)),
                                       len(lv_enc))
            selection = _select(model, candidates, hv_enc, lv_enc, base_logits, refusal_ids, select_config, progress)
    except SafesteerError as exc:
        table = getattr(exc, "candidates", None)
        if table is None:
            raise
        record = {"error": str(exc), "baseline": baseline, "induce_threshold_used": induce_threshold,
                  "prompt_counts": counts, "identity": identity,
                  "refusal_tokens": [tokenizer.decode([i]) for i in refusal_ids], "post_instruction_tokens": labels,
                  "norms": candidates.norm(dim=-1).tolist(), "candidates": [c.as_dict() for c in table],
                  "config": _config_record(config)}
        _write_failure(out_dir, record, table, n_layers, config, induce_threshold, labels)
        raise SafesteerError(f"{exc}. Every candidate's scores: {out_dir / FAILED_FILE}") from exc
    timings["selection_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_all
    choice = selection.choice
    direction = selection.direction.float().contiguous()

    scored = [c for c in selection.candidates if not math.isnan(c.bypass)]
    meta = {
        "format": FORMAT_VERSION,
        "layer": choice.layer,
        "position": choice.position,
        "norm": float(selection.direction.norm()),
        "coeff": 1.0,
        "scores": {"bypass": choice.bypass, "induce": choice.induce, "kl": choice.kl},
        "baseline": baseline,
        "induce_threshold_used": induce_threshold,
        "n_layers": n_layers,
        "n_positions": n_pos,
        "post_instruction_tokens": labels,
        "hidden_size": int(direction.shape[0]),
        "candidates_scored": {"bypass": len(scored),
                              "kl": sum(1 for c in scored if not math.isnan(c.kl)),
                              "induce": sum(1 for c in scored if not math.isnan(c.induce))},
        "candidates": [c.as_dict() for c in selection.candidates],
        "refusal_token_ids": list(refusal_ids),
        "refusal_tokens": [tokenizer.decode([i]) for i in refusal_ids],
        "prompt_counts": counts,
        "filter_fallback": fallback,
        "prompt_sha256": hashes,
        "identity": identity,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "config": _config_record(config),
        "config_key": config.result_key(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / DIRECTION_FILE) as tmp:
        save_file({"direction": direction}, str(tmp), metadata={"layer": str(choice.layer), "position": str(choice.position)})
    phase("direction-write")  # the new tensor is in place, its direction.json not yet: a kill here must not be reused
    _plot_scores(selection.candidates, n_layers, config, induce_threshold, labels, out_dir / PLOT_FILE)
    write_json_atomic(out_dir / META_FILE, meta)  # written last: its presence marks a finished stage
    for stale in (FAILED_FILE, FAILED_PLOT_FILE):
        (out_dir / stale).unlink(missing_ok=True)
    log(f"done in {timings['total_s']:.0f} s")
    return SteeringSpec(direction=direction, layer=choice.layer, coeff=1.0, position=choice.position, meta=meta)


# ----------------------------------------------------------------------------- command line


def _split_user_set(spec: str, field_name: str | None, n_train: int, n_val: int, seed: int, kind: str):
    from ..io.prompts import load_prompts, split_prompts

    prompts = load_prompts(spec, field=field_name)
    if len(prompts) < n_val + 2:
        raise SafesteerError(f"--{kind} {spec} has {len(prompts)} prompts; the direction stage needs at least "
                             f"n_val + 2 = {n_val + 2} (train and val are split from it); lower --n-val or add prompts")
    parts = split_prompts(prompts, {"direction_val": n_val, "direction_train": min(n_train, len(prompts) - n_val)}, seed)
    return parts["direction_train"], parts["direction_val"]


def _cmd_direction(args: argparse.Namespace) -> int:
    """stage 1: find the refusal direction (the steered safety teacher)

    Difference-in-means refusal directions at every layer and post-instruction position, scored by bypass /
    induce / KL on validation prompts; the chosen one defines the teacher. Reruns with the same model, prompts
    and settings reuse the stored result.
    """
    from ..cli import config_values, load_model_from_args, resolve_preset
    from ..io.prompts import builtin_splits
    from ..io.run_dir import check_out_dir, claim_out_dir
    from ..utils import seed_everything

    preset = resolve_preset(args.preset, stage=True)
    config = DirectionConfig.from_preset(preset, **config_values(args, DirectionConfig))
    print(f"direction preset {preset}" + (f" (induce filter at {config.induce_fraction:g} of the baseline gap)"
                                          if config.induce_fraction is not None else ""))
    seed_everything(config.seed)
    splits = builtin_splits(config.seed) if not (args.harmful and args.harmless) else None
    if args.harmful:
        harmful_train, harmful_val = _split_user_set(args.harmful, args.field, config.n_train, config.n_val, config.seed, "harmful")
    else:
        harmful_train, harmful_val = splits["harmful"]["direction_train"], splits["harmful"]["direction_val"]
    if args.harmless:
        harmless_train, harmless_val = _split_user_set(args.harmless, args.field, config.n_train, config.n_val, config.seed, "harmless")
    else:
        harmless_train, harmless_val = splits["harmless"]["direction_train"], splits["harmless"]["direction_val"]
    check_out_dir(args.out)  # before loading the model
    loaded = load_model_from_args(args)
    claim_out_dir(args.out, "direction")
    spec = run_direction_stage(loaded.model, loaded.tokenizer, loaded.identity, args.out, harmful_train, harmless_train,
                               harmful_val, harmless_val, config, force=args.force)
    m = spec.meta
    s = m["scores"]
    print(f"refusal direction: layer {spec.layer} of {m['n_layers']}, position {spec.position}, |r| = {m['norm']:.3g}")
    print(f"  bypass {s['bypass']:.3f} (baseline {m['baseline']['harmful_val_refusal_score']:.3f}), "
          f"induce {s['induce']:.3f} (baseline {m['baseline']['harmless_val_refusal_score']:.3f}), KL {s['kl']:.4f}")
    print(f"  candidates scored: {m['candidates_scored']['bypass']} bypass, {m['candidates_scored']['kl']} KL, "
          f"{m['candidates_scored']['induce']} induce; refusal tokens {m['refusal_tokens']}")
    out = Path(args.out)
    print(f"  artifacts: {out / DIRECTION_FILE}, {out / META_FILE}, {out / PLOT_FILE}")
    return 0


def add_cli(subparsers) -> None:
    from ..cli import add_command, add_config_args

    p = add_command(subparsers, "direction", _cmd_direction, model=True, presets=DIRECTION_PRESETS,
                    out="stage directory (direction.safetensors, direction.json, direction_scores.png)",
                    prompts={"--harmful": "harmful prompts, split into train/val (default: the built-in AdvBench split)",
                             "--harmless": "harmless prompts, split likewise (default: the built-in harmless split)"})
    p.add_argument("--force", action="store_true", help="recompute even if a matching result exists")
    # Default None: an option given on the command line overrides the preset, an absent one does not.
    add_config_args(p, DirectionConfig, presets=DIRECTION_PRESETS)
