"""Beyond the paper: the gated teacher. Steer a prompt only as much as it looks harmful.

    gate = run_gate_stage(model, tokenizer, identity, "runs/x", spec)    # fit, calibrate, measure; or reuse
    with gate.teacher(model, spec, tokenizer):                           # coeff * g(s(x)) * r, per row
        model.generate(...)

The paper's teacher adds `coeff * r` to every prompt, so a student distilled from it on harmful
prompts alone learns "refuse more", not "refuse the harmful" (method.md, "Beyond the paper"). The
gated teacher adds `coeff * g(s(x)) * r`:

* s(x), a harmfulness score, is read from the residual stream at the LAST TOKEN OF THE USER'S
  INSTRUCTION (position -(post_instruction_length + 1) of the formatted prompt), not at the template
  tokens after it: harmfulness is encoded there, apart from the refusal signal the template positions
  carry (arXiv 2507.11878). The layer is at or below the steering layer, so the gate is read in the
  same forward before the steering hook fires.
* The probe is a standardised L2-logistic regression (default) or a difference in means, fitted per
  candidate layer on harmful = AdvBench direction_train + direction_val plus their question-form
  rewrites ("Can you ...?") against benign = harmless direction_train + direction_val plus the contrast
  set's train split, plus (default, `rewrites=both`) the benign imperatives' rewrites. The rewrites
  matter: AdvBench is all imperatives, the over-refusal sets mostly questions, and a probe fitted on
  imperatives alone separates formats, not harm; with rewrites on the harmful side only, "Can you"
  itself marks harm, the held-out AUROC is 1.0 from layer 2 up on the 0.5B default and the layer it
  picks separates the benign set's paired questions poorly (AUROC 0.79 vs 0.87 with `both`).
* A seeded 20% of each side (a prompt and its rewrite on the same side) is held out. The layer with
  the best held-out AUROC on format-matched pairs (harmful vs benign questions, harmful vs benign
  imperatives; their mean) is chosen; layers within 0.002 of the best tie, and the larger held-out
  margin (the gap between the two sides' tails over the scores' spread) breaks the tie.
* g is calibrated on the held-out scores: a ramp from the score where 5% of benign prompts lie above
  it to the score where 95% of harmful prompts do, clamped to [0, 1] (CAST, arXiv 2409.05907;
  AdaSteer, arXiv 2504.09466), or a step at the first.

Separation is then measured on evaluation-only prompts, never fitted on: held-out AdvBench and
HarmBench against the edgy set's report part, the held-out harmless prompts and the contrast set's
held-out part, and format-matched: the benign questions against their paired harmful questions.

Artifacts: `gate.safetensors` (mean, scale, weight, bias of the chosen layer's probe) and `gate.json`
(layer, kind, thresholds, every layer's validation and evaluation AUROCs, mean gate value per
evaluation set, prompt hashes, model identity, steering layer and direction hash, settings).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..core.anatomy import decoder_layers, format_prompts, post_instruction_length, unwrap_model
from ..core.forward import left_padded, model_device, positions_from_mask, repeated_cache, shared_prefix_length
from ..core.steering import add_direction, hidden_of
from ..errors import SafesteerError
from ..io.models import comparable_identity, stored_result_matches
from ..io.prompts import prompt_texts, question_form, split_prompts
from ..utils import atomic_path, check_choice, help_field, read_json, sha256_texts, write_json_atomic

GATE_FILE = "gate.safetensors"
GATE_META = "gate.json"
FORMAT_VERSION = 1
PROBE_KINDS = ("logistic", "diffmean")
GATE_SHAPES = ("ramp", "step")
REWRITES = ("harmful", "both", "none")
CACHE_FILE = "gate_activations.safetensors"


@dataclass
class GateConfig:
    """How the gate is fitted and calibrated."""

    kind: str = help_field("logistic", "probe: logistic (standardised L2-logistic regression) or diffmean "
                                       "(difference in means, projected)")
    shape: str = help_field("ramp", "g(s): ramp (clamped linear between the two thresholds) or step (0/1 at the "
                                    "lower one)")
    layers: tuple[int, ...] = help_field((), "candidate layers, e.g. 8-17 (default: every layer up to the steering "
                                             "layer; higher ones are never used)")
    val_fraction: float = help_field(0.2, "fraction of each side held out for choosing the layer and calibrating")
    fpr: float = help_field(0.05, "benign held-out prompts allowed above the lower threshold (where g leaves 0)")
    tpr: float = help_field(0.95, "harmful held-out prompts above the upper threshold (where g reaches 1)")
    l2: float = help_field(1.0, "logistic: L2 penalty on the standardised weights (sklearn's C = 1 / l2)")
    rewrites: str = help_field("both", "also fit on prompts rewritten as questions (Can you ...?): both (harmful "
                                       "prompts and benign imperatives, so that the rewrite's form marks neither "
                                       "side), harmful (the harmful ones only), none")
    evaluate: bool = help_field(True, "measure the separation on evaluation-only prompts (never fitted on)")
    cache: bool = help_field(True, "keep the activations in OUT/gate_activations.safetensors (float16), so that a "
                                   "refit with other settings runs no model forward for prompts it has seen")
    batch_size: int = help_field(16, "prompts per forward")
    activation_dtype: str = help_field("auto", "dtype of the forwards that read the activations: auto (bfloat16 on a "
                                               "CPU with avx512_bf16/AMX or a CUDA device with bf16, else the model's "
                                               "own), float32, bfloat16 (the activations are kept as float16 either way)")
    seed: int = help_field(0, "seed of the built-in prompt splits and of the hold-out")

    def __post_init__(self):
        check_choice(self.rewrites, REWRITES, "rewrites")
        check_choice(self.kind, PROBE_KINDS, "gate kind")
        check_choice(self.shape, GATE_SHAPES, "gate shape")
        check_choice(self.activation_dtype, ("auto", "float32", "bfloat16"), "gate activation_dtype")
        if not 0 < self.val_fraction < 1 or not 0 < self.fpr < 1 or not 0 < self.tpr < 1:
            raise SafesteerError("val_fraction, fpr and tpr must lie in (0, 1)")
        if self.l2 <= 0 or self.batch_size < 1:
            raise SafesteerError("l2 must be > 0 and batch_size >= 1")
        self.layers = tuple(self.layers)

    def result_key(self) -> dict:
        """The settings that change the result (batch size does not)."""
        key = asdict(self)
        key.pop("batch_size")
        key.pop("cache")
        key["layers"] = list(self.layers)
        return key


# ----------------------------------------------------------------------------- the instruction token


def template_suffix(tokenizer: Any) -> list[int]:
    """The ids of the template tokens that follow the user's text (`<|im_end|>\\n<|im_start|>assistant\\n`)."""
    n_post = post_instruction_length(tokenizer)
    text = format_prompts(tokenizer, ["Tell me about the weather."])[0]
    return tokenizer(text, add_special_tokens=False)["input_ids"][-n_post:]


