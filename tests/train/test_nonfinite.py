"""A NaN or infinite loss or gradient (issue #12, item 4): the step is skipped and counted, too many in a
row stop the run with one line, and no checkpoint or model with non-finite weights is ever written.

This file is also the worker of its two-process test (`torchrun --nproc_per_node 2 tests/train/test_nonfinite.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the worker runs as a script
    sys.path.insert(0, str(TESTS))

from conftest import TRAIN_PROMPTS as PROMPTS  # noqa: E402
from conftest import Spec, refusal_ids  # noqa: E402
from conftest import peaked_tiny_model as tiny  # noqa: E402
from conftest import tiny_train_config as config  # noqa: E402
from safesteer.errors import SafesteerError  # noqa: E402
from safesteer.train.trainer import Trainer  # noqa: E402


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss whose gradient norm is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison(monkeypatch, trainers: list, steps: dict[int, str]) -> None:
    """The loss function returns a NaN loss ("loss") or a finite loss with an infinite gradient ("grad") on
    these (1-based) steps of the trainer last appended to `trainers`."""
    import safesteer.core.loss as loss_module

    real = loss_module.distillation_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        how = steps.get(trainers[-1].step + 1)
        if how == "loss":
            return dataclasses.replace(out, loss=out.loss * math.nan)
        if how == "grad":
            return dataclasses.replace(out, loss=InfiniteGradient.apply(out.loss))
        return out

    monkeypatch.setattr(loss_module, "distillation_loss", poisoned)


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def optimizer_tensors(trainer) -> list[torch.Tensor]:
    return [t.clone() for s in trainer.optimizer.state_dict()["state"].values() for t in s.values()
            if torch.is_tensor(t)]


def same(a: dict | list, b: dict | list) -> bool:
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in pairs)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_nonfinite_step_is_skipped_counted_and_leaves_weights_and_optimizer_alone(
        tmp_path, smol_tokenizer, spec, safety_ids, monkeypatch):
    cfg = config(steps=4)
    clean = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path / "clean",
                    progress=False).train()
    trainers: list = []
    poison(monkeypatch, trainers, {2: "loss", 3: "grad"})
    out = tmp_path / "run"
    trainers.append(Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, out, progress=False))
    trainer = trainers[-1]
    trainer.train(max_steps=1)
    weights, moments = trainable(trainer), optimizer_tensors(trainer)
    for _ in (2, 3):  # a NaN loss, then a finite loss with an infinite gradient
        trainer.train(max_steps=1)
        assert same(trainable(trainer), weights) and same(optimizer_tensors(trainer), moments)
        assert all(p.grad is None for p in trainer.params)  # the poisoned gradients are dropped
    trainer.train(max_steps=1)
    assert not same(trainable(trainer), weights)  # step 4 is a normal update

    rows = rows_of(out)
    assert [r["skipped_nonfinite"] for r in rows] == [False, True, True, False]
    assert [r["nonfinite_skips"] for r in rows] == [0, 1, 2, 2]
    assert math.isnan(rows[1]["loss"]) and math.isnan(rows[1]["grad_norm"])  # no backward on a NaN loss
    assert math.isfinite(rows[2]["loss"]) and not math.isfinite(rows[2]["grad_norm"])
    assert [r["lr"] for r in rows] == [r["lr"] for r in clean]  # the schedule follows the step number
    assert rows[0]["loss"] == clean[0]["loss"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["nonfinite_skips"], state["nonfinite_in_a_row"]) == (2, 0)

    trainers.append(Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, out, progress=False))
    assert trainers[-1].step == 4 and trainers[-1].nonfinite_skips == 2  # the count survives a resume


STOP_MESSAGE = ("training stopped: the loss or gradient norm was NaN or infinite in 2 steps in a row (steps 2-3, "
                "skipped without changing the weights); lower --learning-rate, use --bf16 off or --dtype float32, "
                "and start again with a new --out")


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_with_one_line(tmp_path, smol_tokenizer, spec, safety_ids,
                                                                     monkeypatch):
    from safetensors.torch import load_file

    cfg = config(steps=6, max_nonfinite_steps=2)
    trainers: list = []
    poison(monkeypatch, trainers, {s: "loss" for s in range(2, 7)})
    trainers.append(Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path,
                            progress=False))
    trainers[-1].train(max_steps=1)
    after_step_1 = trainable(trainers[-1])
    with pytest.raises(SafesteerError) as info:
        trainers[-1].train()
    assert str(info.value) == STOP_MESSAGE
    assert [r["step"] for r in rows_of(tmp_path)] == [1, 2, 3]
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["nonfinite_in_a_row"]) == (2, 1)  # step 3 stopped the run before its checkpoint
    on_disk = load_file(str(tmp_path / "checkpoint" / "trainable.safetensors"))
    assert same({n: on_disk[n] for n in after_step_1}, after_step_1)  # the weights of the last real update
    assert not (tmp_path / "model").exists()

    # Resumed, it counts on from the checkpoint: one more NaN step and it stops again, with the same line.
    trainers.append(Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path,
                            progress=False))
    assert trainers[-1].nonfinite_in_a_row == 1
    with pytest.raises(SafesteerError, match="^training stopped: .* in 2 steps in a row \\(steps 2-3,"):
        trainers[-1].train()


def test_no_checkpoint_or_model_with_nonfinite_weights_is_written(tmp_path, smol_tokenizer, spec, safety_ids):
    trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(), tmp_path,
                      progress=False)
    trainer.train(max_steps=1)
    good = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param[0, 0] = math.inf  # however it got there: the guard is at the write
    with pytest.raises(SafesteerError) as info:
        trainer.save_checkpoint()
    assert str(info.value) == (f"not writing the checkpoint of step 1: 1 weight tensor(s) hold NaN or infinite values "
                               f"(first: {name}), so training diverged; lower --learning-rate (or use --bf16 off) and "
                               f"start again with a new --out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == good  # the good one stays
    with pytest.raises(SafesteerError, match=f"^not writing the model to {tmp_path / 'model'}: .* NaN or infinite"):
        trainer.save_model()
    assert not (tmp_path / "model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]  # no half-written folder


# ----------------------------------------------------------------------------- two processes


def test_every_process_skips_the_step_when_one_process_sees_a_nan(tmp_path, tiny_model_dir):
    """Under DDP the skip is one decision for all: if only the process with the NaN skipped its backward,
    the other would wait for it in the gradient all-reduce (or the two would drift apart)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tiny_model_dir), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    snapshots = [torch.load(tmp_path / f"weights.rank{r}.pt") for r in (0, 1)]
    for steps in snapshots:
        assert same(steps[1], steps[0]) and not same(steps[2], steps[1])  # step 2 skipped, step 3 updated
    assert all(same(a, b) for a, b in zip(*snapshots))  # the two processes hold the same weights throughout
    rows = rows_of(tmp_path)
    assert [r["skipped_nonfinite"] for r in rows] == [False, True, False]
    assert [r["nonfinite_skips"] for r in rows] == [0, 1, 1] and rows[0]["processes"] == 2


def _worker(model_dir: str, out: str) -> None:
    """Three steps on two processes, one prompt each; on process 1 only, step 2's loss is NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safesteer import parallel

    parallel.init()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    trainer = Trainer(model, tok, Spec.random(layer=1, seed=7), refusal_ids(tok), PROMPTS, config(steps=3),
                      out, progress=False)
    score, rank = trainer.score, parallel.rank()

    def poisoned(*args, **kwargs):
        result = score(*args, **kwargs)
        if rank == 1 and trainer.step + 1 == 2:
            return dataclasses.replace(result, loss=result.loss * math.nan)
        return result

    trainer.score = poisoned
    student = trainer.accelerator.unwrap_model(trainer.model)
    snapshots = []
    for _ in range(3):
        trainer.train(max_steps=1)
        snapshots.append({n: t.clone() for n, t in parallel.trainable_state(student).items()})  # not views
    torch.save(snapshots, Path(out) / f"weights.rank{rank}.pt")


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
