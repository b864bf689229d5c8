"""Several processes, one run: the stages and the trainer on Hugging Face Accelerate.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m safesteer.cli align --out runs/x
    torchrun --nproc_per_node 4 -m safesteer.cli align --out runs/x
    safesteer memory --params 8e9 --mode full --devices 4      # what a run needs, before renting it

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
  1 process and N processes train on the same samples (`seeded_sampling`).
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

import argparse
import hashlib
import math
import os
import random
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


def step_seed(seed: int, step: int) -> None:
    """Seed python, numpy and torch for one step from (seed, process, step).

    The global generators then never carry state from step to step: a resumed run draws what an
    uninterrupted one on as many processes would (dropout, if enabled), and one resumed on another
    process count draws from well-defined streams. Rollouts do not use them at all (`seeded_sampling`).
    """
    import numpy as np

    value = _mix("step", seed, rank(), step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def _mix(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rollout_seed(seed: int, position: int, sample: int) -> int:
    """Seed of completion `sample` of the prompt at data-order `position` (unique per step and prompt)."""
    return _mix("rollout", seed, position, sample)


def rollout_seeds(seed: int, positions: Sequence[int], per_prompt: int) -> list[int]:
    """Seeds for a prompt-major rollout batch (rows g = 0..per_prompt-1 of each prompt in turn)."""
    return [rollout_seed(seed, p, g) for p in positions for g in range(per_prompt)]


def _gumbel_choice(logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float,
                   top_p: float) -> torch.Tensor:
    """One token per row, drawn from softmax(logits / T) restricted to the top-p nucleus, by Gumbel-max.

    argmax(log p + G) with G ~ Gumbel(0, 1) is an exact sample of p. Each row's noise comes from its
    own generator, so a row's draw does not depend on the other rows of the batch. The nucleus is the
    one transformers' top-p warper keeps: the smallest set of most probable tokens whose mass reaches
    top_p (at least one token).
    """
    scores = logits.double() / temperature  # float64 noise: float32 would cut off the Gumbel tail near 17
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        mass = sorted_scores.softmax(-1).cumsum(-1)
        drop = mass <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float64)
                         for g in generators])
    gumbel = -torch.log(-torch.log(noise))  # u = 0 gives -inf: that token is simply never drawn
    return (scores + gumbel).argmax(-1)


@contextmanager
def seeded_sampling(model: Any, seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0) -> Iterator[None]:
    """Make `model.generate(do_sample=True)` sample row i from its own stream seeded with seeds[i].

    A forward hook on the causal LM draws each row's next token (`_gumbel_choice`) and hands
    `generate` logits that put all the mass on it, so the sampler that follows can only pick that
    token. The distribution is unchanged (same temperature and nucleus); what changes is that the
    randomness belongs to the row, not to the batch. Used around `rollout.sample_rollouts`.
    """
    from .anatomy import unwrap_model

    base = unwrap_model(model)
    seeds = list(seeds)
    generators: list[torch.Generator] = []

    def hook(_module, _args, output):
        logits = output.logits[:, -1]
        if logits.shape[0] != len(seeds):
            raise SafesteerError(f"seeded sampling got {logits.shape[0]} rows but {len(seeds)} seeds")
        if not generators:
            generators.extend(torch.Generator(device=logits.device).manual_seed(s) for s in seeds)
        chosen = _gumbel_choice(logits, generators, temperature, top_p)
        onehot = torch.full_like(logits, float("-inf"))
        onehot.scatter_(-1, chosen[:, None], 0.0)
        output.logits = onehot[:, None, :]
        return output

    handle = base.register_forward_hook(hook)
    try:
        with synced_generation(model):
            yield
    finally:
        handle.remove()


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
    from .anatomy import unwrap_model

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


# Metrics that loss.distillation_loss averages over valid tokens (the rest of a step's numbers are
# per-sequence means, per-step constants or timings).
TOKEN_MEAN_KEYS = ("student_s_mass", "teacher_s_mass", "student_entropy", "sampled_kl")
SAME_ON_ALL_KEYS = ("step", "lr", "grad_norm")


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


def _shards_weights(accel: Any) -> bool:
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
    if merge_lora and _shards_weights(accel):
        raise SafesteerError("a LoRA student cannot be merged into sharded (FSDP / ZeRO-3) weights; pass "
                             "--adapter-only and merge the adapter on one device afterwards")


def full_model_state(accel: Any, model: Any) -> dict | None:
    """The whole model's state dict for saving when weights are sharded (a collective), else None."""
    return accel.get_state_dict(model) if _shards_weights(accel) else None


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


