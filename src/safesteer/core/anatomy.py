"""Where things are inside a causal LM, found generically rather than from per-family tables.

* `decoder_layers`: the list of transformer blocks (the residual stream is their input);
* `format_prompts`: the user turn rendered by the tokenizer's own chat template;
* `post_instruction_length`: how many template tokens follow the user's text
  (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`), read off the template itself;
* `end_of_turn_ids`: the tokens that close an assistant turn;
* `output_head`: the map from last-layer hidden states to logits, so that a loss can compute logits
  a chunk of positions at a time (the hidden states come from `forward.final_hidden_states`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from ..errors import SafesteerError

# Common homes of the block list; anything else is found by the structural search below.
_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "transformer.layers",
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "backbone.layers",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers causal LM under DDP/FSDP/torch.compile/PEFT wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    return model


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _num_layers(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    text = getattr(config, "text_config", None)
    return _num_layers(text) if text is not None else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order. Raises SafesteerError for an architecture we cannot steer."""
    model = unwrap_model(model)
    n = _num_layers(getattr(model, "config", None))
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and (n is None or len(layers) == n):
            return layers
    # Structural fallback: the ModuleList of identical blocks whose length matches the config.
    best = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(m) for m in module}) == 1 and (n is None or len(module) == n):
                size = sum(p.numel() for p in module.parameters())
                if best is None or size > best[0]:
                    best = (size, module)
    if best is None:
        raise SafesteerError(
            f"cannot find the decoder-layer list of {type(model).__name__}; safesteer steers decoder-only "
            f"transformers whose blocks sit in one nn.ModuleList (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, GPT-NeoX, ...)"
        )
    return best[1]


# Config entries that do not change what a layer computes (a saved fine-tune records other values).
_CONFIG_IGNORED = ("transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path")


def _computing_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    values = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
              if not k.startswith("_") and k not in _CONFIG_IGNORED}
    values["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return values


def equal_tensors(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, device, shape and values, bit for bit; two views of one storage count without being read."""
    return x is y or (x.dtype == y.dtype and x.device == y.device and x.shape == y.shape
                      and ((x.data_ptr() == y.data_ptr() and x.stride() == y.stride()) or torch.equal(x, y)))


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Same parameter and buffer names, and `equal_tensors` under each name."""
    ta = dict(a.named_parameters()) | dict(a.named_buffers())
    tb = dict(b.named_parameters()) | dict(b.named_buffers())
    return ta.keys() == tb.keys() and all(equal_tensors(ta[k], tb[k]) for k in ta)


@torch.no_grad()
def identical_lower_layers(a: nn.Module, b: nn.Module) -> int:
    """How many decoder layers, counted from the bottom, compute the same thing in `a` and `b`: the input
    embedding and each layer's parameters and buffers are equal bit for bit (same dtype and device) and the
    configs agree; 0 for different architectures. At most all layers but the last, so a forward of `b` can
    start at that layer (`core.steering.start_at_layer`) from what `a`'s lower layers wrote.

    A model fine-tuned with adapters on the upper layers only (lora_layers=from_steering, merged or not)
    shares every layer below them with its base model, so a comparison of the two (KL drift, representation
    shift) runs those layers once. Plain module calls, hooks and contexts are not seen: a caller that enters
    one (steering, a disabled adapter) on either model decides itself whether the layers still agree.
    """
    a, b = unwrap_model(a), unwrap_model(b)
    if type(a) is not type(b) or _computing_config(a) != _computing_config(b):
        return 0
    ea, eb = a.get_input_embeddings(), b.get_input_embeddings()
    if ea is None or eb is None or not _same_tensors(ea, eb):
        return 0
    la, lb = decoder_layers(a), decoder_layers(b)
    if len(la) != len(lb):
        return 0
    shared = 0
    for x, y in zip(la[:-1], lb[:-1]):
        if type(x) is not type(y) or not _same_tensors(x, y):
            break
        shared += 1
    return shared


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [.., d] -> logits [.., V], exactly as the model computes them (incl. Gemma-2 soft-capping)."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if not cap:
        return head

    def capped(hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(head(hidden) / cap) * cap

    return capped


# ----------------------------------------------------------------------------- chat template


def format_prompts(tokenizer: Any, instructions: list[str], system_prompt: str | None = None) -> list[str]:
    """Each instruction as a single user turn with the generation prompt appended.

    No system prompt of our own: templates that insert a default one (Qwen's) keep it, as the method
    specifies formatting with the model's own template.
    """
    out = []
    for text in instructions:
        messages = [{"role": "user", "content": text}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def _tokenizer_key(tokenizer: Any) -> tuple:
    return (getattr(tokenizer, "name_or_path", ""), len(tokenizer), getattr(tokenizer, "chat_template", None))


_PROBES = ("Describe a sunny day.", "What is 2 + 2?", "List three colors")


def post_instruction_length(tokenizer: Any) -> int:
    """Number of template tokens after the user's text in a formatted prompt.

    Read from the template: render probe instructions, find where the user's text ends, and count the
    tokens that start at or after that character. The minimum over probes guards against a merge of
    the last user character with the template's first token.
    """
    return _post_instruction_length_cached(_tokenizer_key(tokenizer), tokenizer)


@lru_cache(maxsize=16)
def _post_instruction_length_cached(_key: tuple, tokenizer: Any) -> int:
    counts = []
    for probe in _PROBES:
        text = format_prompts(tokenizer, [probe])[0]
        end = text.rfind(probe)
        if end < 0:
            raise SafesteerError("the chat template does not contain the user's text verbatim; cannot locate the post-instruction tokens")
        end += len(probe)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        counts.append(sum(1 for start, stop in offsets if start >= end and stop > start))
    n = min(counts)
    if n <= 0:
        raise SafesteerError("the chat template adds no tokens after the user's text; cannot pick post-instruction positions")
    return n


def end_of_turn_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """Token ids that end an assistant turn: eos ids plus the template's own turn terminator."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model is not None:
        gen = getattr(unwrap_model(model), "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    marker = "Fine, thanks"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that cannot render an assistant turn: eos ids must do
        text = ""
    at = text.rfind(marker)
    if at >= 0:
        rest = text[at + len(marker):]
        rest_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids)
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if rest_ids and (rest_ids[0] in special or rest_ids[0] in added):
            ids.add(int(rest_ids[0]))
    if not ids:
        raise SafesteerError("the tokenizer has no eos token and its chat template shows no end-of-turn token")
    return sorted(ids)
