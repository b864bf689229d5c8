"""Steering hooks as context managers: plain PyTorch hooks, never a wrapped or mutated model.

    with add_direction(model, r, layer=18):          # the safety teacher
        model.generate(...)
    with ablate_direction(model, r):                 # refusal direction removed everywhere
        model(...)

Hooks are removed on exit, also after an exception, and nest with each other and with PEFT's
`disable_adapter()` (that only toggles LoRA layers; the hooked blocks stay the same objects).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

from ..errors import SafesteerError
from .anatomy import decoder_layers, unwrap_model

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """The hidden-states input of a block, positional or keyword (transformers passes either)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], False
    raise SafesteerError("cannot find the hidden states in a decoder layer's inputs; this architecture is not supported")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor, positional: bool) -> tuple[tuple, dict]:
    if positional:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def _capture_attention_mask(model: nn.Module) -> Iterator[dict]:
    """Remember the 2-D attention mask of the current forward, so hooks can skip padding positions."""
    state: dict = {"mask": None}
    target = unwrap_model(model)

    def pre_hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    handle = target.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def _check_direction(model: nn.Module, direction: torch.Tensor) -> None:
    hidden = getattr(unwrap_model(model).config, "hidden_size", None) or getattr(unwrap_model(model).config, "n_embd", None)
    if direction.dim() != 1 or (hidden is not None and direction.shape[0] != hidden):
        raise SafesteerError(
            f"direction has shape {tuple(direction.shape)} but the model's hidden size is {hidden}; "
            f"was it extracted from another model?"
        )


def _row_coefficients(coeff: torch.Tensor, batch: int) -> torch.Tensor:
    """A [B] tensor of per-row coefficients, checked against the batch it steers, as [B, 1, 1]."""
    if coeff.dim() != 1 or coeff.shape[0] != batch:
        raise SafesteerError(f"per-row steering coefficients have shape {tuple(coeff.shape)} but the batch has "
                             f"{batch} rows; give one coefficient per row")
    return coeff[:, None, None]


@contextmanager
def add_direction(model: nn.Module, direction: torch.Tensor, layer: int,
                  coeff: float | torch.Tensor | Callable[[], torch.Tensor] = 1.0) -> Iterator[None]:
    """Add `coeff * direction` to the input of decoder layer `layer` at every non-padding position.

    `coeff` is one number for every row, a [B] tensor (row b gets coeff[b] * direction: a batch
    that mixes steered and unsteered rows), or a callable returning such a tensor when the layer runs
    (the gated teacher, whose coefficients are known only once its gate layer has run). Per-row
    coefficients hold for every forward of a `generate` (prefill and cached decoding steps alike).
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SafesteerError(f"layer {layer} is out of range for a model with {len(layers)} decoder layers")
    _check_direction(model, direction)

    with _capture_attention_mask(model) as state:
        def pre_hook(_module, args, kwargs):
            hidden, positional = hidden_of(args, kwargs)
            value = coeff() if callable(coeff) else coeff
            if isinstance(value, torch.Tensor):
                rows = _row_coefficients(value, hidden.shape[0]).to(device=hidden.device, dtype=torch.float32)
                delta = (rows * direction.to(device=hidden.device, dtype=torch.float32)).to(hidden.dtype)
            else:
                delta = (value * direction).to(device=hidden.device, dtype=hidden.dtype)
            mask = state["mask"]
            if mask is not None and mask.shape[0] == hidden.shape[0] and mask.shape[1] >= hidden.shape[1]:
                # With a KV cache the current chunk is the last T columns of the mask.
                keep = mask[:, -hidden.shape[1]:].to(hidden.dtype).unsqueeze(-1)
                hidden = hidden + keep * delta
            else:
                hidden = hidden + delta
            return _with_hidden(args, kwargs, hidden, positional)

        handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def project_out(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x - r_hat r_hat^T x, computed in the hidden's dtype."""
    unit = unit.to(device=hidden.device, dtype=hidden.dtype)
    return hidden - (hidden @ unit).unsqueeze(-1) * unit


