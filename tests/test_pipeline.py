"""`safesteer align`: the stage order, reuse of a finished run, and the KEY=VALUE stage settings."""

import json
from dataclasses import dataclass

import pytest

from conftest import Spec, refusal_ids
from safesteer.cli import parse_assignments
from safesteer.errors import SafesteerError
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

    got = parse_assignments(["horizon=3", "floor=1e-6", "rank-by=weighted", "flag=true", "layers=8,10"], Cfg, "--x")
    assert got == {"horizon": 3, "floor": 1e-6, "rank_by": "weighted", "flag": True, "layers": (8, 10)}
    with pytest.raises(SafesteerError, match="KEY=VALUE"):
        parse_assignments(["nope=1"], Cfg, "--x")


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
    # The run's documents: the report (no summary with --skip-eval, so no representation shift) and the model card.
    report = (out / "report.html").read_text()
    assert 'id="representation"' in report and "not available: representation.json missing" in report
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "Not evaluated yet" in card and "Loss `localized_bucket`" in card

    assert cli.main(argv) == 0  # a rerun finds the trained model and does not train again
    timings = json.loads((out / "timings.json").read_text())
    assert timings["stages"]["training"]["reused"] is True and len(timings["previous_runs"]) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2



def test_the_summary_records_the_representation_shift_the_report_draws(tmp_path, tiny_model, smol_tokenizer, spec):
    """While base and aligned model are loaded, align writes representation.json: base, steered teacher, aligned."""
    from argparse import Namespace

    from conftest import perturbed_copy
    from safesteer import pipeline
    from safesteer.eval.suites import ModelEntry
    from safesteer.report.build import build_report

    out = tmp_path / "run"
    write_spec(spec, out)
    base = ModelEntry("base", tiny_model, smol_tokenizer)
    aligned = ModelEntry("aligned", perturbed_copy(tiny_model), smol_tokenizer)
    result = pipeline.record_representation(Namespace(direction=None, split_seed=0), out, base, aligned)
    data = json.loads((out / "representation.json").read_text())
    assert set(data["coords"]) == {"base", "teacher", "aligned"} and data["prompts"]["n"] == pipeline.REPRESENTATION_PROMPTS
    assert result["shift"]["teacher"]["mean_l2"] > 0 and result["shift"]["aligned"]["mean_l2"] > 0
    report = build_report(out)
    assert "PCA scatter" in report and "not available: representation.json" not in report


def write_spec(spec, out):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({"direction": spec.direction.float().contiguous()}, str(out / "direction.safetensors"))
    (out / "direction.json").write_text(json.dumps({"layer": spec.layer, "coeff": spec.coeff}))
