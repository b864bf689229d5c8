"""Linear layers on a CPU, with their weights prepacked once for oneDNN, for no-grad work.

    with prepacked_linears(model):                   # inside generation_precision: automatic
        model.generate(...)                          # the same answers, faster at small batches
    handle = prepack_linears(copy, skip=trained)     # a persistent sampling copy (train.rollout)

Why: on a CPU a bf16 `linear` hands its weight to oneDNN, which reorders it into a blocked layout on
every call. At the batch sizes of generation (one new token per row) that reorder costs as much as
the product: on the default model's MLP ([8, 896] x [896, 4864]) 0.37 ms plain against 0.19 ms with
the weight reordered once; on its output head ([8, 896] x [896, 151936]) ~20 ms against 12 ms. The
prepacked product is oneDNN's own kernel on the same layout, i.e. the same arithmetic in the same
order: in bf16 its outputs are bit-identical to the plain call's (tests/core/test_prepack.py checks
that on a model). A float32 `linear` goes to MKL's sgemm instead, which on these cores is slower than
oneDNN at generation's row counts ([1, 896] x [896, 4864]: 1.28 against 0.50 ms; 16 rows: 2.3
against 1.6 ms) and as fast at thousands of rows ([3500, 896] x [896, 4864]: 178 against 175 ms):
packed float32 layers take oneDNN's kernel, as precise but summing in another order, so their
outputs differ from MKL's at float32 rounding (~1e-6 relative); float32 greedy generation of the
default model ran 1.7-2x faster with them. torch.compile's CPU freezing does the same reorder; this
is that one step without compiling.

Only plain `nn.Linear` modules with a bf16 or float32 weight on the CPU are packed (`skip` names
layers a caller still updates while packed, e.g. a LoRA adapter synced into a sampling copy). A
packed layer's own weight tensor is emptied while packed, so the weights are not held twice; a
weight another module shares (a head tied to the input embedding) is packed and left in place.
Undoing puts every weight back (from the packed copy, bit for bit) except those the caller restores
itself (`generation_precision` puts the float32 originals back).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def prepack_available() -> bool:
    """Whether this torch build has oneDNN's linear-weight reorder (CPU builds with mkldnn do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.zeros(4, 4, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=torch.bfloat16), packed, None, "none", [], "")
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packable(module: nn.Module) -> bool:
    """A plain linear layer with a bf16 or float32 weight on the CPU (subclasses, e.g. quantised layers, excluded).

    Packed layers have no backward: pack only for no-grad work (generation, scoring forwards)."""
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    # Plain tensors of the layer's own shape only: FSDP2 holds DTensor shards, FSDP1 flattens or frees weights.
    return (type(w.data) is torch.Tensor and w.dtype in (torch.bfloat16, torch.float32) and w.device.type == "cpu"
            and tuple(w.shape) == (module.out_features, module.in_features)
            and (module.bias is None or module.bias.dtype == w.dtype))


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (a head tied to the input embedding)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


@dataclass
class Prepacked:
    """What `prepack_linears` changed, to undo it: (module, its weight, the packed copy, whether emptied)."""

    layers: list[tuple[nn.Module, nn.Parameter, torch.Tensor, bool]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def undo(self, restored_elsewhere: Collection[nn.Parameter] = ()) -> None:
        """Unpack every layer. Emptied weights get their values back from the packed copies (exact), except
        those in `restored_elsewhere`, which the caller puts back itself (`generation_precision`)."""
        elsewhere = {id(p) for p in restored_elsewhere}
        while self.layers:  # one layer at a time, so each packed copy is freed as its weight comes back
            module, weight, packed, emptied = self.layers.pop()
            module.__dict__.pop("forward", None)
            if emptied and id(weight) not in elsewhere:
                weight.data = packed.to_dense()
            del packed


@torch.no_grad()
def prepack_linears(model: nn.Module, skip: Collection[str] = ()) -> Prepacked:
    """Pack every `packable` linear layer of `model` whose qualified name is not in `skip`; see the module doc."""
    handle = Prepacked()
    if not prepack_available():
        return handle
    shared = _shared_parameters(model)
    for name, module in model.named_modules():
        if name in skip or not packable(module) or "forward" in module.__dict__:
            continue
        weight = module.weight
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        module.forward = functools.partial(_packed_forward, packed, module.bias)
        emptied = id(weight) not in shared
        if emptied:
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
        handle.layers.append((module, weight, packed, emptied))
    return handle


def packed_copy(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A no-grad function computing `module(x)` from a copy of its weight packed once for oneDNN, the module
    itself left as it is; None where the module is not `packable` or this build cannot pack. The copy is a
    snapshot: use it while the weight stays as it is.

    For a frozen output head scoring hundreds of rows at a time (KL drift, the vote of stage 2): float32
    [128, 896] x [896, 151936] 1.7 ms per row packed against 2.4 plain (2.97 at 64 rows). The copy costs the
    weight's size again while the function lives; packing takes ~0.14 s. (The loss's heads in training gain
    less: 3.95 -> 3.70 s for a cpu-gated step's loss, not worth a 0.54 GiB copy.)"""
    if not (prepack_available() and packable(module)):
        return None
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 1)
    bias = None if module.bias is None else module.bias.detach()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _packed_forward(packed, bias, x)
    return run


@contextlib.contextmanager
def prepacked_linears(model: nn.Module, skip: Collection[str] = ()) -> Iterator[int]:
    """`prepack_linears` for the duration of the block; yields how many layers were packed."""
    handle = prepack_linears(model, skip)
    try:
        yield len(handle)
    finally:
        handle.undo()
