"""Batched generation with left padding, exact completion boundaries and resumable JSONL output.

Precision: `GenerationConfig.dtype` is the dtype the weights generate in. "auto" generates in bfloat16
where the hardware has fast bf16 matrix units (avx512_bf16 or AMX on a CPU, a CUDA device with bf16)
and the model is stored in float32, else in the model's own dtype; None always uses the model's own.
The cast is done in place for the duration of the call and undone exactly afterwards
(`generation_precision`): the original float32 tensors are kept and put back, so hooks (steering),
PEFT adapter switches and later float32 work see the same module objects and the same weights.

Engine: greedy answers go through `greedy_continuous`, a continuous-batching loop over transformers'
dynamic KV cache: an answer that ends leaves the batch and a waiting prompt takes its place, so the
batch does not keep stepping on behalf of its longest answer (a refusal ends after ~13 tokens, a
compliant answer runs to the limit). Sampled answers use transformers' `generate` on fixed batches.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import SafesteerError
from ..io.prompts import Prompt
from ..utils import append_jsonl, read_jsonl
from .anatomy import end_of_turn_ids, format_prompts
from .forward import model_device
from .prepack import prepack_linears


GENERATION_DTYPES = ("auto", "float32", "bfloat16")
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def fast_bf16(device: Any = None) -> bool:
    """True where bf16 matrix products are fast: a CUDA device with bf16, or a CPU with avx512_bf16 or AMX."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _float_dtype(model: Any) -> torch.dtype:
    """The dtype most of the model's floating-point weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def resolve_generation_dtype(setting: str | None, model: Any) -> torch.dtype | None:
    """The dtype to generate in, or None for the model's own. "auto": bf16 for a float32 model on fast-bf16
    hardware; a model already stored in half precision keeps its dtype (never cast fp16 to bf16)."""
    if setting is None:
        return None
    if setting == "auto":
        from .forward import model_device

        return torch.bfloat16 if _float_dtype(model) == torch.float32 and fast_bf16(model_device(model)) else None
    if setting not in _DTYPE_NAMES:
        raise SafesteerError(f"unknown generation dtype '{setting}'; use one of: {', '.join(GENERATION_DTYPES)}")
    return _DTYPE_NAMES[setting]


def effective_dtype_name(setting: str | None, model: Any) -> str:
    """What `setting` means for this model, as a name: "bfloat16" or "float32" (recorded with the outputs)."""
    dtype = resolve_generation_dtype(setting, model) or _float_dtype(model)
    return str(dtype).replace("torch.", "")


def _contiguous_input(_module: Any, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def contiguous_head_input(model: Any) -> Any:
    """Make the output head's input contiguous; returns the hook handle (`.remove()` undoes it).

    transformers applies the head to `hidden[:, -k:]` (logits_to_keep), a strided view when the forward
    covers more than k positions (a prompt's prefill). On a CPU, bf16 `linear` of a strided 3-D input
    with a weight that does not require grad (frozen: PEFT's base weights, a sampling copy) falls back
    to a batched product that copies the [d, V] weight once per row: 4 s instead of 20 ms for 8 rows
    of the default model. A contiguous input takes the plain matrix product.
    """
    from .anatomy import unwrap_model

    return unwrap_model(model).get_output_embeddings().register_forward_pre_hook(_contiguous_input)


@contextlib.contextmanager
def generation_precision(model: Any, dtype: torch.dtype | str | None):
    """Run the model's floating-point parameters in `dtype` inside the block, exactly restored afterwards.

    Casts in place (`param.data`), so the module objects, and every hook or adapter switch bound to
    them, stay the same; tied weights are cast once. Buffers (rotary frequencies) keep their dtype, as
    loading a model in bf16 leaves them. Linear layers on a CPU run with prepacked weights inside the
    block (`core.prepack`: bit-identical outputs in bf16, float32 rounding apart in float32). Not for sharded
    (FSDP/ZeRO) weights. Peak memory: the original weights plus their cast copy. Yields whether anything
    was cast.
    """
    if isinstance(dtype, str):
        dtype = _DTYPE_NAMES.get(dtype) or resolve_generation_dtype(dtype, model)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    seen: set[int] = set()
    if dtype is not None:
        for p in model.parameters():
            if id(p) in seen or not p.is_floating_point() or p.dtype == dtype:
                continue
            seen.add(id(p))
            saved.append((p, p.data))
    head_hook = contiguous_head_input(model) if saved else None
    packed = None
    try:
        with torch.no_grad():
            for p, data in saved:
                p.data = data.to(dtype)
        # Linear layers on a CPU multiply with weights reordered once for oneDNN (core.prepack: faster; bf16 gives
        # the same results, float32 the same up to rounding); cast copies are emptied meanwhile, originals put back below.
        packed = prepack_linears(model)
        yield bool(saved)  # True when something was cast
    finally:
        if packed is not None:
            packed.undo(restored_elsewhere=[p for p, _ in saved])
        if head_hook is not None:
            head_hook.remove()
        for p, data in saved:
            p.data = data


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64  # the paper's evaluation length
    do_sample: bool = False  # greedy by default: reproducible evaluation
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    num_samples: int = 1  # completions per prompt (sampled runs)
    # Weights' dtype while generating: None = the model's own, "auto" / "float32" / "bfloat16" (see the
    # module docstring). `generate_responses` records the resolved name ("bfloat16", "float32").
    dtype: str | None = None
    # Greedy answers: "continuous" batching (`greedy_continuous`: finished rows make room for waiting
    # prompts) or "generate" (transformers' generate on fixed batches, which step until the longest
    # answer ends). Sampled runs always use "generate". Models whose cache is not a plain per-layer
    # key/value cache fall back to "generate".
    engine: str = "continuous"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SafesteerError("max_new_tokens must be >= 1")
        if self.batch_size < 1:
            raise SafesteerError("batch_size must be >= 1")
        if self.num_samples > 1 and not self.do_sample:
            raise SafesteerError("num_samples > 1 needs sampling; pass --sample (greedy gives identical copies)")
        if self.do_sample and self.temperature <= 0:
            raise SafesteerError("temperature must be > 0 when sampling")
        if self.engine not in ("continuous", "generate"):
            raise SafesteerError(f"unknown generation engine '{self.engine}'; use continuous or generate")
        if self.dtype is not None and self.dtype != "auto" and self.dtype not in _DTYPE_NAMES:
            raise SafesteerError(f"unknown generation dtype '{self.dtype}'; use one of: {', '.join(GENERATION_DTYPES)}")

    def resolved(self, model: Any) -> "GenerationConfig":
        """This config with `dtype` made concrete for `model` ("bfloat16" or "float32"), so that keys and
        recorded settings say what actually ran."""
        from dataclasses import replace

        return replace(self, dtype=effective_dtype_name(self.dtype, model))

    def key(self, fingerprint: str | None = None) -> str:
        """What answers made with these settings (and, given, the weights' `fingerprint`) are filed under."""
        values = asdict(self) | ({"model_fingerprint": fingerprint} if fingerprint is not None else {})
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class GenerationStats:
    """What one `generate_responses` call did (rows reused from its output file are not counted)."""

    generated: int  # rows generated by this call
    new_tokens: int  # completion tokens of those rows
    seconds: float  # wall-clock of the generation loop


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


def _shared_prompt_cache(model: Any, enc: dict, group: int) -> Any:
    """The KV cache of every prompt but its last token, computed once per group of `group` identical
    consecutive rows and repeated for the group's rows; None where that does not apply (rows differ,
    a one-token prompt, several processes, a cache other than transformers' DynamicCache).

    `generate` then runs only each row's last prompt token and what follows. The prefix goes through
    the model's body (no output head), so hooks on the causal LM's output see only generate's steps.
    """
    from transformers.cache_utils import DynamicCache

    from ..parallel import world_size
    from .anatomy import unwrap_model
    from .forward import positions_from_mask

    ids, mask = enc["input_ids"], enc["attention_mask"]
    if group < 2 or ids.shape[0] % group or ids.shape[1] < 2 or world_size() > 1:
        return None
    first_ids, first_mask = ids[::group], mask[::group]
    if not (torch.equal(ids, first_ids.repeat_interleave(group, 0))
            and torch.equal(mask, first_mask.repeat_interleave(group, 0))):
        return None
    body = getattr(unwrap_model(model), "base_model", None)
    if body is None or body is unwrap_model(model):
        return None
    out = body(input_ids=first_ids[:, :-1], attention_mask=first_mask[:, :-1],
               position_ids=positions_from_mask(first_mask)[:, :-1], use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if not isinstance(cache, DynamicCache):
        return None
    cache.batch_repeat_interleave(group)
    return cache


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, formatted: list[str], config: GenerationConfig,
                   eot_ids: Sequence[int] | None = None, context: Callable[[], ContextManager] | None = None,
                   rows_per_prompt: int = 1) -> dict:
    """Generate for one batch of already-formatted prompts.

    With `rows_per_prompt` > 1 (rollouts: each prompt repeated that many times in consecutive rows) the
    prompt is encoded once per group and its KV cache shared by the group's rows.
    Returns sequences [B, P+N], prompt_len P, the completion mask [B, N], decoded responses and the
    number of completion tokens each.
    """
    from .sampling import active_row_sampler

    eot_ids = list(eot_ids or end_of_turn_ids(tokenizer, model))
    device = model_device(model)
    enc = tokenizer(formatted, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eot_ids)
    row_sampler = active_row_sampler(model) if config.do_sample else None
    if row_sampler is not None:
        # Per-row seeded sampling (core.sampling.seeded_sampling): the processor draws each row's token
        # from its own stream and leaves only that token, so the greedy pick is the sample.
        from transformers import LogitsProcessorList

        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                      logits_processor=LogitsProcessorList([row_sampler]))
    elif config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with generation_precision(model, resolve_generation_dtype(config.dtype, model)), \
            (context() if context else contextlib.nullcontext()):
        cache = _shared_prompt_cache(model, enc, rows_per_prompt)
        if cache is not None:
            kwargs["past_key_values"] = cache
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
                       desc: str = "generating", extra: dict | None = None,
                       progress: bool = True, fingerprint: str | None = None) -> tuple[list[dict], GenerationStats]:
    """Answer every prompt (num_samples times); resumable when `out_path` is given.

    Rows already in `out_path` with the same prompt, sample index and settings are reused, so a
    rerun after a crash only does what is missing. Each finished batch is appended (and fsynced).
    Returns the rows for `prompts` in input order (sample-major within a prompt) and what this call
    generated.

    With `fingerprint` (of the model's weights, `eval.suites.model_fingerprint`), `out_path` holds the
    answers of one model with one set of settings, as `safesteer generate` writes it: the fingerprint is
    part of the key, and a file with rows of another model or other settings is refused with one line
    naming the difference, never reused or added to. Without it (evaluation folders, whose model.json
    guards the model) rows of other settings stay in the file and are ignored.
    """
    if not prompts:
        raise SafesteerError("no prompts to generate for")
    config = config.resolved(model)  # the dtype that runs, by name: part of the key and of the recorded settings
    key = config.key() if fingerprint is None else config.key(fingerprint)
    settings = asdict(config) | (extra or {}) | ({"model_fingerprint": fingerprint} if fingerprint else {})
    done: dict[tuple[str, int], dict] = {}
    if out_path is not None:
        rows = read_jsonl(out_path) if fingerprint is None else _answers_of_one_run(Path(out_path), key, settings)
        for row in rows:
            if row.get("settings_key") == key:
                done[(row["prompt_uid"], row["sample"])] = row
    todo = [(p, s) for p in prompts for s in range(config.num_samples) if (p.uid, s) not in done]
    eot_ids = end_of_turn_ids(tokenizer, model)
    # Similar lengths in a batch waste less compute on padding.
    lengths = {p.uid: len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p, _ in todo}
    todo.sort(key=lambda item: lengths[item[0].uid])
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, unit="resp")
    t0 = time.time()
    # Cast (and prepack) once for all batches; nothing at all when every answer is already there.
    with generation_precision(model, config.dtype) if todo else contextlib.nullcontext():
        new_tokens = _generate_todo(model, tokenizer, todo, config, key, settings, done, eot_ids, context, out_path, bar)
    bar.close()
    stats = GenerationStats(generated=len(todo), new_tokens=new_tokens, seconds=time.time() - t0)
    return [done[(p.uid, s)] for p in prompts for s in range(config.num_samples)], stats


