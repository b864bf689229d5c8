"""The memory model: what one training step needs per device, by mode and sharding engine."""

import pytest

from safesteer import memory
from safesteer.errors import SafesteerError


def test_memory_counts_weights_gradients_optimizer_and_teacher():
    gib = 2**30
    p = 8e9
    lora = memory.estimate_memory(p, "lora", 1, "bf16")
    full = memory.estimate_memory(p, "full", 1, "bf16")
    assert lora["bytes"]["teacher_copy"] == 0  # the adapter-off student is the teacher
    assert full["bytes"]["teacher_copy"] == 2 * p
    assert full["bytes"]["weights"] == 2 * p
    assert full["bytes"]["gradients"] == 2 * p
    assert full["bytes"]["optimizer"] == 4 * p  # AdamW's two moments in bf16
    assert memory.estimate_memory(p, "full", 1, "bf16", master_weights=True)["bytes"]["optimizer"] == 12 * p
    shape = memory.reference_shape(p)
    assert lora["trainable_params"] == memory.lora_parameter_count(shape, 16)
    assert 10e6 < lora["trainable_params"] < 100e6
    assert lora["bytes"]["weights"] == pytest.approx(2 * p + 4 * lora["trainable_params"])  # float32 adapter
    assert lora["bytes"]["optimizer"] == pytest.approx(8 * lora["trainable_params"])
    # The reference code's case: full fine-tune + teacher copy of an 8B model does not fit 80 GB.
    assert full["total_bytes"] > 80e9 and lora["total_bytes"] < 40 * gib


def test_memory_sharding_divides_what_each_engine_shards():
    p, n = 8e9, 4
    ddp = memory.estimate_memory(p, "full", n, sharding="none")
    zero2 = memory.estimate_memory(p, "full", n, sharding="zero2")
    fsdp = memory.estimate_memory(p, "full", n)  # auto: fsdp on several devices
    assert fsdp["sharding"] == "fsdp"
    assert ddp["bytes"]["weights"] == zero2["bytes"]["weights"] == 2 * p
    assert zero2["bytes"]["gradients"] == ddp["bytes"]["gradients"] / n
    assert zero2["bytes"]["optimizer"] == ddp["bytes"]["optimizer"] / n
    assert fsdp["bytes"]["weights"] == 2 * p / n
    assert fsdp["bytes"]["teacher_copy"] == 2 * p  # a replica: made before the student is sharded
    assert fsdp["total_bytes"] < zero2["total_bytes"] < ddp["total_bytes"]
    # Rollouts are split over the devices too.
    assert fsdp["detail"]["sequences_per_device"] == 8
    assert memory.estimate_memory(p, "full", 1)["detail"]["sequences_per_device"] == 32
    with pytest.raises(SafesteerError):
        memory.estimate_memory(p, "qlora")


def test_memory_cli_prints_the_breakdown(capsys):
    from safesteer.cli import build_parser

    parser = build_parser()
    assert "memory" in parser._subparsers._group_actions[0].choices  # the CLI lists "memory" in STAGE_MODULES
    args = parser.parse_args(["memory", "--params", "8e9", "--mode", "full", "--devices", "4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sharding fsdp" in out and "teacher_copy" in out and "total" in out
    assert "lora  none" in out and "full  fsdp" in out