# ----------------------------------------------------------------------------- stages 1, 2 and evaluation


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[Any], config: Any,
                       out_path: str | Path | None = None, **kwargs: Any) -> list[dict]:
    """`generation.generate_responses`, each process answering its shard; every process gets all rows.

    In a single process it is that function, unchanged. Otherwise each process appends to its own
    OUT.rank<r> file (resumable as usual) and the main process adds the gathered rows to OUT, so OUT
    ends up exactly as a single process would leave it (rows of a sampled run differ: their seeds
    follow the batches). A rerun on another process count starts from the rows already in OUT.
    """
    from .generation import generate_responses as generate
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
    rows = generate(model, tokenizer, mine, config, out_path=part, **kwargs) if mine else []
    rows = gather_objects(rows)
    if out_path is not None and is_main_process():
        def key(r: dict) -> tuple:
            return r.get("prompt_uid"), r.get("sample"), r.get("settings_key")

        present = {key(r) for r in read_jsonl(out_path)}
        append_jsonl(out_path, [r for r in rows if key(r) not in present])
    barrier()
    return rows


# ----------------------------------------------------------------------------- memory model

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
MEMORY_MODES = ("lora", "full")
SHARDING = ("none", "zero2", "fsdp")

# Shapes the activation terms use when only a parameter count is given: the nearest of these.
REFERENCE_SHAPES = {
    0.5e9: dict(hidden=896, layers=24, intermediate=4864, kv_dim=128, vocab=151936),    # Qwen2.5-0.5B
    4.0e9: dict(hidden=2560, layers=36, intermediate=9728, kv_dim=1024, vocab=151936),  # Qwen3-4B
    7.6e9: dict(hidden=3584, layers=28, intermediate=18944, kv_dim=512, vocab=152064),  # Qwen2.5-7B
    8.0e9: dict(hidden=4096, layers=32, intermediate=14336, kv_dim=1024, vocab=128256),  # Llama-3.1-8B
}


def reference_shape(params: float) -> dict:
    nearest = min(REFERENCE_SHAPES, key=lambda p: abs(math.log(p / params)))
    return dict(REFERENCE_SHAPES[nearest])


def lora_parameter_count(shape: dict, rank_r: int) -> int:
    """Adapter parameters of all-linear LoRA: r * (d_in + d_out) for q, k, v, o, gate, up and down."""
    d, kv, inter = shape["hidden"], shape["kv_dim"], shape["intermediate"]
    per_layer = (d + d) + (d + kv) * 2 + (d + d) + (d + inter) * 3
    return rank_r * per_layer * shape["layers"]


