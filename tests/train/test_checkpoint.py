"""Checkpoints: an interrupted run resumes exactly, and a checkpoint that does not fit the run is refused."""

import json
from dataclasses import replace

import pytest

from conftest import TRAIN_PROMPTS as PROMPTS
from conftest import Spec
from conftest import peaked_tiny_model as tiny
from conftest import refusal_ids
from conftest import tiny_train_config as config
from safesteer.errors import SafesteerError
from safesteer.train.checkpoint import data_order
from safesteer.train.trainer import Trainer


@pytest.fixture
def spec():
    return Spec.random(layer=1, seed=7)


@pytest.fixture
def safety_ids(smol_tokenizer):
    return refusal_ids(smol_tokenizer)


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
