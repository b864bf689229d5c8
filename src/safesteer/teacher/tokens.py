"""Stage 2: the safety tokens S, the vocabulary ids whose probability the refusal direction raises most.

    S = select_safety_tokens(model, tokenizer, lambda: add_direction(model, r, layer), prompts, config)

Procedure (method.md, stage 2): harmless prompts, each repeated M times; the steered teacher samples
exactly H-1 tokens (temperature 1, top_p 1, end-of-turn suppressed); teacher and base model score
the H next-token distributions that predict response tokens 1..H; delta = log p_t - log p_0 over the
whole vocabulary in float32; positions after the base model's argmax predicted an end of turn are
masked; special tokens, tokens whose text contains "<|" and tokens whose mean steered probability is
below a floor are never admitted; each valid position votes for its top-K' eligible tokens by delta;
S = the K most-voted tokens.

How the work is laid out, and why:
* Each prompt is encoded once per model and its KV cache shared by its M samples, and the teacher's
  distributions are recorded while it samples (what a teacher-forced pass over the same tokens gives;
  a test checks it), so neither the M-fold prompt nor the teacher pass is computed twice.
* The probability floor depends on the mean steered probability over *all* valid positions, so the
  eligible set is known only after every sample is scored. The full [N, H, V] log-probabilities are
  never kept: the first pass keeps the last-layer hidden states ([N, H, d], small) and the running
  sum of steered probabilities; the vote is a second pass that re-applies the output head to them.
* Launched with several processes (torchrun, accelerate launch), each process samples and scores a
  contiguous share of the prompts (`parallel.shard_bounds`, as stage 1). The per-token sums are added
  over processes before the floor (pass 1) and before the selection (pass 2), so S is the one a
  single process finds. Every sample row draws from its own random stream, seeded from the seed,
  the prompt's index in the full list and the row (`core.sampling.rollout_seeds`), so a prompt gets
  the same samples whichever process or batch it lands in.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..core.anatomy import end_of_turn_ids, format_prompts, output_head, unwrap_model
from ..core.generation import effective_dtype_name, generation_precision, resolve_generation_dtype
from ..core.forward import model_device, positions_from_mask
from ..core.prepack import packed_copy
from ..core.sampling import inverse_cdf_choice, rollout_seeds
from ..errors import SafesteerError
from ..io.models import comparable_identity, model_family
from ..io.prompts import Prompt, prompt_texts
from ..io.run_dir import changed_settings
from ..parallel import (all_reduce_sum, barrier, broadcast_object, gather_objects, is_main_process, shard_bounds,
                        world_size)
from ..utils import (check_choice, help_field, phase, preset_config, read_json, sha256_file, sha256_texts,
                     write_json_atomic)

FORMAT_VERSION = 1
JSON_NAME = "safety_tokens.json"
PLOT_NAME = "safety_tokens.png"

# Released runs: horizon 7 and floor 1e-8 for Qwen, 5 and 1e-7 for Llama.
FAMILY_HORIZON = {"qwen": 7, "llama": 5}
FAMILY_MIN_STEERED_PROB = {"qwen": 1e-8, "llama": 1e-7}
DEFAULT_HORIZON = 5
DEFAULT_MIN_STEERED_PROB = 1e-8

METHODS = ("vote", "mean")
RANK_BY = ("delta", "weighted")


@dataclass
class SafetyTokenConfig:
    horizon: int | None = help_field(None, "H: response positions scored per sample (H-1 sampled tokens); default "
                                           "per family: 7 qwen, 5 llama, 5 other")
    samples_per_prompt: int = help_field(8, "M: teacher samples per prompt")
    n_prompts: int = help_field(32, "harmless prompts used (the first n that pass the refusal filter)")
    top_k_per_position: int = help_field(200, "K': tokens each valid position votes for")
    n_tokens: int = help_field(50, "K: size of the safety-token set S")
    min_steered_prob: float | None = help_field(None, "never admit tokens whose mean steered probability is below "
                                                      "this; default per family: 1e-8 qwen, 1e-7 llama, 1e-8 other")
    method: str = help_field("vote", "vote: top-K' votes per position (the paper); mean: top-K by mean score over "
                                     "valid positions")
    rank_by: str = help_field("delta", "delta: log p_t - log p_0 (the paper); weighted: p_t * delta, favours tokens "
                                       "the teacher actually emits")
    seed: int = help_field(42, "seed of the teacher's samples")
    batch_size: int = help_field(64, "sequences (prompt x sample rows) per forward batch")
    generation_dtype: str = help_field("auto", "dtype of the teacher's sampling pass (its distributions and both "
                                               "models' hidden states): auto (bfloat16 on a CPU with avx512_bf16/AMX "
                                               "or a CUDA device with bf16, else the model's own), float32, "
                                               "bfloat16; the vote re-applies the output head in the model's dtype")

    def __post_init__(self):
        if self.horizon is not None and self.horizon < 1:
            raise SafesteerError("horizon must be >= 1")
        for name in ("samples_per_prompt", "n_prompts", "top_k_per_position", "n_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise SafesteerError(f"{name} must be >= 1")
        if self.min_steered_prob is not None and not 0 <= self.min_steered_prob < 1:
            raise SafesteerError("min_steered_prob must be in [0, 1)")
        check_choice(self.method, METHODS, "method")
        check_choice(self.rank_by, RANK_BY, "rank_by")
        if self.generation_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SafesteerError(f"unknown generation_dtype '{self.generation_dtype}'; use auto, float32 or bfloat16")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SafetyTokenConfig":
        """A preset's settings (TOKEN_PRESETS), then `overrides` (None values are ignored)."""
        return preset_config(cls, TOKEN_PRESETS, name, overrides, "safety-token preset")

    def resolve(self, family: str) -> tuple[int, float]:
        """(H, min_steered_prob) with the per-family defaults filled in."""
        horizon = self.horizon if self.horizon is not None else FAMILY_HORIZON.get(family, DEFAULT_HORIZON)
        floor = (self.min_steered_prob if self.min_steered_prob is not None
                 else FAMILY_MIN_STEERED_PROB.get(family, DEFAULT_MIN_STEERED_PROB))
        return horizon, floor