class _ReachedTop(Exception):
    """Ends a forward once the highest wanted layer input has been read."""


@torch.no_grad()
def instruction_states(model: nn.Module, tokenizer: Any, instructions: Sequence[Any], layers: Sequence[int],
                       batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """[N, len(layers), d] float32: the input of each decoder layer in `layers` at the last token of each
    instruction (position -(post_instruction_length + 1) of its formatted prompt).

    The layers above the highest one asked for are not run, and the template prefix all prompts share
    (system prompt, `<|im_start|>user\\n`) is run once and its KV cache reused, as the direction stage does.
    The values are read before any other forward pre-hook of a layer (an `add_direction` there does not show).
    """
    from tqdm.auto import tqdm

    blocks = decoder_layers(model)
    wanted = sorted(set(int(x) for x in layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= len(blocks):
        raise SafesteerError(f"gate layers {list(layers)} must lie in 0..{len(blocks) - 1}")
    texts = prompt_texts(instructions)
    if not texts:
        raise SafesteerError("no prompts to read the gate from")
    n_post = post_instruction_length(tokenizer)
    ids = [tokenizer(f, add_special_tokens=False)["input_ids"] for f in format_prompts(tokenizer, texts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    p = shared_prefix_length(ids, keep=n_post + 1)  # the instruction token is never inside the shared prefix
    device = model_device(model)
    prefix_cache = None
    if p:
        prefix_cache = model(input_ids=torch.tensor([ids[0][:p]], device=device), use_cache=True).past_key_values

    store: dict[int, torch.Tensor] = {}

    def make(layer: int):
        def hook(_module, args, kwargs):
            hidden, _ = hidden_of(args, kwargs)
            store[layer] = hidden[:, -(n_post + 1)].float().cpu()
            if layer == wanted[-1]:
                raise _ReachedTop
        return hook

    out = torch.empty(len(texts), len(wanted), 0)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    handles = [blocks[layer].register_forward_pre_hook(make(layer), with_kwargs=True, prepend=True) for layer in wanted]
    try:
        bar = tqdm(total=len(order), desc="gate activations", unit="prompt", disable=not progress)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            chunk, mask = left_padded([ids[i][p:] for i in rows], pad)
            chunk, mask = chunk.to(device), mask.to(device)
            kwargs: dict[str, Any] = dict(position_ids=p + positions_from_mask(mask), use_cache=False)
            if prefix_cache is not None:
                kwargs.update(past_key_values=repeated_cache(prefix_cache, len(rows)), use_cache=True)
                mask = torch.cat([torch.ones(len(rows), p, dtype=mask.dtype, device=device), mask], 1)
            store.clear()
            try:
                model(input_ids=chunk, attention_mask=mask, **kwargs)
            except _ReachedTop:
                pass
            states = torch.stack([store[layer] for layer in wanted], 1)  # [b, n_layers, d]
            if out.shape[-1] == 0:
                out = torch.empty(len(texts), len(wanted), states.shape[-1])
            out[torch.tensor(rows)] = states
            bar.update(len(rows))
        bar.close()
    finally:
        for h in handles:
            h.remove()
    index = [wanted.index(int(x)) for x in layers]
    return out[:, index]


# ----------------------------------------------------------------------------- probes and the gate


@dataclass
class Probe:
    """s(h) = ((h - mean) / scale) @ weight + bias: a logit for the logistic probe, a projection for diffmean."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        return ((h - self.mean.to(h.device)) / self.scale.to(h.device)) @ self.weight.to(h.device) + self.bias


def fit_probe(harmful: torch.Tensor, benign: torch.Tensor, kind: str = "logistic", l2: float = 1.0) -> Probe:
    """A probe separating harmful [n, d] from benign [m, d] activations (float64 fit, float32 result)."""
    x_h, x_b = harmful.double(), benign.double()
    if kind == "diffmean":
        diff = x_h.mean(0) - x_b.mean(0)
        unit = diff / diff.norm().clamp_min(1e-12)
        return Probe(((x_h.mean(0) + x_b.mean(0)) / 2).float(), torch.ones_like(unit).float(), unit.float(), 0.0)
    if kind != "logistic":
        raise SafesteerError(f"unknown gate kind '{kind}'; use one of: {', '.join(PROBE_KINDS)}")
    x = torch.cat([x_h, x_b])
    y = torch.cat([torch.ones(len(x_h)), torch.zeros(len(x_b))]).double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    with torch.enable_grad():
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, history_size=20, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum")
            loss = loss + 0.5 * l2 * (w @ w)
            loss.backward()
            return loss

        opt.step(closure)
    return Probe(mean.float(), scale.float(), w.detach().float(), float(b.detach()))


def auroc(positive: Sequence[float] | torch.Tensor, negative: Sequence[float] | torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney); NaN if a side is empty."""
    pos, neg = np.asarray(positive, dtype=np.float64).ravel(), np.asarray(negative, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        return math.nan
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # rank of each distinct value: the mean of the ranks it spans
    ranks = (starts + (counts + 1) / 2)[inverse]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass
class Gate:
    """g(s(x)) in [0, 1] from the input of decoder layer `layer` at the last token of the instruction."""

    layer: int
    probe: Probe
    low: float  # g leaves 0 here (ramp), or jumps to 1 (step)
    high: float  # g reaches 1 here (ramp)
    shape: str = "ramp"
    meta: dict = field(default_factory=dict)

    def value(self, scores: torch.Tensor) -> torch.Tensor:
        """g of harmfulness scores, float32 in [0, 1]."""
        scores = scores.float()
        lo, hi = min(self.low, self.high), max(self.low, self.high)
        if self.shape == "step" or hi - lo <= 0:
            return (scores >= (self.low if self.shape == "step" else lo)).float()
        return ((scores - lo) / (hi - lo)).clamp(0.0, 1.0)

    def of_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """g from [N, d] instruction-token states at the gate layer."""
        return self.value(self.probe.score(hidden))

    def values(self, model: nn.Module, tokenizer: Any, instructions: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
        """g of each instruction ([N], float32), from one forward up to the gate layer of `model` as it is."""
        return self.of_states(instruction_states(model, tokenizer, instructions, [self.layer], batch_size)[:, 0])

    def check(self, model: nn.Module) -> None:
        hidden = getattr(unwrap_model(model).config, "hidden_size", None)
        if hidden is not None and hidden != self.probe.weight.shape[0]:
            raise SafesteerError(f"the gate was fitted on a model with hidden size {self.probe.weight.shape[0]}, this "
                                 f"one has {hidden}; run `safesteer gate` for this model")
        if self.layer >= len(decoder_layers(model)):
            raise SafesteerError(f"the gate reads layer {self.layer}, beyond this model's layers; run `safesteer gate`")

    def teacher(self, model: nn.Module, spec: Any, tokenizer: Any) -> ContextManager:
        """The gated teacher: `gated_direction` with the steering spec's direction, layer and coefficient."""
        self.check(model)
        if hasattr(spec, "check"):
            spec.check(model)
        return gated_direction(model, spec.direction, spec.layer, self, tokenizer, getattr(spec, "coeff", 1.0))


def instruction_positions(input_ids: torch.Tensor, mask: torch.Tensor | None, suffix: Sequence[int]) -> torch.Tensor:
    """[B] position of the last token of the user's instruction in each row: the token before the first
    occurrence of the template `suffix` among the real (unmasked) tokens. -1 where a row has none."""
    n = len(suffix)
    batch, length = input_ids.shape
    if length < n + 1:
        return torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
    windows = input_ids.unfold(1, n, 1)  # [B, T - n + 1, n]
    hit = (windows == torch.as_tensor(suffix, device=input_ids.device)).all(-1)
    if mask is not None:
        hit &= mask[:, -length:].bool().unfold(1, n, 1).all(-1)
    hit[:, 0] = False  # the instruction needs at least one token before the suffix
    first = hit.float().argmax(1)
    return torch.where(hit.any(1), first - 1, torch.full_like(first, -1))


@contextmanager
def gated_direction(model: nn.Module, direction: torch.Tensor, layer: int, gate: Gate, tokenizer: Any,
                    coeff: float = 1.0) -> Iterator[None]:
    """Add `coeff * g(s(x_b)) * direction` to the input of decoder layer `layer`, row by row.

    A pre-hook at the gate layer (registered first, so at the steering layer itself it reads the input
    before the steering) finds each row's instruction token from the forward's input ids, and stores g
    for that row; the steering hook (`core.steering.add_direction` with per-row coefficients) uses it for
    every forward of the row, so under `generate` the cached decoding steps (one token each) keep the g
    of their prompt. Rows are independent: left padding and the other rows of the batch do not matter.
    A forward of several tokens must contain the template's post-instruction tokens in every row.
    Layers below `layer` are not steered; the gate reads the model as it is (adapter state included), so
    not under `core.steering.start_at_layer` (the layers it skips hand their input through unchanged).
    """
    if gate.layer > layer:
        raise SafesteerError(f"the gate reads layer {gate.layer}, above the steering layer {layer}: it would be read "
                             f"after the steering; fit it with layers up to {layer}")
    suffix = template_suffix(tokenizer)
    state: dict[str, Any] = {"ids": None, "mask": None, "g": None}
    target = unwrap_model(model)

    def capture(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["ids"] = ids if isinstance(ids, torch.Tensor) else None
        mask = kwargs.get("attention_mask")
        state["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def read_gate(_module, args, kwargs):
        hidden, _ = hidden_of(args, kwargs)
        batch, length = hidden.shape[:2]
        if length == 1 and state["g"] is not None and state["g"].shape[0] == batch:
            return  # a cached decoding step: the row's prompt was gated at its prefill
        if length == 1:
            raise SafesteerError("the gated teacher saw a decoding step whose rows are not those of its last prefill "
                                 "(continuous batching?); it needs fixed batches, e.g. transformers' generate")
        ids = state["ids"]
        if ids is None:
            raise SafesteerError("the gated teacher needs input_ids (not inputs_embeds) to find the instruction")
        positions = instruction_positions(ids, state["mask"], suffix)
        if bool((positions < 0).any()):
            raise SafesteerError("the gated teacher cannot find the end of the user's instruction (the chat template's "
                                 "post-instruction tokens) in every row of this forward")
        rows = torch.arange(batch, device=hidden.device)
        state["g"] = gate.of_states(hidden[rows, positions.to(hidden.device)])

    def coefficients() -> torch.Tensor:
        return coeff * state["g"]

    handles = [target.register_forward_pre_hook(capture, with_kwargs=True)]
    try:
        handles.append(decoder_layers(model)[gate.layer].register_forward_pre_hook(read_gate, with_kwargs=True,
                                                                                   prepend=True))
        with add_direction(model, direction, layer, coefficients):
            yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- artifacts


def save_gate(out_dir: str | Path, gate: Gate, meta: dict) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = gate.probe
    with atomic_path(out_dir / GATE_FILE) as tmp:
        save_file({"mean": p.mean.contiguous(), "scale": p.scale.contiguous(), "weight": p.weight.contiguous(),
                   "bias": torch.tensor([p.bias])}, str(tmp), metadata={"layer": str(gate.layer)})
    write_json_atomic(out_dir / GATE_META, meta)  # last: its presence marks a finished stage


def load_gate(out_dir: str | Path, model: nn.Module | None = None) -> Gate:
    """Read a gate stage's result; with `model`, also check that it fits that model."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    if not (out_dir / GATE_META).is_file() or not (out_dir / GATE_FILE).is_file():
        raise SafesteerError(f"no gate in {out_dir} (need {GATE_META} and {GATE_FILE}); run `safesteer gate --out "
                             f"{out_dir}` first")
    meta = read_json(out_dir / GATE_META)
    t = load_file(str(out_dir / GATE_FILE))
    gate = Gate(int(meta["layer"]), Probe(t["mean"], t["scale"], t["weight"], float(t["bias"][0])),
                float(meta["thresholds"]["low"]), float(meta["thresholds"]["high"]), meta["shape"], meta)
    if model is not None:
        gate.check(model)
    return gate


def direction_sha(spec: Any) -> str:
    return hashlib.sha256(spec.direction.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the stage


def _is_question(text: str) -> bool:
    return text.rstrip().endswith("?")


def gate_prompt_sets(seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(fitting sets, evaluation sets) of the built-in prompts. Nothing in the second is ever fitted on."""
    from ..io.prompts import builtin_splits

    s = builtin_splits(seed)
    fit = {"harmful": prompt_texts(s["harmful"]["direction_train"] + s["harmful"]["direction_val"]),
           "benign": prompt_texts(s["harmless"]["direction_train"] + s["harmless"]["direction_val"]
                                  + s["contrast"]["train"])}
    benign = s["benign"]["eval"]
    evaluation = {"harmful_eval": prompt_texts(s["harmful"]["eval"] + s["harmbench"]["eval"]),
                  "edgy_report": prompt_texts(s["edgy"]["report"]),
                  "harmless_eval": prompt_texts(s["harmless"]["eval"]),
                  "contrast_heldout": prompt_texts(s["contrast"]["heldout"]),
                  "benign_questions": prompt_texts(benign),
                  "benign_paired_harmful": [p.meta["harmful_version"] for p in benign]}
    return fit, evaluation


# AUROC comparisons on the evaluation sets: (name, harmful set, benign set).
EVAL_PAIRS = (("vs_edgy_report", "harmful_eval", "edgy_report"),
              ("vs_harmless_eval", "harmful_eval", "harmless_eval"),
              ("vs_contrast_heldout", "harmful_eval", "contrast_heldout"),
              ("benign_question_pairs", "benign_paired_harmful", "benign_questions"))


def _holdout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    from ..io.prompts import Prompt

    parts = split_prompts([Prompt(t) for t in texts], {"val": max(1, round(fraction * len(texts))), "fit": None}, seed)
    return [p.text for p in parts["fit"]], [p.text for p in parts["val"]]


def _cached_states(model: nn.Module, tokenizer: Any, texts: list[str], layers: list[int], identity: dict,
                   path: Path | None, batch_size: int, progress: bool, dtype: str) -> torch.Tensor:
    """`instruction_states` of `texts` with the weights in `dtype` ("float32", "bfloat16"), reading the prompts
    already in the cache at `path` (same model, dtype and layers) from it and adding the new ones to it. No cache
    (`path` None): all computed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..core.generation import generation_precision
    from ..io.prompts import Prompt

    uids = [Prompt(t).uid for t in texts]
    tag = json.dumps({**comparable_identity(identity), "activation_dtype": dtype}, sort_keys=True)
    stored, known = list(layers), {}
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            cached_layers = json.loads(meta.get("layers", "[]"))
            if meta.get("tag") == tag and set(layers) <= set(cached_layers):  # a subset of the layers: sliced
                stored = cached_layers
                known = dict(zip(json.loads(meta["uids"]), f.get_tensor("states")))
    todo = list(dict.fromkeys(t for t, u in zip(texts, uids) if u not in known))
    if todo:
        with generation_precision(model, dtype):  # cast once, restored exactly afterwards
            fresh = instruction_states(model, tokenizer, todo, stored, batch_size, progress)
        known.update(zip((Prompt(t).uid for t in todo), fresh.half()))
        if path is not None:
            with atomic_path(path) as tmp:
                save_file({"states": torch.stack(list(known.values())).contiguous()}, str(tmp),
                          metadata={"tag": tag, "layers": json.dumps(stored), "uids": json.dumps(list(known))})
    index = [stored.index(x) for x in layers]
    return torch.stack([known[u] for u in uids])[:, index].float()


AUROC_TIE = 0.002  # validation AUROCs this close count as equal: the held-out sets have ~150 prompts a side


def choose_layer(per_layer: list[dict]) -> dict:
    """The row with the best validation AUROC on format-matched pairs; ties broken by the larger margin.

    Held-out AUROC saturates at 1.0 over many layers once the two sides no longer overlap, and the first
    of them is then an arbitrary pick; the margin (the gap between the harmful side's lower tail and the
    benign side's upper tail, in units of the scores' spread) keeps measuring how far apart they are.
    """
    top = max(r["val_auroc_matched"] for r in per_layer)
    tied = [r for r in per_layer if r["val_auroc_matched"] >= top - AUROC_TIE]
    return max(tied, key=lambda r: (r["val_margin"], r["val_auroc"]))


def run_gate_stage(model: nn.Module, tokenizer: Any, identity: dict, out_dir: str | Path, spec: Any,
                   config: GateConfig | None = None, progress: bool = True, force: bool = False) -> Gate:
    """Fit, choose, calibrate and measure the gate; write OUT/gate.safetensors + OUT/gate.json.

    Reuses the artifacts in `out_dir` when the model, the prompts, the steering layer and the settings
    match. `spec` is the steering spec (its layer caps the candidate layers).
    """
    from ..core.generation import effective_dtype_name

    config = config or GateConfig()
    # "auto" is recorded (and keys the reuse check) as what it meant on this machine.
    config = replace(config, activation_dtype=effective_dtype_name(config.activation_dtype, model))
    out_dir = Path(out_dir)
    n_layers = len(decoder_layers(model))
    layers = [x for x in (config.layers or range(spec.layer + 1)) if 0 <= x <= spec.layer]
    if not layers:
        raise SafesteerError(f"no candidate gate layer at or below the steering layer {spec.layer}")
    fit_sets, eval_sets = gate_prompt_sets(config.seed)
    if not config.evaluate:
        eval_sets = {}
    hashes = {k: sha256_texts(v) for k, v in {**fit_sets, **eval_sets}.items()}
    key = {"config": config.result_key(), "layers": layers, "steering_layer": spec.layer,
           "direction_sha256": direction_sha(spec), "prompt_sha256": hashes}
    if not force and stored_result_matches(out_dir / GATE_META, (out_dir / GATE_FILE,), FORMAT_VERSION, identity,
                                           result_key=key):
        if progress:
            print(f"[gate] reusing the gate in {out_dir} (same model, prompts, steering layer and settings)")
        return load_gate(out_dir, model)

    def log(msg):
        if progress:
            print(f"[gate] {msg}", flush=True)

    t_all = time.time()
    harmful_fit, harmful_val = _holdout(fit_sets["harmful"], config.val_fraction, config.seed)
    benign_fit, benign_val = _holdout(fit_sets["benign"], config.val_fraction, config.seed)
    if config.rewrites != "none":  # a prompt's rewrite stays on its side of the hold-out
        harmful_fit = harmful_fit + [question_form(t) for t in harmful_fit]
        harmful_val = harmful_val + [question_form(t) for t in harmful_val]
    if config.rewrites == "both":
        benign_fit = benign_fit + [question_form(t) for t in benign_fit if not _is_question(t)]
        benign_val = benign_val + [question_form(t) for t in benign_val if not _is_question(t)]
    groups = {"harmful_fit": harmful_fit, "benign_fit": benign_fit, "harmful_val": harmful_val,
              "benign_val": benign_val, **eval_sets}
    log(f"activations ({config.activation_dtype}) at the last instruction token, layers {layers[0]}-{layers[-1]}, of "
        + ", ".join(f"{len(v)} {k}" for k, v in groups.items()))
    everything = [t for v in groups.values() for t in v]
    states = _cached_states(model, tokenizer, everything, layers, identity, out_dir / CACHE_FILE if config.cache else None,
                            config.batch_size, progress, config.activation_dtype)
    by_group, at = {}, 0
    for k, v in groups.items():
        by_group[k] = states[at:at + len(v)]
        at += len(v)
    t_states = time.time() - t_all

    q_h = torch.tensor([_is_question(t) for t in harmful_val])
    q_b = torch.tensor([_is_question(t) for t in benign_val])
    per_layer, probes = [], {}
    for j, layer in enumerate(layers):
        probe = fit_probe(by_group["harmful_fit"][:, j], by_group["benign_fit"][:, j], config.kind, config.l2)
        probes[layer] = probe
        s_h, s_b = probe.score(by_group["harmful_val"][:, j]), probe.score(by_group["benign_val"][:, j])
        row = {"layer": layer, "val_auroc": auroc(s_h, s_b),
               "val_auroc_questions": auroc(s_h[q_h], s_b[q_b]),
               "val_auroc_imperatives": auroc(s_h[~q_h], s_b[~q_b])}
        pooled = torch.cat([s_h, s_b]).double().std().clamp_min(1e-12)
        # Non-saturating: how far apart the tails sit (AUROC is 1 at many layers once they do not overlap).
        row["val_margin"] = float((torch.quantile(s_h.double(), 1 - config.tpr)
                                   - torch.quantile(s_b.double(), 1 - config.fpr)) / pooled)
        matched = [row["val_auroc_questions"], row["val_auroc_imperatives"]]
        row["val_auroc_matched"] = float(np.nanmean(matched)) if not all(math.isnan(x) for x in matched) else row["val_auroc"]
        for name, pos, neg in EVAL_PAIRS if eval_sets else ():
            row[name] = auroc(probe.score(by_group[pos][:, j]), probe.score(by_group[neg][:, j]))
        per_layer.append(row)
    best = choose_layer(per_layer)
    j = layers.index(best["layer"])
    probe = probes[best["layer"]]
    s_h, s_b = probe.score(by_group["harmful_val"][:, j]), probe.score(by_group["benign_val"][:, j])
    low = float(torch.quantile(s_b.double(), 1 - config.fpr))
    high = float(torch.quantile(s_h.double(), 1 - config.tpr))
    gate = Gate(best["layer"], probe, low, high, config.shape)
    g_val = {"harmful_val": gate.value(s_h), "benign_val": gate.value(s_b)}
    mean_g = {k: float(v.mean()) for k, v in g_val.items()}
    for k in eval_sets:
        mean_g[k] = float(gate.of_states(by_group[k][:, j]).mean())
    if gate.low > gate.high:
        log(f"warning: the calibration thresholds cross (benign {1 - config.fpr:.0%} quantile {low:.3f} > harmful "
            f"{1 - config.tpr:.0%} quantile {high:.3f}): the ramp runs between them the other way round")
    meta = {
        "format": FORMAT_VERSION,
        "beyond_paper": "gated teacher (method.md, Beyond the paper)",
        "layer": gate.layer,
        "position": "last token of the user's instruction: -(post_instruction_length + 1)",
        "post_instruction_length": post_instruction_length(tokenizer),
        "kind": config.kind,
        "shape": config.shape,
        "thresholds": {"low": low, "high": high, "benign_val_fpr": config.fpr, "harmful_val_tpr": config.tpr},
        "chosen_by": f"validation AUROC on format-matched pairs (mean of questions and imperatives); layers within "
                     f"{AUROC_TIE} of the best are ties, broken by the validation margin",
        "chosen": best,
        "per_layer": per_layer,
        "mean_gate": mean_g,
        "steering_layer": spec.layer,
        "n_layers": n_layers,
        "direction_sha256": key["direction_sha256"],
        "prompt_counts": {k: len(v) for k, v in groups.items()},
        "prompt_sha256": hashes,
        "identity": identity,
        "config": {**asdict(config), "layers": list(config.layers)},
        "result_key": key,
        "timings": {"activations_s": round(t_states, 2), "total_s": round(time.time() - t_all, 2)},
    }
    gate.meta = meta
    save_gate(out_dir, gate, meta)
    log(f"done in {meta['timings']['total_s']:.0f} s")
    return gate


def format_gate_report(meta: dict) -> str:
    """Every candidate layer's AUROCs (validation, then evaluation-only) and the chosen gate, as a text table."""
    cols = ["val_auroc", "val_auroc_questions", "val_auroc_imperatives", "val_auroc_matched"]
    cols += [name for name, _, _ in EVAL_PAIRS if name in meta["per_layer"][0]]
    heads = ["layer", "val", "val_q", "val_imp", "val_matched"] + [c.replace("_", " ") for c in cols[4:]]
    lines = ["  ".join(f"{h:>12}" for h in heads)]
    for row in meta["per_layer"]:
        mark = "*" if row["layer"] == meta["layer"] else " "
        lines.append("  ".join([f"{str(row['layer']) + mark:>12}"] + [f"{row[c]:>12.3f}" for c in cols]))
    t = meta["thresholds"]
    lines.append(f"chosen: layer {meta['layer']} ({meta['kind']}, {meta['shape']}); g = 0 below {t['low']:.3f} "
                 f"(benign val FPR {t['benign_val_fpr']:g}), 1 above {t['high']:.3f} (harmful val TPR {t['harmful_val_tpr']:g})")
    lines.append("mean g: " + ", ".join(f"{k} {v:.2f}" for k, v in meta["mean_gate"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _cmd_gate(args: argparse.Namespace) -> int:
    """beyond the paper: fit the gated teacher's harmfulness gate (needs the direction stage in --out)

    A probe on the residual stream at the last token of the user's instruction, per candidate layer up to the
    steering layer; the layer with the best held-out AUROC on format-matched prompts is chosen and g is
    calibrated on held-out prompts. Prints every layer's separation on evaluation-only prompts. Reruns with
    the same model, prompts, direction and settings reuse the stored result.
    """
    from ..cli import config_values, load_model_from_args
    from ..io.run_dir import check_out_dir, claim_out_dir
    from .direction import load_direction

    config = GateConfig(**{k: v for k, v in config_values(args, GateConfig).items() if v is not None})
    check_out_dir(args.out)  # before loading the model
    loaded = load_model_from_args(args)
    spec = load_direction(args.direction or args.out, loaded.model)
    claim_out_dir(args.out, "gate")
    gate = run_gate_stage(loaded.model, loaded.tokenizer, loaded.identity, args.out, spec, config, force=args.force)
    print(format_gate_report(gate.meta))
    print(f"artifacts: {Path(args.out) / GATE_FILE}, {Path(args.out) / GATE_META}")
    return 0


def add_cli(subparsers) -> None:
    from ..cli import add_command, add_config_args

    p = add_command(subparsers, "gate", _cmd_gate, model=True,
                    out="stage directory with direction.json (gate.safetensors and gate.json are written there)")
    p.add_argument("--direction", default=None, metavar="DIR",
                   help="read the refusal direction from DIR instead of --out")
    p.add_argument("--force", action="store_true", help="recompute even if a matching result exists")
    add_config_args(p, GateConfig)
