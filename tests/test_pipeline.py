"""`safesteer align`: the stage order, reuse of a finished run, and the KEY=VALUE stage settings."""

import json
from dataclasses import dataclass

import pytest

from conftest import Spec, refusal_ids
from safesteer.errors import SafesteerError
from safesteer.pipeline import _parse_assignments
from safesteer.train.config import PRESETS


@pytest.fixture
def spec():
    return Spec.random(layer=1, seed=7)


@pytest.fixture
def safety_ids(smol_tokenizer):
    return refusal_ids(smol_tokenizer)


def test_key_value_overrides_are_typed():
    @dataclass
    class Cfg:
        horizon: int | None = None
        floor: float = 1e-8
        rank_by: str = "delta"
        flag: bool = False
        layers: tuple[int, ...] | None = None

    got = _parse_assignments(["horizon=3", "floor=1e-6", "rank-by=weighted", "flag=true", "layers=8,10"], Cfg, "--x")
    assert got == {"horizon": 3, "floor": 1e-6, "rank_by": "weighted", "flag": True, "layers": (8, 10)}
    with pytest.raises(SafesteerError, match="KEY=VALUE"):
        _parse_assignments(["nope=1"], Cfg, "--x")


def test_align_command_trains_saves_and_reuses_the_run_directory(tmp_path, tiny_model_dir, smol_tokenizer, spec,
                                                                 safety_ids, monkeypatch):
    """The command's wiring, with the two earlier stages replaced by stand-ins that write their files."""
    from safesteer import cli, pipeline

    out = tmp_path / "run"
    calls = []

    def fake_direction(args, model, tokenizer, identity, out_dir):
        calls.append("direction")
        for name in ("direction.safetensors", "direction.json"):
            (out_dir / name).write_text("stand-in")
        return spec, False

    def fake_tokens(args, preset, model, tokenizer, identity, out_dir):
        calls.append(("tokens", preset))
        (out_dir / "safety_tokens.json").write_text(json.dumps({"tokens": [{"id": i} for i in safety_ids]}))
        return False

    monkeypatch.setattr(pipeline, "_ensure_direction", fake_direction)
    monkeypatch.setattr(pipeline, "_ensure_tokens", fake_tokens)
    argv = ["align", "--model", str(tiny_model_dir), "--out", str(out), "--preset", "cpu", "--steps", "2",
            "--prompts-per-step", "1", "--rollouts-per-prompt", "2", "--max-new-tokens", "4", "--lora-r", "4",
            "--learning-rate", "1e-2", "--skip-eval"]
    assert cli.main(argv) == 0
    assert calls == ["direction", ("tokens", "cpu")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    record = json.loads((out / "model" / "safesteer.json").read_text())
    assert record["config"]["steps"] == 2 and record["config"]["lora_r"] == 4 and record["config"]["preset"] == "cpu"
    assert record["config"]["loss"] == PRESETS["cpu"]["loss"]  # not given: the preset's value
    assert set(record["artifacts"]) == {"direction.safetensors", "direction.json", "safety_tokens.json"}
    timings = json.loads((out / "timings.json").read_text())
    assert {"load_model", "direction", "tokens", "training"} <= set(timings["stages"])
    assert timings["stages"]["training"]["reused"] is False

    assert cli.main(argv) == 0  # a rerun finds the trained model and does not train again
    timings = json.loads((out / "timings.json").read_text())
    assert timings["stages"]["training"]["reused"] is True and len(timings["previous_runs"]) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