# The presets of the same names as `safesteer align`'s (and `safesteer direction`'s).
TOKEN_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's vote: K' = 200 per position, floor 1e-8 (qwen) / 1e-7 (llama).
    "paper": {},
    # The paper's vote over the default model's teacher admits mostly rare tokens (code fragments, CJK,
    # "abort") that carry ~1-2% of the probability on the student's rollouts. A floor on the mean steered
    # probability (1e-3) and a narrower vote (K' = 10) keep the tokens the teacher actually emits and
    # boosts: "Unfortunately", " unable", "Sorry", " sorry", " cannot", "I", ... (~20% of the mass).
    "cpu": {"min_steered_prob": 1e-3, "top_k_per_position": 10},
}


@dataclass
class TokenSelection:
    """The chosen ids, best first, with their statistics over the valid positions."""

    ids: list[int]
    votes: list[int]
    mean_base_prob: list[float]
    mean_steered_prob: list[float]
    mean_delta: list[float]
    n_valid_positions: int
    n_eligible: int


@dataclass
class SafetyTokenResult:
    ids: list[int]
    texts: list[str]
    votes: list[int]
    mean_base_prob: list[float]
    mean_steered_prob: list[float]
    mean_delta: list[float]
    n_valid_positions: int
    n_positions: int
    n_eligible: int
    config: SafetyTokenConfig
    family: str
    horizon: int
    min_steered_prob: float
    timing: dict = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def token_rows(self) -> list[dict]:
        return [{"id": i, "text": t, "votes": v, "mean_p0": p0, "mean_pt": pt, "mean_delta": d}
                for i, t, v, p0, pt, d in zip(self.ids, self.texts, self.votes, self.mean_base_prob,
                                              self.mean_steered_prob, self.mean_delta)]

    @classmethod
    def from_json(cls, data: dict) -> "SafetyTokenResult":
        rows = data["tokens"]
        known = {f.name for f in fields(SafetyTokenConfig)}
        return cls(
            ids=[r["id"] for r in rows], texts=[r["text"] for r in rows], votes=[r["votes"] for r in rows],
            mean_base_prob=[r["mean_p0"] for r in rows], mean_steered_prob=[r["mean_pt"] for r in rows],
            mean_delta=[r["mean_delta"] for r in rows], n_valid_positions=data["n_valid_positions"],
            n_positions=data["n_positions"], n_eligible=data["n_eligible"],
            config=SafetyTokenConfig(**{k: v for k, v in data["config"].items() if k in known}),
            family=data["resolved"]["family"], horizon=data["resolved"]["horizon"],
            min_steered_prob=data["resolved"]["min_steered_prob"], timing=data.get("timing", {}),
            examples=data.get("examples", []),
        )


# ----------------------------------------------------------------------------- pure pieces


def end_of_turn_valid_mask(base_argmax: torch.Tensor, eot_ids: Sequence[int]) -> torch.Tensor:
    """[N, H] bool: False from the first position where the base model's argmax is an end-of-turn token on.

    The position that predicts the end of turn is itself invalid: the base model would have stopped there.
    """
    is_eot = torch.isin(base_argmax, torch.as_tensor(list(eot_ids), device=base_argmax.device))
    return is_eot.long().cumsum(dim=1) == 0