def _answers_of_one_run(path: Path, key: str, settings: dict) -> list[dict]:
    """The rows of a `safesteer generate` output file, refused with one line unless every row was made by
    the same model with the same settings (`key`): a rerun resumes it, another model or setting never
    reuses it. A missing file has no rows."""
    from ..io.run_dir import changed_settings, summarize_changes

    fix = f"choose a new --out (or delete {path} to start over)"
    try:
        # Every line an object: read_jsonl forgives a torn last line (a crash mid-append), not a file of text.
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        rows = read_jsonl(path)
    except (OSError, ValueError) as exc:  # a folder, binary data, a line that is not JSON
        raise SafesteerError(f"--out {path} is not a safesteer answers file ({type(exc).__name__}); {fix}") from None
    texts = [n for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("{")]
    bad = texts[:1] or [n for n, row in enumerate(rows, 1) if not isinstance(row, dict)
                        or not isinstance(row.get("settings"), dict) or "prompt_uid" not in row][:1]
    if bad:
        raise SafesteerError(f"--out {path} is not a safesteer answers file (line {bad[0]} is no answer row); {fix}")
    for row in rows:
        if row.get("settings_key") == key:
            continue
        before = row["settings"]
        shown = [k for k in settings if k not in ("model", "model_fingerprint")]
        changes = changed_settings({k: before.get(k) for k in shown}, {k: settings[k] for k in shown})
        if before.get("model_fingerprint") != settings.get("model_fingerprint"):
            weights = before.get("model_fingerprint") or "not recorded"
            changes.insert(0, f"model {before.get('model')} (weights {weights}) -> {settings.get('model')} "
                              f"(weights {settings.get('model_fingerprint')})")
        changes = changes or [f"settings key {row.get('settings_key')} -> {key}"]  # a field no longer recorded
        raise SafesteerError(f"{path} holds answers made with another model or other settings "
                             f"({summarize_changes(changes)}); rerun with the earlier model and settings to resume "
                             f"it, or {fix}")
    return rows


