"""Several processes, one run: the stages and the trainer on Hugging Face Accelerate.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m safesteer.cli align --out runs/x
    torchrun --nproc_per_node 4 -m safesteer.cli align --out runs/x

Launched by `accelerate launch` or `torchrun`, every process runs the same command. Accelerate is
the engine (DDP, FSDP2, DeepSpeed ZeRO, chosen by its config file); this module is only the glue:

* `shard(items)` gives each process a contiguous, disjoint block of a list (block sizes differ by at
  most one), `gather_objects(part)` puts the blocks back together in order on every process and
  `all_reduce_sum(t)` adds a tensor over processes. In a single process they are identities,
  so a stage written with them behaves exactly as before when nothing is launched.
* The trainer splits each step's `prompts_per_step` prompts over the processes, so the global batch
  (and with it the learning-rate schedule and the loss) does not depend on the process count. Each
  process samples its own rollouts, scores them with its student and teacher, and DDP (or FSDP/ZeRO)
  averages the gradients; `loss_weight` corrects that average when the shards are unequal.
* Rollouts are seeded per completion: completion g of the prompt at data-order position i uses
  its own random stream, seeded from (seed, i, g). A prompt therefore gets the same rollouts
  whichever process samples it, whatever else is in the batch and whichever run it is resumed in:
  1 process and N processes train on the same samples (`core.sampling.seeded_sampling`).
* Only the main process writes metrics, checkpoints and the model; the others wait. Checkpoints
  hold full (gathered) trainable weights, optimizer state, the global step and the data order, so
  a run can resume on another process count.

Where the model lives under each engine: with DDP every process holds the whole model; the
student's forward goes through the DDP wrapper (that is what triggers the gradient all-reduce),
while rollouts and the teacher use the unwrapped module: they run under no_grad and need no
synchronisation. Hooks (steering, sampling) are registered on the unwrapped transformers modules,
which DDP calls unchanged. With FSDP2 the model is sharded in place, so the "unwrapped" module is the
sharded one: the teacher is that same module with the LoRA adapter disabled, and each of its
forwards gathers every layer's parameters once, exactly like the student's forward; there is no
second copy to gather. Rollouts on sharded weights go through `synced_generation`, which makes
`generate` keep every process stepping until the longest rollout anywhere is done (each step is a
collective gather) and gathers the root module's own parameters, which a PEFT model's `generate`
would otherwise reach without FSDP's hooks. DeepSpeed ZeRO-3 gathers through its own module hooks.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import SafesteerError

_ACCELERATOR = None


# ----------------------------------------------------------------------------- process group


def launched() -> bool:
    """True when started by a launcher with more than one process (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _use_cpu() -> bool:
    return not torch.cuda.is_available()


def init() -> Any:
    """Join the process group when launched with several processes (a no-op otherwise).

    Call it before loading a model: it also selects this process's GPU, so a model moved to "cuda"
    lands on the local device instead of every process filling GPU 0.
    """
    if not launched():
        return None
    from accelerate import PartialState

    return PartialState(cpu=_use_cpu())


def _dist() -> Any:
    import torch.distributed as dist

    if launched() and not (dist.is_available() and dist.is_initialized()):
        init()
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def accelerator() -> Any:
    """The run's `accelerate.Accelerator`, created once per process.

    `split_batches=True` says what the trainer does: one global batch of prompts is split over the
    processes, so the scheduler steps once per optimizer step whatever the process count.
    `device_placement=False`: the model is already on its device (this process's GPU or the
    device the user chose), so `prepare` must not move it.
    """
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator, DataLoaderConfiguration

        init()
        _ACCELERATOR = Accelerator(cpu=_use_cpu(), device_placement=False,
                                   dataloader_config=DataLoaderConfiguration(split_batches=True))
    return _ACCELERATOR


def _comm_device() -> torch.device:
    """Where collective tensors must live: the local GPU for NCCL, the CPU for gloo."""
    dist = _dist()
    if dist and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- sharding helpers


def shard_bounds(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """[start, stop) of process `index`'s block of n items; the first n % count blocks get one more."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(items: Sequence[Any], index: int | None = None, count: int | None = None) -> list:
    """This process's contiguous block of `items` (all of them in a single process)."""
    items = list(items)
    start, stop = shard_bounds(len(items), index, count)
    return items[start:stop]


def gather_objects(part: Sequence[Any]) -> list:
    """Concatenate every process's list in process order; with `shard` blocks this restores the input order."""
    dist = _dist()
    if not dist:
        return list(part)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(part))
    return [item for p in parts for item in p]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all processes (the tensor itself in a single process)."""
    dist = _dist()
    if not dist:
        return tensor
    work = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every process."""
    dist = _dist()
    if not dist:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- trainer glue


@contextmanager
def synced_generation(model: Any) -> Iterator[None]:
    """Make `model.generate` work on sharded weights and keep every process generating until all are done.

    Under FSDP or ZeRO-3 each forward gathers weights collectively, so a process whose rollouts end
    early must go on joining the forwards of the others. transformers' `generate` does that
    (synced_gpus) for models it recognises as sharded; its FSDP2 test is a marker that only its own
    sharding sets, so a model sharded by Accelerate is marked for the duration. And a PEFT model's
    `generate` calls the inner transformers model, bypassing the FSDP2 root's forward hooks, so the
    root's own parameters (embeddings, output head, final norm) are gathered here for the duration;
    the decoder layers are FSDP units of their own and gather themselves as usual.
    """
    from .core.anatomy import unwrap_model

    base = unwrap_model(model)
    sharded = is_sharded(base) or any(hasattr(p, "ds_id") for p in base.parameters())
    if world_size() == 1 or not sharded:
        yield
        return
    marked = not getattr(base, "_is_fsdp_managed_module", False)
    root = model if hasattr(model, "unshard") and hasattr(model, "reshard") else None  # an FSDP2 root module
    if marked:
        base._is_fsdp_managed_module = True
    if root is not None:
        root.unshard()
    try:
        yield
    finally:
        if root is not None:
            root.reshard()
        if marked:
            del base._is_fsdp_managed_module


def loss_weight(n_local: int) -> float:
    """Factor on this process's mean loss so that DDP's gradient average equals the global mean.

    The loss is a mean over sequences. With n_r sequences on process r (N in all) and W processes,
    DDP averages the gradients of the local losses, so scaling each by n_r * W / N gives the
    gradient of the mean over all N sequences. Equal shards give exactly 1.
    """
    count = world_size()
    if count == 1:
        return 1.0
    total = int(all_reduce_sum(torch.tensor([float(n_local)]))[0])
    return n_local * count / total


# Metrics that core.loss.distillation_loss averages over valid tokens (the rest of a step's numbers are
# per-sequence means, per-step constants or timings).
TOKEN_MEAN_KEYS = ("student_s_mass", "teacher_s_mass", "student_entropy", "sampled_kl")
SAME_ON_ALL_KEYS = ("step", "lr", "grad_norm", "nonfinite_skips")


def reduce_metrics(row: dict, n_sequences: int, n_tokens: int) -> dict:
    """One process's metric row -> the row of the global batch (identical on every process).

    Token means are re-weighted by each process's valid tokens, other means by its sequences;
    timings become the slowest process's; step, lr and grad_norm (computed on synchronised
    gradients) and non-numbers are the main process's.
    """
    count = world_size()
    if count == 1:
        return row
    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k not in SAME_ON_ALL_KEYS and not k.startswith("time_"))
    times = sorted(k for k in row if k.startswith("time_"))
    weights = [float(n_tokens if k in TOKEN_MEAN_KEYS else n_sequences) for k in keys]
    values = [float(row[k]) * w if w else 0.0 for k, w in zip(keys, weights)]
    sums = all_reduce_sum(torch.tensor(values + weights, dtype=torch.float64)).tolist()
    out = dict(broadcast_object(row))
    for i, k in enumerate(keys):
        total = sums[len(keys) + i]
        out[k] = sums[i] / total if total else math.nan
    dist = _dist()
    if times:
        slowest = torch.tensor([float(row[k]) for k in times], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        out.update(zip(times, slowest.tolist()))
    out["processes"] = count
    return out


def shards_weights(accel: Any) -> bool:
    """FSDP, or DeepSpeed ZeRO-3: no process holds whole weights outside a forward."""
    from accelerate.utils import DistributedType

    if accel.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accel.state, "deepspeed_plugin", None)
    return accel.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def check_trainable(accel: Any, prompts_per_step: int, merge_lora: bool) -> None:
    """Refuse, before any work, a run the engine cannot carry out."""
    if prompts_per_step < accel.num_processes:
        raise SafesteerError(f"prompts_per_step is {prompts_per_step} but {accel.num_processes} processes were "
                             f"launched; each process needs at least one prompt per step (raise --prompts-per-step "
                             f"or launch fewer processes)")
    if merge_lora and shards_weights(accel):
        raise SafesteerError("a LoRA student cannot be merged into sharded (FSDP / ZeRO-3) weights; pass "
                             "--adapter-only and merge the adapter on one device afterwards")


