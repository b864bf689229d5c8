"""The representation shift: where base model, steered teacher and aligned model put benign prompts.

    representation_shift(base, tokenizer, lambda: spec.teacher(base), aligned, prompts, run_dir="runs/demo")

It needs the models themselves, so it is computed while they are loaded and written to
RUN_DIR/representation.json, which the report only plots (`figures.plot_representation`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from ..errors import SafesteerError
from ..io.prompts import prompt_texts
from ..utils import sha256_texts, write_json_atomic

REPRESENTATION_NAME = "representation.json"

REPRESENTATION_FORMAT = 1


def prompt_states(model: Any, tokenizer: Any, prompts: Sequence[Any], pool: str = "last", batch_size: int = 8,
                  context: Callable[[], ContextManager] | None = None):
    """[N, d] float64 numpy array of final-layer (post-norm) hidden states of the formatted prompts.

    pool="last": the last prompt position, where the response is decided; "mean": the mean over the
    prompt's tokens (chat template included).
    """
    return states_sharing_layers(model, tokenizer, prompts, pool, batch_size, context)["base"]


def states_sharing_layers(base_model: Any, tokenizer: Any, prompts: Sequence[Any], pool: str = "last",
                          batch_size: int = 8, base_ctx: Callable[[], ContextManager] | None = None,
                          others: dict[str, tuple[Any, Callable[[], ContextManager] | None, int]] | None = None) -> dict:
    """`prompt_states` of the base model ("base") and of each model in `others` (name -> (model, context,
    layer)), batch by batch. An other model computes what the base model (in its context) does below decoder
    layer `layer`, so its forward starts there from the base model's input to that layer (0: it runs every
    layer itself); the states are the same as from its own full forward."""
    import contextlib

    import numpy as np
    import torch

    from ..core.anatomy import format_prompts
    from ..core.forward import final_hidden_states, model_device, positions_from_mask
    from ..core.steering import recording_layer_inputs, starting_at

    if pool not in ("last", "mean"):
        raise SafesteerError(f"unknown pooling '{pool}'; use last or mean")
    others = others or {}
    device = model_device(base_model)
    formatted = format_prompts(tokenizer, prompt_texts(prompts))
    layers = sorted({layer for _, _, layer in others.values() if layer > 0})
    out: dict[str, list] = {"base": [], **{name: [] for name in others}}

    def enter(context):
        return context() if context else contextlib.nullcontext()

    def pooled(hidden, mask):
        hidden = hidden.double()
        if pool == "last":
            return hidden[:, -1].cpu().numpy()  # left padding: the last column is every prompt's last token
        m = mask.unsqueeze(-1).double()
        return ((hidden * m).sum(1) / m.sum(1)).cpu().numpy()

    with torch.no_grad():
        for start in range(0, len(formatted), batch_size):
            enc = tokenizer(formatted[start: start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            mask = enc["attention_mask"]
            # Explicit positions, so left padding does not shift models with absolute position embeddings.
            inputs = dict(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask))
            with enter(base_ctx), recording_layer_inputs(base_model, layers) as recorded:
                out["base"].append(pooled(final_hidden_states(base_model, **inputs), mask))
            for name, (model, context, layer) in others.items():
                moved = {k: v.to(model_device(model)) for k, v in inputs.items()}
                with enter(context), starting_at(model, recorded[layer] if layer > 0 else None):
                    out[name].append(pooled(final_hidden_states(model, **moved), mask))
    return {name: np.concatenate(parts, axis=0) for name, parts in out.items()}


def pca_coordinates(states: dict[str, Any], fit_on: Sequence[str], n_components: int = 2) -> tuple[dict, list[float]]:
    """Project every model's states onto the top principal components of the states named in `fit_on`."""
    import numpy as np

    fit = np.concatenate([states[name] for name in fit_on], axis=0)
    centre = fit.mean(axis=0)
    _, sing, vt = np.linalg.svd(fit - centre, full_matrices=False)
    comps = vt[:n_components]
    # A deterministic sign per component (largest loading positive), so reruns draw the same picture.
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    var = sing ** 2
    ratio = (var[:n_components] / var.sum()).tolist() if var.sum() > 0 else [0.0] * n_components
    coords = {name: ((x - centre) @ comps.T).tolist() for name, x in states.items()}
    return coords, ratio