def static_eligible_mask(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """[V] bool: tokens that may ever enter S (the probability floor is applied later).

    Excluded: special tokens (declared or added as special), tokens whose decoded text contains "<|",
    and output rows past the tokenizer's vocabulary (padding rows of the embedding matrix, no text).
    """
    n_text = min(len(tokenizer), vocab_size)
    eligible = torch.zeros(vocab_size, dtype=torch.bool)
    eligible[:n_text] = True
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(idx))
    for idx in special:
        if 0 <= idx < vocab_size:
            eligible[idx] = False
    texts = tokenizer.batch_decode([[i] for i in range(n_text)])
    for idx, text in enumerate(texts):
        if "<|" in text:
            eligible[idx] = False
    return eligible


class TokenStats:
    """Running per-token sums over valid positions; the two passes of the selection share it.

    Pass 1 (`add_steered`) sees every valid position's steered log-probs and fixes the floor;
    pass 2 (`add_scores`) sees teacher and base log-probs again and votes among the eligible tokens.
    """

    def __init__(self, vocab_size: int, rank_by: str = "delta"):
        self.vocab_size = vocab_size
        self.rank_by = rank_by
        self.n_valid = 0
        self.sum_steered = torch.zeros(vocab_size, dtype=torch.float64)
        self.sum_base = torch.zeros(vocab_size, dtype=torch.float64)
        self.sum_delta = torch.zeros(vocab_size, dtype=torch.float64)
        self.sum_score = torch.zeros(vocab_size, dtype=torch.float64)
        self.votes = torch.zeros(vocab_size, dtype=torch.long)
        self.n_scored = 0

    def add_steered(self, logp_t: torch.Tensor) -> None:
        """Pass 1: logp_t [R, V] for R valid positions."""
        self.n_valid += logp_t.shape[0]
        self.sum_steered += logp_t.float().exp().sum(0).double().cpu()

    def eligible(self, static_mask: torch.Tensor, min_steered_prob: float) -> torch.Tensor:
        if self.n_valid == 0:
            return torch.zeros_like(static_mask)
        return static_mask.cpu() & (self.sum_steered / self.n_valid >= min_steered_prob)

    def add_scores(self, logp_t: torch.Tensor, logp_0: torch.Tensor, eligible: torch.Tensor, k_prime: int) -> None:
        """Pass 2: logp_t, logp_0 [R, V] for R valid positions; `eligible` is the final [V] mask."""
        logp_t, logp_0 = logp_t.float(), logp_0.float()
        delta = logp_t - logp_0
        p_t = logp_t.exp()
        score = delta if self.rank_by == "delta" else torch.where(p_t > 0, p_t * delta, torch.zeros_like(delta))
        self.n_scored += logp_t.shape[0]
        self.sum_base += logp_0.exp().sum(0).double().cpu()
        self.sum_delta += delta.sum(0).double().cpu()
        self.sum_score += score.sum(0).double().cpu()
        n_eligible = int(eligible.sum())
        if n_eligible == 0:
            return
        # Excluded tokens get -inf (never a finite stand-in) and only entries above -inf are counted,
        # so with fewer than K' eligible tokens a position votes only among those.
        masked = score.masked_fill(~eligible.to(score.device), float("-inf"))
        masked = masked.nan_to_num(nan=float("-inf"), posinf=float("inf"))
        values, indices = masked.topk(min(k_prime, n_eligible), dim=-1)
        chosen = indices[values > float("-inf")]
        self.votes += torch.bincount(chosen.cpu(), minlength=self.vocab_size)

    def sum_steered_over_processes(self) -> None:
        """After pass 1 on each process's share of the prompts: the floor needs the sums over all of them."""
        if world_size() == 1:
            return
        self.n_valid = int(all_reduce_sum(torch.tensor([self.n_valid], dtype=torch.long))[0])
        self.sum_steered = all_reduce_sum(self.sum_steered)

    def sum_scores_over_processes(self) -> None:
        """After pass 2: votes and sums over all processes' positions (identical on every process)."""
        if world_size() == 1:
            return
        sums = all_reduce_sum(torch.stack([self.sum_base, self.sum_delta, self.sum_score]))
        self.sum_base, self.sum_delta, self.sum_score = sums.unbind(0)
        counts = all_reduce_sum(torch.cat([self.votes, torch.tensor([self.n_scored], dtype=torch.long)]))
        self.votes, self.n_scored = counts[:-1], int(counts[-1])

    def select(self, eligible: torch.Tensor, k: int, method: str = "vote") -> TokenSelection:
        if self.n_valid == 0:
            from ..cli import stage_options

            raise SafesteerError(
                "no valid response position: the base model predicts an end of turn at the first position of every "
                f"sample; use prompts it answers (harmless instructions) or a longer horizon "
                f"({stage_options('tokens', 'horizon')})"
            )
        n = float(self.n_scored or 1)
        mean_delta = self.sum_delta / n
        mean_score = self.sum_score / n
        if method == "vote":
            candidates = (eligible & (self.votes > 0)).nonzero().flatten().tolist()
            votes, md = self.votes.tolist(), mean_delta.tolist()
            order = sorted(candidates, key=lambda v: (-votes[v], -md[v], v))
        else:
            finite = torch.isfinite(mean_score)
            candidates = (eligible & finite).nonzero().flatten().tolist()
            ms = mean_score.tolist()
            order = sorted(candidates, key=lambda v: (-ms[v], v))
        ids = order[:k]
        return TokenSelection(
            ids=ids,
            votes=[int(self.votes[i]) for i in ids],
            mean_base_prob=[float(self.sum_base[i] / n) for i in ids],
            mean_steered_prob=[float(self.sum_steered[i] / self.n_valid) for i in ids],
            mean_delta=[float(mean_delta[i]) for i in ids],
            n_valid_positions=self.n_valid,
            n_eligible=int(eligible.sum()),
        )


