"""Checkpoints: an interrupted run resumes exactly, and a checkpoint that does not fit the run is refused."""

import json
from dataclasses import replace

import pytest

from conftest import TRAIN_PROMPTS as PROMPTS
from conftest import peaked_tiny_model as tiny
from conftest import tiny_train_config as config
from safesteer.errors import SafesteerError
from safesteer.train.checkpoint import data_order
from safesteer.train.trainer import Trainer


def losses(rows):
    return [r["loss"] for r in rows]


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, smol_tokenizer, spec, safety_ids):
    cfg = config(steps=4, warmup_ratio=0.25)
    full = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path / "a",
                   progress=False).train()

    # Interrupted after step 3, with the last checkpoint at step 2: step 3 is lost and redone.
    cut = replace(cfg, checkpoint_every=2)
    first = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cut, tmp_path / "b",
                    progress=False)
    first.train(max_steps=3)
    assert first.step == 3
    resumed = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cut, tmp_path / "b",
                      progress=False)  # a fresh adapter: weights, optimizer, schedule and RNG come from disk
    assert resumed.step == 2
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2
    rest = resumed.train()
    assert [r["step"] for r in rest] == [3, 4]
    on_disk = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert losses(on_disk) == losses(full)  # exactly: same weights, optimizer, schedule and RNG
    assert [r["lr"] for r in on_disk] == [r["lr"] for r in full]

    with pytest.raises(SafesteerError, match="learning_rate"):
        Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, replace(cut, learning_rate=1e-3),
                tmp_path / "b", progress=False)


def test_checkpoint_written_before_lora_layers_existed_resumes(tmp_path, smol_tokenizer, spec, safety_ids):
    Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(), tmp_path,
            progress=False).train(max_steps=1)
    state_path = tmp_path / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["lora_layers"]
    state_path.write_text(json.dumps(state))
    resumed = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(), tmp_path,
                      progress=False)
    assert resumed.step == 1  # the missing setting is the default, the placement such runs had
    with pytest.raises(SafesteerError, match="lora_layers: 'all' -> 'from_steering'"):
        Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(lora_layers="from_steering"),
                tmp_path, progress=False)


def test_data_order_is_seeded_shuffles_one_after_another():
    cfg = config(steps=5, prompts_per_step=3, seed=1)
    order = data_order(4, cfg)
    assert len(order) == 15 and sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [0, 1, 2, 3]
    assert order == data_order(4, cfg) and order != data_order(4, replace(cfg, seed=2))


# ----------------------------------------------------------------------------- crashes while writing (issue #12)


class Crash(BaseException):
    """A kill -9 stand-in: nothing after it runs, not even the clean-ups of `except Exception`."""


def crash_at(monkeypatch, name: str) -> None:
    """Stop write_checkpoint dead when it reaches the announced point `name` (utils.phase)."""
    import safesteer.train.checkpoint as checkpoint

    def phase(reached):
        if reached == name:
            raise Crash(reached)

    monkeypatch.setattr(checkpoint, "phase", phase)


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_crash_between_the_two_renames_resumes_from_the_old_checkpoint(tmp_path, smol_tokenizer, spec, safety_ids,
                                                                         monkeypatch):
    cfg = config(steps=3)
    full = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path / "a",
                   progress=False).train()
    out = tmp_path / "b"

    def trainer():
        return Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, out, progress=False)

    with monkeypatch.context() as m:  # step 2's checkpoint is written; step 1's is moved aside; then the crash
        crash_at(m, "checkpoint-swap:2")
        with pytest.raises(Crash):
            trainer().train()
    assert not (out / "checkpoint").exists()
    assert json.loads((out / ".checkpoint.old" / "state.json").read_text())["step"] == 1
    # An exception (a Ctrl-C) removes the finished step-2 folder it did not swap in; a kill -9 leaves it, and the
    # next run tidies it away (tests/test_kill_soak.py).
    assert [p.name for p in out.glob(".checkpoint.?*")] == [".checkpoint.old"]

    resumed = trainer()
    assert resumed.step == 1  # from .checkpoint.old: only the step in flight is lost
    assert [r["step"] for r in metric_rows(out)] == [1]
    assert sorted(p.name for p in out.glob(".checkpoint.*")) == [".checkpoint.old"]  # the unfinished swap is gone

    # Crash again before the next swap: .checkpoint.old is still the only whole checkpoint, so it must stay
    # until the new one is in place (there is never a moment without one).
    with monkeypatch.context() as m:
        crash_at(m, "checkpoint-files:2")
        with pytest.raises(Crash):
            resumed.train()
    assert not (out / "checkpoint").exists()
    assert json.loads((out / ".checkpoint.old" / "state.json").read_text())["step"] == 1

    last = trainer()
    assert last.step == 1
    assert [r["step"] for r in last.train()] == [2, 3]
    assert losses(metric_rows(out)) == losses(full)  # the same run as one never interrupted
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not list(out.glob(".checkpoint.*"))  # nothing left for a later run to misread


def test_checkpoint_files_are_fsynced_before_the_swap_and_the_folder_after(tmp_path, monkeypatch):
    import os

    import torch

    from safesteer.train.checkpoint import write_checkpoint

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the fsynced files")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src), str(dst))),
                                                         real_replace(src, dst))[1])
    for step in (1, 2):  # the first checkpoint, then one that moves the first aside
        events.clear()
        write_checkpoint(tmp_path, {"w": torch.ones(2)}, {"state": {}}, {"last_epoch": step}, {"step": step})
        into_place = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tmp_path / "checkpoint"))
        folder = events[into_place][1]
        fsynced_before = {e[1] for e in events[:into_place] if e[0] == "fsync"}
        names = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
        assert {f"{folder}/{n}" for n in names} | {folder} <= fsynced_before
        assert ("fsync", str(tmp_path)) in events[into_place + 1:]  # the renames themselves
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text()) == {"step": 2}
    assert not list(tmp_path.glob(".checkpoint.*"))