def estimate_memory(params: float, mode: str = "lora", n_devices: int = 1, dtype: str = "bf16", *,
                    sharding: str = "auto", teacher_dtype: str | None = None, master_weights: bool = False,
                    lora_r: int = 16, sequences: int = 32, seq_len: int = 640, chunk_size: int = 64,
                    gradient_checkpointing: bool = True, shape: dict | None = None) -> dict:
    """Bytes per device that one training step of safesteer needs, by component.

    params: P, the model's parameter count. mode: "lora" (adapter; the teacher is the same weights
    with the adapter off, so it costs nothing) or "full" (every weight trains; the teacher is a frozen
    copy, `teacher_dtype`, default the model's dtype). sharding: "none" (DDP: a full replica per
    device), "zero2" (gradients and optimizer state sharded), "fsdp" (FSDP2 / ZeRO-3: weights too);
    "auto" = fsdp on several devices, none on one. The frozen teacher copy of a full fine-tune is
    made before sharding, so it stays a full replica on each device in every mode.
    master_weights: fp32 master weights + fp32 Adam states (12 bytes per trainable parameter, as
    DeepSpeed or FSDP mixed precision keep them) instead of states in the trained weights' dtype
    (this trainer's plain AdamW: 2 x 2 bytes on bf16 weights; LoRA adapters are float32: 2 x 4).
    sequences: completions per step over all devices (4 prompts x 8 rollouts in the paper);
    seq_len: prompt + completion tokens. shape: hidden/layers/intermediate/kv_dim/vocab, else the
    nearest of REFERENCE_SHAPES.

    Weights, gradients, optimizer states and the teacher copy are exact counts; the activation terms
    are estimates (per layer, 34 bytes x tokens x hidden in bf16 for a transformer block with flash
    attention, Korthikanti et al. 2022), as is the fixed runtime overhead.
    """
    if mode not in MEMORY_MODES:
        raise SafesteerError(f"unknown mode {mode!r}; use one of: {', '.join(MEMORY_MODES)}")
    if dtype not in DTYPE_BYTES or (teacher_dtype is not None and teacher_dtype not in DTYPE_BYTES):
        raise SafesteerError(f"unknown dtype; use one of: {', '.join(DTYPE_BYTES)}")
    if params <= 0 or n_devices < 1 or sequences < 1 or seq_len < 1:
        raise SafesteerError("params, devices, sequences and seq_len must be positive")
    if sharding == "auto":
        sharding = "fsdp" if n_devices > 1 else "none"
    if sharding not in SHARDING:
        raise SafesteerError(f"unknown sharding {sharding!r}; use auto or one of: {', '.join(SHARDING)}")
    n = n_devices
    b = DTYPE_BYTES[dtype]
    shape = dict(shape or reference_shape(params))
    trainable = lora_parameter_count(shape, lora_r) if mode == "lora" else params
    shard_weights = n if sharding == "fsdp" else 1
    shard_states = n if sharding in ("zero2", "fsdp") else 1

    # PEFT keeps adapter weights in float32 on a half-precision base, so their gradients and Adam
    # moments are float32 too; a full fine-tune trains the weights in their own dtype.
    tb = 4 if mode == "lora" else b
    weights = params * b / shard_weights
    if mode == "lora":
        weights += trainable * tb / shard_weights
    teacher = 0.0 if mode == "lora" else params * DTYPE_BYTES[teacher_dtype or dtype]
    grads = trainable * tb / shard_states
    optimizer = trainable * (12 if master_weights else 2 * tb) / shard_states

    # Activations of this device's share of the step's sequences.
    local = math.ceil(sequences / n)
    tokens = local * seq_len
    d, layers, vocab = shape["hidden"], shape["layers"], shape["vocab"]
    per_layer = 34 * tokens * d * b / 2  # 34 bytes per token x hidden at 2-byte activations
    if gradient_checkpointing:
        student = layers * tokens * d * b + per_layer  # saved layer inputs + one block recomputed
    else:
        student = layers * per_layer
    kv_cache = 2 * layers * shape["kv_dim"] * tokens * b  # rollouts: keys and values of every token
    hidden = 2 * tokens * d * b  # teacher and student final hidden states, kept for the loss
    logits = 3 * local * chunk_size * vocab * 4  # one loss chunk: float32 logits, teacher + student + grad
    activations = max(kv_cache, student + hidden + logits)  # generation and scoring do not overlap
    overhead = 1.5 * 2**30  # CUDA context, allocator slack, temporary buffers
    parts = {"weights": weights, "teacher_copy": teacher, "gradients": grads, "optimizer": optimizer,
             "activations": activations, "overhead": overhead}
    return {"params": params, "trainable_params": trainable, "mode": mode, "sharding": sharding, "devices": n,
            "dtype": dtype, "bytes": parts, "total_bytes": sum(parts.values()),
            "detail": {"rollout_kv_cache": kv_cache, "student_activations": student, "hidden_states": hidden,
                       "loss_chunk_logits": logits, "sequences_per_device": local, "shape": shape}}