def _named_child(block: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def attention_and_mlp(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """A decoder block's attention and MLP sub-modules, found by their usual names (None where absent)."""
    return _named_child(block, _ATTN_NAMES), _named_child(block, _MLP_NAMES)


def _residual_norms(block: nn.Module) -> list[nn.Module]:
    """Norms applied to attention/MLP outputs right before they are added to the residual stream."""
    post_ff = getattr(block, "post_feedforward_layernorm", None)
    if not isinstance(post_ff, nn.Module):
        return []  # e.g. Llama's `post_attention_layernorm` is the MLP's input norm, not an output norm
    post_attn = getattr(block, "post_attention_layernorm", None)
    return [m for m in (post_attn, post_ff) if isinstance(m, nn.Module)]


@contextmanager
def _projection_hooks(model: nn.Module, project) -> Iterator[None]:
    """Apply `project(hidden)` to every layer input and every attention and MLP output.

    Where a block normalises those outputs before adding them to the residual stream (Gemma-2/3,
    OLMo-2), the norms' outputs are projected as well, so no block writes r into the stream.
    """
    def pre_hook(_module, args, kwargs):
        hidden, positional = hidden_of(args, kwargs)
        return _with_hidden(args, kwargs, project(hidden), positional)

    def out_hook(_module, _args, output):
        if isinstance(output, torch.Tensor):
            return project(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (project(output[0]),) + tuple(output[1:])
        return output

    handles = []
    try:
        for block in decoder_layers(model):
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            attn, mlp = attention_and_mlp(block)
            if attn is None or mlp is None:
                raise SafesteerError(
                    f"cannot find the attention and MLP modules of {type(block).__name__} "
                    f"(looked for {_ATTN_NAMES} and {_MLP_NAMES}); direction ablation is not supported here"
                )
            handles.append(attn.register_forward_hook(out_hook))
            handles.append(mlp.register_forward_hook(out_hook))
            # Blocks that normalise a sub-layer's output before the residual add (Gemma-2/3, OLMo-2)
            # write the norm's output, and a per-channel norm scale rotates r back in: project that too.
            for norm in _residual_norms(block):
                handles.append(norm.register_forward_hook(out_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def ablate_direction(model: nn.Module, direction: torch.Tensor):
    """Context manager: remove the unit direction from every layer input and every attention and MLP output."""
    _check_direction(model, direction)
    unit = direction.float() / direction.float().norm()
    return _projection_hooks(model, lambda hidden: project_out(hidden, unit))


def ablate_directions_per_copy(model: nn.Module, units: torch.Tensor):
    """Context manager: `ablate_direction` with unit direction `units[k]` for copy k of a copy-major batch.

    A forward of batch B with g = len(units) copies has B // g rows per copy (the scoring of several
    candidate directions in one forward).
    """
    g = units.shape[0]

    def project(hidden: torch.Tensor) -> torch.Tensor:
        u = units if hidden.shape[0] == g else units.repeat_interleave(hidden.shape[0] // g, 0)
        u = u.to(device=hidden.device, dtype=hidden.dtype).reshape(hidden.shape[0], *([1] * (hidden.dim() - 2)), -1)
        return hidden - (hidden * u).sum(-1, keepdim=True) * u

    return _projection_hooks(model, project)


# ----------------------------------------------------------------------------- starting a forward at a layer


@dataclass
class LayerInput:
    """The residual stream entering decoder layer `layer`, as `capture_layer_input` found it.

    `output_arity` records how this model's decoder layers return: 0 for the hidden states alone,
    n for a tuple of n items with the hidden states first (None: no layer ran below `layer`).
    """

    layer: int
    hidden: torch.Tensor
    output_arity: int | None = None


class _ReachedLayer(Exception):
    """Ends a forward once the wanted layer input is known (the layers above it are not needed)."""


def capture_layer_input(model: nn.Module, layer: int, **forward_kwargs) -> LayerInput:
    """Run `model(**forward_kwargs)` only as far as decoder layer `layer` and return that layer's input.

    The input is taken before any other forward pre-hook of the layer runs (an `add_direction` on it
    does not show), so it is what the layers below wrote. Layers `layer` and above are not run. Call
    it under `torch.no_grad()` unless a gradient to the lower layers is wanted.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SafesteerError(f"layer {layer} is out of range for a model with {len(layers)} decoder layers")

    def stop(_module, _args, _kwargs):
        raise _ReachedLayer

    # Prepended first, so it runs right after the recording hook (prepended next) and before any other.
    handle = layers[layer].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        with recording_layer_inputs(model, [layer]) as found:
            try:
                model(**forward_kwargs)
            except _ReachedLayer:
                pass
    finally:
        handle.remove()
    if layer not in found:
        raise SafesteerError(f"the forward never reached decoder layer {layer}; this architecture is not supported")
    return found[layer]


def prompts_grouped(group: int, prompt_len: int, *columns: torch.Tensor) -> bool:
    """Whether the rows come in consecutive groups of `group` that agree on their first `prompt_len` columns (in
    every tensor given: ids, mask, positions), with columns left after the prompt."""
    n, width = columns[0].shape[:2]
    if not (group > 1 and n % group == 0 and 0 < prompt_len < width):
        return False
    heads = [t[:, :prompt_len] for t in columns]
    return all(torch.equal(t, t[::group].repeat_interleave(group, 0)) for t in heads)


def capture_layer_input_grouped(model: nn.Module, layer: int, group: int, prompt_len: int, input_ids: torch.Tensor,
                                attention_mask: torch.Tensor, position_ids: torch.Tensor) -> LayerInput:
    """`capture_layer_input` for rows that come in consecutive groups of `group` with the same first `prompt_len`
    columns (a training step's rollouts: G completions of each prompt), computing each prompt once.

    Each group's prompt runs once, up to `layer`, into a KV cache that is then repeated for the group's rows,
    and only the columns after the prompt run per row: a step of the default preset (4 rollouts per prompt)
    skips ~3/4 of its prompt positions. The inputs are the plain capture's up to rounding (other matrix
    shapes, the prompt's keys read from the cache). Rows not grouped so, a sequence with nothing after the
    prompt, or a model that takes no cache get the plain capture.
    """
    from transformers.cache_utils import DynamicCache

    plain = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if not prompts_grouped(group, prompt_len, input_ids, attention_mask, position_ids):
        return capture_layer_input(model, layer, **plain)
    first = slice(None, None, group)
    cache = DynamicCache()  # filled by the layers below `layer`; the capture stops the forward there
    prompt = capture_layer_input(model, layer, input_ids=input_ids[first, :prompt_len],
                                 attention_mask=attention_mask[first, :prompt_len],
                                 position_ids=position_ids[first, :prompt_len], past_key_values=cache, use_cache=True)
    if cache.get_seq_length() != prompt_len:  # the model kept no cache of its own layers: compute it plainly
        return capture_layer_input(model, layer, **plain)
    cache.batch_repeat_interleave(group)
    rest = capture_layer_input(model, layer, input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask,
                               position_ids=position_ids[:, prompt_len:], past_key_values=cache, use_cache=True)
    hidden = torch.cat([prompt.hidden.repeat_interleave(group, 0), rest.hidden], dim=1)
    return LayerInput(layer=layer, hidden=hidden, output_arity=rest.output_arity)


@contextmanager
def recording_layer_inputs(model: nn.Module, layers: Iterable[int]) -> Iterator[dict[int, LayerInput]]:
    """While open, every forward of `model` records the residual stream entering each decoder layer in
    `layers`; the dict yielded holds the last forward's, as LayerInputs another model's forward can start
    from (`start_at_layer`). Unlike `capture_layer_input` the forward runs to the end; inputs are taken
    before any other forward pre-hook of the layer runs, as there."""
    blocks = decoder_layers(model)
    wanted = sorted(set(layers))
    if any(not 0 <= i < len(blocks) for i in wanted):
        raise SafesteerError(f"layers {wanted} are out of range for a model with {len(blocks)} decoder layers")
    found: dict[int, LayerInput] = {}
    arity: dict = {}

    def record(index):
        def pre_hook(_module, args, kwargs):
            found[index] = LayerInput(layer=index, hidden=hidden_of(args, kwargs)[0],
                                      output_arity=arity.get("n") if index > 0 else None)
        return pre_hook

    def count(_module, _args, output):
        arity["n"] = len(output) if isinstance(output, tuple) else 0

    handles = [blocks[0].register_forward_hook(count)]
    handles += [blocks[i].register_forward_pre_hook(record(i), with_kwargs=True, prepend=True) for i in wanted]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


@contextmanager
def start_at_layer(model: nn.Module, start: LayerInput) -> Iterator[None]:
    """Forwards inside this context begin at decoder layer `start.layer`, from `start.hidden`.

    The model's own forward still runs (embedding, position ids, rotary tables, masks, final norm),
    so position handling and padding stay the model's; decoder layers below `start.layer` hand their
    input through without computing anything, and the input of layer `start.layer` is replaced by
    `start.hidden` before any other forward pre-hook of that layer runs, so an `add_direction` on it
    adds its direction to the substituted input exactly once, whichever context was entered first.
    The layers' `forward` is shadowed on the instances only while the context is open; on exit,
    also after an exception, the model is as before.
    """
    layers = decoder_layers(model)
    if not 0 <= start.layer < len(layers):
        raise SafesteerError(f"layer {start.layer} is out of range for a model with {len(layers)} decoder layers")
    if start.layer > 0 and start.output_arity is None:
        raise SafesteerError("the captured layer input does not say how the decoder layers return; "
                             "take it with capture_layer_input")
    arity = start.output_arity or 0

    def passthrough(*args, **kwargs):
        hidden, _ = hidden_of(args, kwargs)
        return hidden if arity == 0 else (hidden,) + (None,) * (arity - 1)

    def substitute(_module, args, kwargs):
        hidden, positional = hidden_of(args, kwargs)
        if hidden.shape != start.hidden.shape:
            raise SafesteerError(f"layer {start.layer} receives shape {tuple(hidden.shape)} but the captured input has "
                                 f"{tuple(start.hidden.shape)}; capture it from the same inputs")
        return _with_hidden(args, kwargs, start.hidden.to(hidden.device), positional)

    _missing = object()
    saved = []
    handle = None
    try:
        for block in layers[: start.layer]:
            saved.append((block, block.__dict__.get("forward", _missing)))  # e.g. accelerate's device hooks
            block.forward = passthrough
        handle = layers[start.layer].register_forward_pre_hook(substitute, with_kwargs=True, prepend=True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for block, previous in reversed(saved):
            if previous is _missing:
                del block.forward
            else:
                block.forward = previous


def scored_hidden_grouped(model: nn.Module, start: LayerInput, group: int, prompt_len: int, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          context: Callable[[slice], ContextManager] | None = None) -> torch.Tensor | None:
    """Final hidden states ([N, W - prompt_len + 1, d]) at the columns from the prompt's last one on, the
    forward beginning at `start`, each group's prompt columns run once (rows as in `capture_layer_input_grouped`).

    What a full forward from `start` gives at those columns (`train.rollout.RolloutBatch.scored_hidden`), up to
    rounding: the group's first row runs the prompt columns into a KV cache of the layers from `start.layer` up,
    the cache is repeated for the group, and the rest of the columns run per row; under autograd the gradient of
    the prompt's keys and values is the sum over the group's rows, as in the full forward. `context(rows)` is
    entered around each of the two forwards with the rows it covers (`slice(None, None, group)`, then
    `slice(None)`), e.g. a steering hook with per-row coefficients. None where the rows are not grouped so:
    run the plain forward then.
    """
    from transformers.cache_utils import DynamicCache

    if not prompts_grouped(group, prompt_len, input_ids, attention_mask, position_ids):
        return None
    context = context or (lambda rows: nullcontext())

    def forward(rows: slice, cols: slice, cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        part = LayerInput(start.layer, start.hidden[rows, cols], start.output_arity)
        with context(rows), start_at_layer(model, part):
            out = model(input_ids=input_ids[rows, cols], attention_mask=mask, position_ids=position_ids[rows, cols],
                        past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1]

    first = slice(None, None, group)
    cache = DynamicCache()
    last_prompt = forward(first, slice(None, prompt_len), cache, attention_mask[first, :prompt_len])[:, -1:]
    computed = cache.layers[start.layer] if len(cache.layers) > start.layer else None
    if computed is None or getattr(computed, "keys", None) is None or cache.get_seq_length(start.layer) != prompt_len:
        return None
    # The layers below the start were handed through and cached nothing; the cache's length (the model reads it
    # off layer 0 for positions and masks) must say the prompt is there: placeholders of its shape, never read.
    for i in range(start.layer):
        cache.update(torch.zeros_like(computed.keys), torch.zeros_like(computed.values), i)
    cache.batch_repeat_interleave(group)
    rest = forward(slice(None), slice(prompt_len, None), cache, attention_mask)
    return torch.cat([last_prompt.repeat_interleave(group, 0), rest], dim=1)


def starting_at(model: nn.Module, start: LayerInput | None) -> ContextManager:
    """`start_at_layer(model, start)`, or a context that changes nothing when `start` is None."""
    return nullcontext() if start is None else start_at_layer(model, start)