class _Unsupported(Exception):
    """The model's KV cache is not a plain per-layer key/value cache: use transformers' generate."""


def _plain_layers(cache: Any) -> list:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise _Unsupported(type(cache).__name__)
    return layers


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _prefix_cache(model: Any, prefix: list[int], device: Any) -> Any:
    """The KV cache of `prefix` (one row), run through the whole model like any prompt; _Unsupported for a
    cache other than transformers' plain DynamicCache."""
    ids = torch.tensor([prefix], device=device)
    m = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=m, position_ids=torch.arange(len(prefix), device=device)[None],
                use_cache=True, logits_to_keep=1)
    _plain_layers(out.past_key_values)
    return out.past_key_values


@torch.no_grad()
def greedy_continuous(model: Any, tokenizer: Any, formatted: Sequence[str], max_new_tokens: int, batch_size: int,
                      eot_ids: Sequence[int], on_done: Callable[[int, list[int], bool], None]) -> None:
    """Greedy decoding with continuous batching: finished rows leave the batch and waiting prompts take
    their places, so the batch stays full instead of stepping on until its longest answer ends.

    Each prompt's answer is exactly what greedy `generate` gives it (same tokens up to rounding of the
    batched arithmetic, which in float32 does not change an argmax in practice). `on_done(i, ids,
    finished)` is called when prompt i is done: its completion ids up to and including the first
    end-of-turn token (finished True), or max_new_tokens ids. Positions count real tokens only, so
    rows padded to different widths share the cache; an all-padding prefix of the cache is dropped as
    rows leave. Raises _Unsupported, before any on_done call, for caches other than transformers'
    plain DynamicCache (sliding-window or recurrent layers).

    The tokens every prompt starts with (the chat template's system turn: 24 of the default model's
    ~43 prompt tokens) run once, and each admitted group's prefill starts from a copy of their cache:
    half the prefill work. Every hook still sees whole forwards of the model (prefix and suffix
    passes included), with the 2-D attention mask covering the cache's columns.
    """
    from collections import deque

    from .forward import left_padded, positions_from_mask, repeated_cache, shared_prefix_length

    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eot_set = {int(t) for t in eot_ids}
    ids_of = [tokenizer(f, add_special_tokens=False)["input_ids"] for f in formatted]
    n_prefix = shared_prefix_length(ids_of, keep=1)
    prefix_cache = _prefix_cache(model, ids_of[0][:n_prefix], device) if n_prefix else None
    pending = deque(range(len(formatted)))
    refill_at = max(1, batch_size // 4)  # admit new prompts once this many places are free
    rows: list[int] = []  # prompt index of each active row
    outs: list[list[int]] = []
    cache = mask = last = pos = None  # cache holds every token before `last`; mask covers the cache's columns

    def admit(take: list[int]) -> None:
        nonlocal cache, mask, last, pos
        # Each row: [shared prefix][left padding][rest of its prompt]; positions count real tokens only.
        ids, m = left_padded([ids_of[i][n_prefix:] for i in take], pad)
        ids, m = ids.to(device), m.to(device)
        positions, past = n_prefix + positions_from_mask(m), None
        if prefix_cache is not None:
            past = repeated_cache(prefix_cache, len(take))
            m = torch.cat([m.new_ones(len(take), n_prefix), m], dim=1)
        out = model(input_ids=ids, attention_mask=m, position_ids=positions, past_key_values=past, use_cache=True,
                    logits_to_keep=1)
        new_layers = _plain_layers(out.past_key_values)
        first = out.logits[:, -1].argmax(-1)
        new_pos = m.sum(1)
        if cache is None:
            cache, mask, last, pos = out.past_key_values, m, first, new_pos
        else:
            t_old, t_new = mask.shape[1], m.shape[1]
            width = max(t_old, t_new)
            for old_layer, new_layer in zip(_plain_layers(cache), new_layers):
                for name in ("keys", "values"):
                    merged = torch.cat([_left_pad(getattr(old_layer, name), width - t_old, -2),
                                        _left_pad(getattr(new_layer, name), width - t_new, -2)], dim=0)
                    setattr(old_layer, name, merged)
            mask = torch.cat([_left_pad(mask, width - t_old, 1), _left_pad(m, width - t_new, 1)], dim=0)
            last, pos = torch.cat([last, first]), torch.cat([pos, new_pos])
        rows.extend(take)
        outs.extend([t] for t in first.tolist())

    def retire() -> None:
        nonlocal cache, mask, last, pos
        done = {r for r, o in enumerate(outs) if o[-1] in eot_set or len(o) >= max_new_tokens}
        if not done:
            return
        for r in sorted(done):
            on_done(rows[r], outs[r], outs[r][-1] in eot_set)
        keep = [r for r in range(len(rows)) if r not in done]
        rows[:], outs[:] = [rows[r] for r in keep], [outs[r] for r in keep]
        if not keep:
            cache = mask = last = pos = None
            return
        index = torch.tensor(keep, device=device)
        mask, last, pos = mask[index], last[index], pos[index]
        start = int((mask.sum(0) > 0).nonzero()[0])  # columns no remaining row attends to
        for layer in _plain_layers(cache):
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        mask = mask[:, start:]

    while pending or rows:
        free = batch_size - len(rows)
        if pending and (not rows or free >= refill_at):
            admit([pending.popleft() for _ in range(min(free, len(pending)))])
            retire()  # an answer can end with its first token
            continue
        step_mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=last[:, None], attention_mask=step_mask, position_ids=pos[:, None],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        mask, last, pos = step_mask, out.logits[:, -1].argmax(-1), pos + 1
        for o, t in zip(outs, last.tolist()):
            o.append(t)
        retire()


def _generate_continuous(model, tokenizer, todo, config, key, settings, done, eot_ids, context, out_path, bar) -> int:
    """Greedy answers for `todo` with `greedy_continuous`; rows are appended to the output as they finish."""
    state = {"tokens": 0, "t0": time.time()}
    finished_rows: list[dict] = []

    def on_done(i: int, ids: list[int], finished: bool) -> None:
        p, s = todo[i]
        text = tokenizer.decode([t for t in ids if t not in eot_ids], skip_special_tokens=True)
        row = {"prompt": p.text, "prompt_uid": p.uid, "sample": s, "source": p.source, "category": p.category,
               "response": text, "n_tokens": len(ids), "finished": finished, "settings_key": key, "settings": settings}
        done[(p.uid, s)] = row
        finished_rows.append(row)
        state["tokens"] += len(ids)
        if len(finished_rows) >= max(1, config.batch_size // 4):
            flush()

    def flush() -> None:
        if out_path is not None and finished_rows:
            append_jsonl(out_path, finished_rows)
        bar.update(len(finished_rows))
        bar.set_postfix(tok_s=f"{state['tokens'] / max(time.time() - state['t0'], 1e-9):.1f}")
        finished_rows.clear()

    with (context() if context else contextlib.nullcontext()):
        greedy_continuous(model, tokenizer, format_prompts(tokenizer, [p.text for p, _ in todo]), config.max_new_tokens,
                          config.batch_size, eot_ids, on_done)
    flush()
    return state["tokens"]


def _generate_todo(model, tokenizer, todo, config, key, settings, done, eot_ids, context, out_path, bar) -> int:
    if not config.do_sample and config.engine == "continuous":
        try:
            return _generate_continuous(model, tokenizer, todo, config, key, settings, done, eot_ids, context,
                                        out_path, bar)
        except _Unsupported:
            pass  # nothing was generated yet: transformers' generate below
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
    return new_tokens