def vote_tokens(logp_t: torch.Tensor, logp_0: torch.Tensor, valid_mask: torch.Tensor, eligible_mask: torch.Tensor,
                k_prime: int, k: int, min_steered_prob: float = 0.0, method: str = "vote",
                rank_by: str = "delta") -> TokenSelection:
    """The whole selection on given log-probabilities: logp_t, logp_0 [N, H, V], valid_mask [N, H],
    eligible_mask [V] (static exclusions; the floor is applied here). The stage streams the same steps."""
    stats = TokenStats(logp_t.shape[-1], rank_by)
    rows_t, rows_0 = logp_t[valid_mask], logp_0[valid_mask]
    stats.add_steered(rows_t)
    eligible = stats.eligible(eligible_mask, min_steered_prob)
    stats.add_scores(rows_t, rows_0, eligible, k_prime)
    return stats.select(eligible, k, method)


# ----------------------------------------------------------------------------- model passes


def _last_hidden(out: Any) -> torch.Tensor:
    return out.hidden_states[-1]


@torch.no_grad()
def rollout_batch(model: Any, tokenizer: Any, teacher_ctx: Callable[[], ContextManager], formatted: list[str],
                  horizon: int, samples: int, suppress_ids: Sequence[int],
                  generator: torch.Generator | Sequence[torch.Generator]) -> dict:
    """Sample H-1 tokens per (prompt, sample) from the teacher; score them under teacher and base.

    `generator`: one for the whole batch, or one per row (R of them, prompt-major), which makes each
    row's samples independent of the rest of the batch.
    Returns tokens [R, H-1], teacher_logits [R, H, V] (float32, the distributions the samples were drawn
    from plus the one after the last token), teacher_hidden / base_hidden [R, H, d] (last layer) and
    base_argmax [R, H], with R = len(formatted) * samples, prompt-major.
    """
    device = model_device(model)
    enc = tokenizer(formatted, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = positions_from_mask(mask)  # left padding must not shift models with absolute positions
    rows = ids.shape[0] * samples
    per_row = not isinstance(generator, torch.Generator)
    if per_row and len(generator) != rows:
        raise SafesteerError(f"rollout_batch got {len(generator)} generators for {rows} rows")
    n_new = horizon - 1
    suppress = torch.as_tensor(sorted(set(suppress_ids)), device=device)
    rep_mask = mask.repeat_interleave(samples, 0)
    last_pos = pos[:, -1:].repeat_interleave(samples, 0)

    def step_mask(n: int) -> torch.Tensor:  # the prompt's mask followed by n generated tokens
        return torch.cat([rep_mask, rep_mask.new_ones(rows, n)], dim=1)

    tokens = torch.empty(rows, n_new, dtype=torch.long, device=device)
    with teacher_ctx():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    output_hidden_states=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(samples)
        logits = out.logits[:, -1].float().repeat_interleave(samples, 0)
        hidden = _last_hidden(out)[:, -1].repeat_interleave(samples, 0)
        t_logits = torch.empty(rows, horizon, logits.shape[-1], dtype=torch.float32, device=device)
        t_hidden = torch.empty(rows, horizon, hidden.shape[-1], dtype=hidden.dtype, device=device)
        for j in range(horizon):
            t_logits[:, j] = logits
            t_hidden[:, j] = hidden
            if j == n_new:
                break
            # Temperature 1, top_p 1, no early stop: a plain categorical draw with end of turn removed,
            # so exactly H-1 tokens come out (as generate with min_new_tokens = max_new_tokens = H-1).
            logits.index_fill_(-1, suppress, float("-inf"))
            if per_row:  # one uniform per row and an inverse CDF, the training rollouts' sampler
                nxt = inverse_cdf_choice(logits, generator, 1.0, 1.0)[:, None]
            else:
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            tokens[:, j] = nxt[:, 0]
            del logits
            out = model(input_ids=nxt, attention_mask=step_mask(j + 1), position_ids=last_pos + j + 1,
                        past_key_values=cache, use_cache=True, output_hidden_states=True)
            logits = out.logits[:, -1].float()
            hidden = _last_hidden(out)[:, -1]
    del cache

    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=n_new > 0, logits_to_keep=1,
                output_hidden_states=True)
    b_argmax = [out.logits[:, -1].argmax(-1).repeat_interleave(samples, 0).unsqueeze(1)]
    b_hidden = [_last_hidden(out)[:, -1:].repeat_interleave(samples, 0)]
    if n_new > 0:
        cache = out.past_key_values
        cache.batch_repeat_interleave(samples)
        steps = torch.arange(1, n_new + 1, device=device).unsqueeze(0)
        out = model(input_ids=tokens, attention_mask=step_mask(n_new), position_ids=last_pos + steps,
                    past_key_values=cache, use_cache=True, output_hidden_states=True)
        b_argmax.append(out.logits.argmax(-1))
        b_hidden.append(_last_hidden(out))
        del cache
    return {
        "tokens": tokens,
        "teacher_logits": t_logits,
        "teacher_hidden": t_hidden,
        "base_hidden": torch.cat(b_hidden, dim=1),
        "base_argmax": torch.cat(b_argmax, dim=1),
    }


