"""Stage 3 checkpoints: the data order, and OUT/checkpoint written atomically and checked before a resume.

A checkpoint holds the full (gathered) trainable weights, the optimizer and scheduler states, the
global step and the data order, so a run resumes exactly where it stopped, also on another process
count. It holds no RNG state: every step reseeds the generators from (seed, process, step)
(`core.sampling.step_seed`) and every rollout draws from its own seeded stream, so nothing random
carries over from one step to the next.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import fields
from pathlib import Path

import torch

from ..errors import SafesteerError
from ..utils import (disk_full_error, fsync_path, fsync_tree, is_disk_full, phase, read_jsonl, temp_dir_in,
                     write_json_atomic, write_jsonl_atomic)
from .config import TrainConfig

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint"
_OLD_NAME = ".checkpoint.old"

# Settings that may change between an interrupted run and its resumption without changing the math.
RESUME_FREE = ("checkpoint_every", "merge", "preset", "max_nonfinite_steps")


def data_order(n_prompts: int, config: TrainConfig, per_step: int | None = None, stream: str = "") -> list[int]:
    """Prompt indices for every step: seeded shuffles of the prompt list, one after another.

    `per_step` prompts a step (default: config.prompts_per_step); a `stream` name (e.g. "contrast") draws
    an order of its own, independent of the training prompts' order.
    """
    needed = config.steps * (config.prompts_per_step if per_step is None else per_step)
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        perm = list(range(n_prompts))
        random.Random(f"{stream}/{config.seed}/{epoch}" if stream else config.seed * 1000 + epoch).shuffle(perm)
        order += perm
        epoch += 1
    return order[:needed]


def nonfinite_names(tensors: dict) -> list[str]:
    """The names of the floating-point tensors in `tensors` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def require_finite(tensors: dict, what: str) -> None:
    """Refuse to write `what` (a checkpoint, the model) from non-finite weights: it would replace a good one."""
    bad = nonfinite_names(tensors)
    if bad:
        raise SafesteerError(f"not writing {what}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: "
                             f"{bad[0]}), so training diverged; lower --learning-rate (or use --bf16 off) and start "
                             f"again with a new --out")


def write_checkpoint(out: Path, weights: dict, optimizer: dict | None, scheduler: dict, record: dict) -> Path:
    """Write OUT/checkpoint to a temporary folder, then swap it in: a crash at any moment leaves a whole
    checkpoint, the new one or the one before it (OUT/.checkpoint.old, see `find_checkpoint`).

    `record` (the step, data order, settings and data hashes) goes to state.json, written last: its
    presence marks a finished checkpoint. Every file and the renames are fsynced, so a power cut does not
    leave a finished-looking checkpoint with empty files. Weights with NaN or infinity are refused before
    anything is written; a full disk is one user error and leaves the previous checkpoint as it was.
    """
    from safetensors.torch import save_file

    step = record.get("step")
    require_finite(weights, f"the checkpoint of step {step}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_in(out, ".checkpoint.")
    try:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        write_json_atomic(tmp / "state.json", record)  # last: marks the folder complete
        fsync_tree(tmp)
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, out)  # asked while the partial files still fill it
        shutil.rmtree(tmp, ignore_errors=True)  # half written: give its space back, the old checkpoint stays
        if full:
            raise disk_full_error(f"the checkpoint of step {step}", out) from exc
        raise
    target, old = out / CHECKPOINT_NAME, out / _OLD_NAME
    try:
        phase(f"checkpoint-files:{step}")
        if (target / "state.json").is_file():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)  # aside, whole, until the new one is in place
            phase(f"checkpoint-swap:{step}")
        elif target.exists():
            shutil.rmtree(target)  # not a finished checkpoint (no state.json): nothing to keep
        # No finished OUT/checkpoint but a .checkpoint.old (a crash between the two renames, resumed from there):
        # it stays until the new checkpoint is in place, so there is never a moment without a whole checkpoint.
        os.replace(tmp, target)
    except BaseException:  # e.g. Ctrl-C before the new checkpoint is in place: the rerun resumes from the old
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(out)
    shutil.rmtree(old, ignore_errors=True)
    return target


def find_checkpoint(out: Path, tidy: bool) -> Path | None:
    """The finished checkpoint in `out`, or None; with `tidy`, the leftovers of interrupted writes go."""
    ckpt = out / CHECKPOINT_NAME
    if not (ckpt / "state.json").is_file() and (out / _OLD_NAME / "state.json").is_file():
        ckpt = out / _OLD_NAME  # a crash between the two renames of write_checkpoint
    for stale in out.glob(".checkpoint.*"):
        if tidy and stale != ckpt and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return ckpt if (ckpt / "state.json").is_file() else None


def check_resumable(out: Path, ckpt: Path, state: dict, mine: dict) -> None:
    """Refuse to resume the checkpoint's `state` with this run's record `mine` if the math would differ."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SafesteerError(f"{ckpt} was written by another safesteer version; use a new --out")
    # A setting added after the checkpoint was written counts as its default, the behaviour it had then.
    before = {f.name: f.default for f in fields(TrainConfig)} | state["config"]
    changed = [k for k in mine["config"] if k not in RESUME_FREE and before.get(k) != mine["config"][k]]
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {mine['config'][k]!r}" for k in changed)
        raise SafesteerError(f"{out} holds a run with other settings ({diff}); "
                             f"pass the same options to resume it, or use a new --out")
    if state["prompts_sha256"] != mine["prompts_sha256"] or state["safety_ids"] != mine["safety_ids"]:
        raise SafesteerError(f"{out} holds a run with other training prompts or safety tokens; use a new --out")
    if state.get("contrast_sha256") != mine.get("contrast_sha256"):
        raise SafesteerError(f"{out} holds a run with other contrast prompts; use a new --out")


def drop_metrics_after(out: Path, step: int) -> None:
    """Keep the metric rows up to `step`: the steps after a checkpoint are rerun, so their rows go."""
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= step]
    write_jsonl_atomic(out / "metrics.jsonl", rows)