def full_model_state(accel: Any, model: Any) -> dict | None:
    """The whole model's state dict for saving when weights are sharded (a collective), else None."""
    return accel.get_state_dict(model) if shards_weights(accel) else None


# Checkpoints hold full tensors keyed by parameter name, whatever the engine, so that a run can
# resume on another process count. FSDP2 parameters are DTensors (`full_tensor()` gathers them);
# DeepSpeed ZeRO-3 parameters are gathered with its own context manager.


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def is_sharded(model: Any) -> bool:
    """True for a model whose parameters are FSDP2 shards (DTensors)."""
    return any(_is_dtensor(p) for p in model.parameters())


def _deepspeed_gathered(params: list, modifier_rank: int | None = None) -> Any:
    from contextlib import nullcontext

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Full trainable weights on the CPU by parameter name (every process must call it: FSDP gathers)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    state = {}
    with _deepspeed_gathered([p for _, p in named]):
        for name, p in named:
            full = p.full_tensor() if _is_dtensor(p) else p
            state[name] = full.detach().contiguous().cpu()
    return state


@torch.no_grad()
def load_trainable_state(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Copy full weights into the model's trainable parameters (each process keeps its own shard)."""
    params = dict(model.named_parameters())
    with _deepspeed_gathered([params[name] for name in weights], modifier_rank=0):
        for name, value in weights.items():
            p = params[name]
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                p.to_local().copy_(value.to_local())
            else:
                p.copy_(value)


def optimizer_state(model: Any, optimizer: Any) -> dict | None:
    """The full optimizer state keyed by parameter name, on the CPU (every process must call it).

    Names rather than positions, and full tensors rather than FSDP shards, so that the same file
    resumes a run on one process, under DDP or under FSDP2 with any process count. DeepSpeed keeps
    each process's partition inside its engine: None, and the Adam moments restart on resume.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if type(inner).__module__.startswith("deepspeed"):
        return None
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: Any, optimizer: Any, state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    if state is None or type(inner).__module__.startswith("deepspeed"):
        import warnings

        warnings.warn("no optimizer state this engine can load (DeepSpeed keeps it partitioned); the Adam moments "
                      "restart from zero", stacklevel=2)
        return
    set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- generation (stages and evaluation)


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[Any], config: Any,
                       out_path: str | Path | None = None, **kwargs: Any) -> tuple[list[dict], Any]:
    """`core.generation.generate_responses`, each process answering its shard; every process gets all rows.

    In a single process it is that function, unchanged. Otherwise each process appends to its own
    OUT.rank<r> file (resumable as usual) and the main process adds the gathered rows to OUT, so OUT
    ends up exactly as a single process would leave it (rows of a sampled run differ: their seeds
    follow the batches). A rerun on another process count starts from the rows already in OUT.
    Returns (rows, stats) as that function does; with several processes the stats are this process's.
    """
    from .core.generation import GenerationStats
    from .core.generation import generate_responses as generate
    from .utils import append_jsonl, read_jsonl

    if world_size() == 1:
        return generate(model, tokenizer, list(prompts), config, out_path=out_path, **kwargs)
    mine = shard(prompts)
    part = None
    if out_path is not None:
        out_path = Path(out_path)
        part = out_path.with_name(f"{out_path.name}.rank{rank()}")
        if not part.exists():  # carry over what an earlier run (any process count) finished
            uids = {p.uid for p in mine}
            append_jsonl(part, [r for r in read_jsonl(out_path) if r.get("prompt_uid") in uids])
    if mine:
        rows, stats = generate(model, tokenizer, mine, config, out_path=part, **kwargs)
    else:  # more processes than prompts
        rows, stats = [], GenerationStats(generated=0, new_tokens=0, seconds=0.0)
    rows = gather_objects(rows)
    if out_path is not None and is_main_process():
        def key(r: dict) -> tuple:
            return r.get("prompt_uid"), r.get("sample"), r.get("settings_key")

        present = {key(r) for r in read_jsonl(out_path)}
        append_jsonl(out_path, [r for r in rows if key(r) not in present])
    barrier()
    return rows, stats