def format_memory(estimate: dict) -> str:
    gib = 2**30
    lines = [f"{estimate['mode']} fine-tune, {estimate['params'] / 1e9:g}B parameters "
             f"({estimate['trainable_params'] / 1e6:,.1f}M trainable), {estimate['dtype']}, "
             f"{estimate['devices']} device(s), sharding {estimate['sharding']}; GiB per device:"]
    for name, value in estimate["bytes"].items():
        lines.append(f"  {name:<14}{value / gib:>9.2f}")
    lines.append(f"  {'total':<14}{estimate['total_bytes'] / gib:>9.2f}")
    d = estimate["detail"]
    lines.append(f"  (activations: the larger of the rollout KV cache {d['rollout_kv_cache'] / gib:.2f} and scoring "
                 f"{(d['student_activations'] + d['hidden_states'] + d['loss_chunk_logits']) / gib:.2f}, "
                 f"for {d['sequences_per_device']} sequences on this device)")
    return "\n".join(lines)


def _cmd_memory(args: argparse.Namespace) -> int:
    kwargs = dict(dtype=args.dtype, teacher_dtype=args.teacher_dtype, master_weights=args.master_weights,
                  lora_r=args.lora_r, sequences=args.sequences, seq_len=args.seq_len, chunk_size=args.chunk_size,
                  gradient_checkpointing=args.gradient_checkpointing)
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "kv_dim", "vocab")}
    if any(v is not None for v in shape.values()):
        base = reference_shape(args.params)
        kwargs["shape"] = {k: v if v is not None else base[k] for k, v in shape.items()}
    print(format_memory(estimate_memory(args.params, args.mode, args.devices, sharding=args.sharding, **kwargs)))
    print(f"\nall modes on {args.devices} device(s), total GiB per device:")
    gib = 2**30
    for mode in MEMORY_MODES:
        for sharding in (("none",) if args.devices == 1 else SHARDING):
            e = estimate_memory(args.params, mode, args.devices, sharding=sharding, **kwargs)
            print(f"  {mode:<5} {sharding:<6}{e['total_bytes'] / gib:>9.1f}")
    print("\nweights, gradients, optimizer states and the teacher copy are counted; activations and overhead are "
          "estimates (see docs/memory.md)")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="estimate the memory per device of a training run (no model needed)",
        description="Per-device memory of one safesteer training step for a model of P parameters: weights, teacher "
                    "copy, gradients, optimizer states, activations. Pick a mode and device count before renting them.")
    p.add_argument("--params", type=float, required=True, help="parameter count, e.g. 8e9")
    p.add_argument("--mode", choices=MEMORY_MODES, default="lora",
                   help="lora: adapter, teacher = same weights with the adapter off; "
                        "full: all weights + frozen teacher copy")
    p.add_argument("--devices", type=int, default=1, help="number of GPUs the run is spread over")
    p.add_argument("--sharding", choices=("auto", *SHARDING), default="auto",
                   help="none: DDP replicas; zero2: gradients + optimizer sharded; fsdp: FSDP2 / ZeRO-3, weights too "
                        "(auto: fsdp on several devices)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="weight dtype")
    p.add_argument("--teacher-dtype", choices=sorted(DTYPE_BYTES), default=None,
                   help="full mode: dtype of the frozen teacher copy (default: --dtype)")
    p.add_argument("--master-weights", action="store_true",
                   help="fp32 master weights + fp32 Adam states (DeepSpeed / FSDP mixed precision)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--sequences", type=int, default=32, help="completions per step over all devices (paper: 4 x 8)")
    p.add_argument("--seq-len", type=int, default=640, help="prompt + completion tokens (paper: up to 512 new)")
    p.add_argument("--chunk-size", type=int, default=64, help="loss positions per chunk (TrainConfig.chunk_size)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    for name in ("hidden", "layers", "intermediate", "kv-dim", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None, help="model shape (default: the nearest reference model)")
    p.set_defaults(func=_cmd_memory)