@torch.no_grad()
def select_safety_tokens(model: Any, tokenizer: Any, teacher_ctx: Callable[[], ContextManager], prompts: Sequence[Any],
                         config: SafetyTokenConfig | None = None, progress: bool = True) -> SafetyTokenResult:
    """Stage 2 on harmless prompts (str or Prompt; the first config.n_prompts are used).

    `teacher_ctx` is a zero-argument callable returning the context that turns the model into the
    teacher, e.g. `lambda: add_direction(model, r, layer, coeff)`. Launched with several processes,
    every process must call it with the same prompts; each samples its share and all return the same result.
    """
    from tqdm.auto import tqdm

    config = config or SafetyTokenConfig()
    texts = prompt_texts(prompts)[: config.n_prompts]
    if not texts:
        raise SafesteerError("no prompts for safety-token selection; pass harmless instructions")
    family = model_family(model)
    horizon, floor = config.resolve(family)
    samples = config.samples_per_prompt
    eot_ids = end_of_turn_ids(tokenizer, model)
    head = output_head(model)
    device = model_device(model)
    precision = resolve_generation_dtype(config.generation_dtype, model)
    t0 = time.time()

    first, stop = shard_bounds(len(texts))  # this process's prompts, by index in the full list
    formatted = dict(zip(range(first, stop), format_prompts(tokenizer, texts[first:stop]))) if stop > first else {}
    # Similar lengths per batch waste less compute on padding; the order does not change the statistics,
    # and each row's samples come from its own stream, so it does not change the samples either.
    lengths = {i: len(tokenizer(f, add_special_tokens=False)["input_ids"]) for i, f in formatted.items()}
    order = sorted(formatted, key=lambda i: (lengths[i], i))
    per_batch = max(1, config.batch_size // samples)

    vocab = 0
    stats: TokenStats | None = None
    kept_t, kept_0 = [], []
    weight_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # the vote's head dtype
    examples: list[tuple[int, dict]] = []
    bar = tqdm(total=len(order) * samples, desc="teacher samples", unit="seq",
               disable=not progress or not is_main_process())
    # The sampling pass runs in the generation dtype (cast in place once, restored for the vote below).
    with generation_precision(model, precision if order else None):
        for start in range(0, len(order), per_batch):
            idx = order[start: start + per_batch]
            generators = [torch.Generator(device=device).manual_seed(s)
                          for s in rollout_seeds(config.seed, idx, samples)]
            out = rollout_batch(model, tokenizer, teacher_ctx, [formatted[i] for i in idx], horizon, samples, eot_ids,
                                generators)
            if stats is None:
                vocab = out["teacher_logits"].shape[-1]
                stats = TokenStats(vocab, config.rank_by)
            valid = end_of_turn_valid_mask(out["base_argmax"], eot_ids)
            stats.add_steered(out["teacher_logits"][valid].log_softmax(-1))
            kept_t.append(out["teacher_hidden"][valid].to(weight_dtype))
            kept_0.append(out["base_hidden"][valid].to(weight_dtype))
            for k, i in enumerate(idx):
                examples.append((i, {"prompt": texts[i], "teacher": tokenizer.decode(out["tokens"][k * samples].tolist()),
                                     "valid_positions": int(valid[k * samples].sum())}))
            del out
            bar.update(len(idx) * samples)
    bar.close()
    if world_size() > 1:
        vocab = max(gather_objects([vocab]))  # a process left without prompts (more processes than prompts)
        stats = stats or TokenStats(vocab, config.rank_by)
    stats.sum_steered_over_processes()
    t_sample = time.time() - t0

    eligible = stats.eligible(static_eligible_mask(tokenizer, vocab), floor)
    hid_t = torch.cat(kept_t) if kept_t else torch.empty(0)
    hid_0 = torch.cat(kept_0) if kept_0 else torch.empty(0)
    del kept_t, kept_0
    chunk = 128  # positions per full-vocabulary chunk: bounds memory to a few [128, V] float32 tensors
    eligible_here = eligible.to(device)
    vote_head = packed_copy(head) or head  # thousands of rows through one frozen head: packed once on a CPU
    for s in range(0, hid_t.shape[0], chunk):
        logp_t = vote_head(hid_t[s: s + chunk]).float().log_softmax(-1)
        logp_0 = vote_head(hid_0[s: s + chunk]).float().log_softmax(-1)
        stats.add_scores(logp_t, logp_0, eligible_here, config.top_k_per_position)
    del vote_head
    stats.sum_scores_over_processes()
    selection = stats.select(eligible, config.n_tokens, config.method)
    t_total = time.time() - t0

    result = SafetyTokenResult(
        ids=selection.ids, texts=[tokenizer.decode([i]) for i in selection.ids], votes=selection.votes,
        mean_base_prob=selection.mean_base_prob, mean_steered_prob=selection.mean_steered_prob,
        mean_delta=selection.mean_delta, n_valid_positions=selection.n_valid_positions,
        n_positions=len(texts) * samples * horizon, n_eligible=selection.n_eligible, config=config, family=family,
        horizon=horizon, min_steered_prob=floor,
        timing={"sample_and_score_s": round(t_sample, 2), "vote_s": round(t_total - t_sample, 2),
                "total_s": round(t_total, 2)},
        examples=[e for _, e in sorted(gather_objects(examples), key=lambda pair: pair[0])],
    )
    # The reduced sums are the same everywhere; the main process's result (and timing) is the run's.
    return broadcast_object(result) if world_size() > 1 else result


# ----------------------------------------------------------------------------- refusal-score filter


def _refusal_scores(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    # Stage 1's score and refusal tokens, so "passes the filter" means the same thing in both stages.
    from .direction import refusal_scores, refusal_token_ids

    return refusal_scores(model, tokenizer, texts, refusal_token_ids(tokenizer)).float().cpu()


# What a user of each command can do when no prompt passes the filter: only flags that command has.
FILTER_REMEDY = {
    "tokens": "pass harmless instructions with --prompts, or --no-filter to use them as they are",
    # align takes stage 2's prompts from the built-in harmless split and has no switch for the filter.
    "align": "`safesteer align` takes them from the built-in harmless split, so try another --split-seed; a model "
             "that leans to refuse plain harmless instructions may not be instruction-tuned",
}


def filter_harmless(model: Any, tokenizer: Any, prompts: Sequence[Any], limit: int, command: str = "align") -> list[Any]:
    """The first `limit` prompts the base model does not lean to refuse (refusal score < 0).

    `command` ("align" or "tokens") picks the advice in the error raised when none passes.
    """
    scores = _refusal_scores(model, tokenizer, prompt_texts(prompts))
    kept = [p for p, s in zip(prompts, scores.tolist()) if s < 0]
    if not kept:
        raise SafesteerError("no prompt passes the harmless filter (refusal score < 0 on the base model); "
                             + FILTER_REMEDY.get(command, FILTER_REMEDY["align"]))
    return kept[:limit]


# ----------------------------------------------------------------------------- artifacts


def _prompt_record(texts: list[str]) -> dict:
    return {"n": len(texts), "sha256": sha256_texts(texts), "uids": [Prompt(t).uid for t in texts]}


def _artifact(result: SafetyTokenResult, identity: dict, direction: dict, prompts: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        "tokens": result.token_rows(),
        "n_valid_positions": result.n_valid_positions,
        "n_positions": result.n_positions,
        "n_eligible": result.n_eligible,
        "config": asdict(result.config),
        "resolved": {"family": result.family, "horizon": result.horizon, "min_steered_prob": result.min_steered_prob},
        "prompts": prompts,
        "model": identity,
        "direction": direction,
        "timing": result.timing,
        "examples": result.examples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _plot(artifact: dict, path: Path) -> None:
    """The stage's PNG: the report's safety-token panel (`report.figures.plot_safety_tokens`)."""
    from ..report.figures import plot_safety_tokens, save_png

    save_png(plot_safety_tokens(artifact), path)


def _matches(data: dict, identity: dict, direction_sha: str, prompts: dict, config: SafetyTokenConfig) -> bool:
    return (data.get("format") == FORMAT_VERSION
            and comparable_identity(data.get("model", {})) == comparable_identity(identity)
            and data.get("direction", {}).get("sha256") == direction_sha
            and data.get("prompts", {}).get("sha256") == prompts["sha256"]
            and data.get("config") == asdict(config))


def stored_token_changes(data: dict, identity: dict, direction_sha: str, prompts: dict,
                         config: SafetyTokenConfig) -> list[str]:
    """How the stored stage-2 result `data` was made differently from this run: one 'SETTING OLD -> NEW'
    line per difference in model, refusal direction, prompts and settings ([] when they match)."""
    if data.get("format") != FORMAT_VERSION:
        return [f"{JSON_NAME} format {data.get('format')} -> {FORMAT_VERSION} (made by another safesteer version)"]
    direction, used = data.get("direction") or {}, data.get("prompts") or {}
    return (changed_settings(data.get("config") or {}, asdict(config), "tokens.")
            + changed_settings(comparable_identity(data.get("model") or {}), comparable_identity(identity), "model.")
            + changed_settings({"direction.safetensors": direction.get("sha256")}, {"direction.safetensors": direction_sha})
            + changed_settings({"tokens prompts": used.get("sha256")}, {"tokens prompts": prompts["sha256"]}))


def run_token_stage(model: Any, tokenizer: Any, identity: dict, direction_dir: str | Path, out_dir: str | Path,
                    prompts: Sequence[Any], config: SafetyTokenConfig | None = None, progress: bool = True,
                    force: bool = False, on_change: Callable[[list[str]], None] | None = None) -> SafetyTokenResult:
    """Select S with the teacher stored in `direction_dir`; write (or reuse) the artifacts in `out_dir`.

    Launched with several processes, every process calls it: the main process decides on reuse and
    writes the artifacts, the others wait for them; all return the same result. A stored result made
    with another model, direction, prompts or settings is selected again, unless `on_change` is given:
    every process calls it first with the differences (`stored_token_changes`), so that `align` can stop
    instead of replacing the S its training was built on.
    """
    from .direction import DIRECTION_FILE, load_direction

    config = config or SafetyTokenConfig()
    # "auto" made concrete for this model and machine, so the artifact records (and reuse compares) what ran.
    config = replace(config, generation_dtype=effective_dtype_name(config.generation_dtype, model))
    out_dir = Path(out_dir)
    texts = prompt_texts(prompts)[: config.n_prompts]
    record = _prompt_record(texts)
    spec = load_direction(direction_dir, model)
    direction_sha = sha256_file(Path(direction_dir) / DIRECTION_FILE)
    json_path = out_dir / JSON_NAME
    reusable, changes = None, []
    if is_main_process() and json_path.is_file() and not force:
        try:
            data = read_json(json_path)
        except (OSError, ValueError, RecursionError):
            data = {}
        try:  # a damaged or hand-edited file is selected again, never reused
            if isinstance(data, dict) and on_change is not None:
                changes = stored_token_changes(data, identity, direction_sha, record, config)
            if (isinstance(data, dict) and _matches(data, identity, direction_sha, record, config)
                    and token_ids_problem(data, _vocab_size(model)) is None and SafetyTokenResult.from_json(data)):
                reusable = data
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
    # One decision for all processes: they either all return the stored result or all join the selection.
    if world_size() > 1:
        reusable, changes = broadcast_object((reusable, changes))
    if changes:
        on_change(changes)  # on every process, so that none waits for the others at a barrier
    if reusable is not None:
        result = SafetyTokenResult.from_json(reusable)
        if is_main_process() and not (out_dir / PLOT_NAME).is_file():
            _plot(reusable, out_dir / PLOT_NAME)
        barrier()
        return result
    phase("tokens")  # selecting from here (the kill -9 soak test stops runs at these announced points)
    result = select_safety_tokens(model, tokenizer, lambda: spec.teacher(model), texts, config, progress=progress)
    if is_main_process():
        direction_record = {"sha256": direction_sha, "path": str(Path(direction_dir).resolve()), "layer": spec.layer,
                            "coeff": spec.coeff, "position": spec.position}
        artifact = _artifact(result, identity, direction_record, record)
        write_json_atomic(json_path, artifact)
        _plot(artifact, out_dir / PLOT_NAME)
    barrier()  # later stages on any process read the artifact
    return result


def _vocab_size(model: Any) -> int | None:
    head = unwrap_model(model).get_output_embeddings() if model is not None else None
    return None if head is None else int(head.weight.shape[0])


def token_ids_problem(data: Any, vocab_size: int | None = None) -> str | None:
    """What makes the "tokens" of a safety_tokens.json unusable as S (None when they are fine): not a
    list of {"id": integer}, an id outside the vocabulary of `vocab_size`, a repeated id."""
    rows = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return 'it has no "tokens" list'
    ids = []
    for i, row in enumerate(rows):
        value = row.get("id") if isinstance(row, dict) else None
        if not isinstance(value, int) or isinstance(value, bool):
            return f"token {i + 1} has id {value!r}, not an integer"
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            bound = f" of {vocab_size:,}" if vocab_size is not None else ""
            return f"token {i + 1} has id {value}, outside the model's vocabulary{bound} (made for another model?)"
        ids.append(value)
    if len(set(ids)) != len(ids):
        return "it lists a token id twice"
    return None


def load_safety_tokens(out_dir: str | Path, model: Any = None) -> list[int]:
    """The ids of S from a run directory; with `model`, also checked against its vocabulary."""
    path = Path(out_dir) / JSON_NAME
    if not path.is_file():
        raise SafesteerError(f"no safety tokens in {out_dir} ({JSON_NAME} missing); run `safesteer tokens --out {out_dir}` first")
    redo = f"rerun `safesteer tokens --out {out_dir} --force`"
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise SafesteerError(f"{path} is unreadable ({type(exc).__name__}); {redo}") from None
    problem = token_ids_problem(data, _vocab_size(model))
    if problem:
        raise SafesteerError(f"{path} is not a usable set of safety tokens: {problem}; {redo}")
    ids = [r["id"] for r in data["tokens"]]
    if not ids:
        raise SafesteerError(f"{path} holds no tokens; rerun `safesteer tokens` with other settings")
    return ids


def format_token_table(result: SafetyTokenResult) -> str:
    lines = [f"{'#':>3}  {'id':>7}  {'token':<22}{'votes':>7}  {'mean p0':>9}  {'mean pt':>9}  {'delta':>7}"]
    for n, row in enumerate(result.token_rows(), 1):
        text = repr(row["text"])
        text = text if len(text) <= 20 else text[:19] + "…"
        lines.append(f"{n:>3}  {row['id']:>7}  {text:<22}{row['votes']:>7}  {row['mean_p0']:>9.2e}  "
                     f"{row['mean_pt']:>9.2e}  {row['mean_delta']:>7.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _cmd_tokens(args: argparse.Namespace) -> int:
    """stage 2: select the safety tokens S from the steered teacher

    Sample from the steered teacher on harmless prompts and keep the tokens whose probability the refusal
    direction raises most. Reuses existing results when model, direction, prompts and settings match.
    """
    from ..cli import config_values, load_model_from_args, resolve_preset
    from ..io.prompts import builtin_splits, load_prompts
    from ..io.run_dir import check_out_dir, claim_out_dir
    from .direction import load_direction

    preset = resolve_preset(args.preset, stage=True)
    config = SafetyTokenConfig.from_preset(preset, **config_values(args, SafetyTokenConfig))
    direction_dir = Path(args.direction or args.out)
    spec = load_direction(direction_dir)  # fail before loading the model
    check_out_dir(args.out)
    if args.prompts:
        prompts = load_prompts(args.prompts, field=args.field)
    else:
        # The split seed of stage 1, so "harmless-val" is the very set the direction was validated on.
        seed = args.split_seed if args.split_seed is not None else int(spec.meta.get("config", {}).get("seed", 0))
        prompts = builtin_splits(seed)["harmless"]["direction_val"]
    loaded = load_model_from_args(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    spec.check(model)  # a direction made for another model fails here, before any work
    t0 = time.time()
    if not args.no_filter:
        n_before = len(prompts)
        prompts = filter_harmless(model, tokenizer, prompts, config.n_prompts, command="tokens")
        print(f"harmless filter: {len(prompts)} prompts used ({n_before} candidates, refusal score < 0 on the base model)")
    claim_out_dir(args.out, "tokens")
    result = run_token_stage(model, tokenizer, loaded.identity, direction_dir, args.out, prompts, config,
                             force=args.force)
    print(format_token_table(result))
    print(f"preset {preset}: {len(result.ids)} safety tokens (H={result.horizon}, K'={config.top_k_per_position}, "
          f"floor {result.min_steered_prob:g}, {result.n_valid_positions}/{result.n_positions} valid positions, "
          f"{result.n_eligible} eligible tokens); selection {result.timing.get('total_s', 0):.1f} s, "
          f"command {time.time() - t0:.1f} s")
    print(f"wrote {Path(args.out) / JSON_NAME} and {Path(args.out) / PLOT_NAME}")
    return 0


def add_cli(subparsers) -> None:
    from ..cli import add_command, add_config_args

    p = add_command(subparsers, "tokens", _cmd_tokens, model=True, presets=TOKEN_PRESETS,
                    out="run directory: safety_tokens.json and .png are written here",
                    prompts={"--prompts": "harmless prompts (default: the built-in harmless validation split)"})
    p.add_argument("--direction", default=None, help="directory with direction.safetensors/.json (default: --out)")
    p.add_argument("--no-filter", action="store_true", help="skip the refusal-score filter (keep prompts as given)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the built-in prompt splits (default: the one the direction stage used)")
    p.add_argument("--force", action="store_true", help="recompute even when matching results exist")
    # Default None: an option given on the command line overrides the preset, an absent one does not.
    add_config_args(p, SafetyTokenConfig, presets=TOKEN_PRESETS, choices={"method": METHODS, "rank_by": RANK_BY})