def representation_shift(base_model: Any, tokenizer: Any, teacher_ctx: Callable[[], ContextManager] | None,
                         aligned_model: Any | None, prompts: Sequence[Any], run_dir: str | Path | None = None,
                         pool: str = "last", fit_on: str = "all", batch_size: int = 8,
                         base_ctx: Callable[[], ContextManager] | None = None, teacher_layer: int | None = None) -> dict:
    """PCA of final-layer hidden states on benign prompts for base, steered teacher and aligned model.

    `teacher_ctx` turns `base_model` into the teacher (e.g. `lambda: add_direction(base_model, r, layer)`);
    either it or `aligned_model` may be None to leave that model out. `teacher_layer`, if given, is the
    first decoder layer the teacher's context changes (the steering layer): the layers below it run once
    for base and teacher. Layers the aligned model has unchanged from the base run once too. The PCA is fitted on the states of
    all models (fit_on="all") so that a shift away from the base shows up on the axes, or on the base
    states only (fit_on="base"). Besides the coordinates, the mean distance of each model's state from
    the base state of the same prompt is recorded in the full space, relative to the spread of the base
    states, so the shift is measured, not only drawn. Written to RUN_DIR/representation.json if given.
    """
    import contextlib

    import numpy as np

    from ..core.anatomy import identical_lower_layers

    if fit_on not in ("all", "base"):
        raise SafesteerError(f"unknown fit_on '{fit_on}'; use all or base")
    texts = prompt_texts(prompts)
    if not texts:
        raise SafesteerError("no prompts for the representation shift; pass benign prompts")
    t0 = time.time()

    def both() -> ContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(base_ctx())
        stack.enter_context(teacher_ctx())
        return stack

    # Work shared with the base model's forward runs once: the teacher's layers below `teacher_layer` (its
    # steering starts there) and the aligned model's layers equal to the base's (an adapter on the upper
    # layers only). Without a base context, nothing else changes what the base model's layers compute.
    others = {}
    if teacher_ctx is not None:
        others["teacher"] = (base_model, both if base_ctx is not None else teacher_ctx, teacher_layer or 0)
    if aligned_model is not None:
        same = 0 if base_ctx is not None or aligned_model is base_model else identical_lower_layers(base_model, aligned_model)
        others["aligned"] = (aligned_model, None, same)
    states = states_sharing_layers(base_model, tokenizer, texts, pool, batch_size, base_ctx, others)
    coords, ratio = pca_coordinates(states, list(states) if fit_on == "all" else ["base"])
    base = states["base"]
    spread = float(np.linalg.norm(base - base.mean(axis=0), axis=1).mean())
    shift = {}
    for name, x in states.items():
        if name == "base":
            continue
        dist = np.linalg.norm(x - base, axis=1)
        cos = (x * base).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(base, axis=1) + 1e-12)
        shift[name] = {"mean_l2": float(dist.mean()), "relative_to_base_spread": float(dist.mean() / (spread or 1.0)),
                       "mean_cosine_to_base": float(cos.mean())}
    result = {
        "format": REPRESENTATION_FORMAT,
        "pool": pool,
        "fit_on": fit_on,
        "prompts": {"n": len(texts), "sha256": sha256_texts(texts)},
        "hidden_size": int(base.shape[1]),
        "explained_variance_ratio": ratio,
        "base_spread_l2": spread,
        "coords": coords,
        "shift": shift,
        "seconds": round(time.time() - t0, 2),
    }
    if run_dir is not None:
        write_json_atomic(Path(run_dir) / REPRESENTATION_NAME, result)
    return result
