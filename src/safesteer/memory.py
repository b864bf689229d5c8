"""What a training run needs per device, before renting the devices: weights, teacher copy, gradients,
optimizer states and activations, by training mode and sharding engine.

    safesteer memory --params 8e9 --mode full --devices 4
    estimate_memory(8e9, "lora", n_devices=1, dtype="bf16")      # bytes per component (docs/memory.md)
"""

from __future__ import annotations

import argparse
import math

from .errors import SafesteerError

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
    """estimate the memory per device of a training run (no model needed)

    Per-device memory of one safesteer training step for a model of P parameters: weights, teacher copy,
    gradients, optimizer states, activations. Pick a mode and device count before renting them.
    """
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
    from .cli import add_command

    p = add_command(subparsers, "memory", _cmd_memory)
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
