"""`safesteer align`: the stage order, reuse of a finished run, and the KEY=VALUE stage settings."""

import json
from dataclasses import dataclass

import pytest

from conftest import Spec
from safesteer.cli import parse_assignments
from safesteer.errors import SafesteerError
from safesteer.train.config import PRESETS


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


def test_a_stage_setting_set_to_none_on_purpose_replaces_the_presets_value():
    """--direction-config induce_fraction=none turns the cpu preset's relative induce filter off; an option
    that was not given (None from the parser) leaves the preset's value."""
    from safesteer.pipeline import stage_config
    from safesteer.teacher.direction import DirectionConfig

    assert DirectionConfig.from_preset("cpu").induce_fraction == 0.5
    chosen = parse_assignments(["induce_fraction=none", "kl_threshold=0.2"], DirectionConfig, "--direction-config")
    config = stage_config(DirectionConfig, "cpu", chosen)
    assert config.induce_fraction is None and config.kl_threshold == 0.2
    assert stage_config(DirectionConfig, "cpu", {"kl_threshold": 0.2}).induce_fraction == 0.5


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


# ----------------------------------------------------------------------------- reruns (issue #12, items 1 and 5)

SMALL = ["--preset", "cpu", "--steps", "2", "--prompts-per-step", "1", "--rollouts-per-prompt", "2",
         "--max-new-tokens", "4", "--lora-r", "4", "--skip-eval"]
WAYS_OUT = ("rerun with the earlier settings to {verb} it, pass --restart {stage} to redo {stage} and the stages after "
            "it, --overwrite to start the run over, or choose a new --out")


def error_line(err: str) -> str:
    """The one line a refused command prints on stderr (progress bars of the model loading aside)."""
    import re

    lines = [ln for ln in re.split(r"[\r\n]+", err) if ln.strip() and not re.search(r"\|.*\| *\d+/\d+ \[", ln)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def stand_in_stages(monkeypatch, spec, safety_ids):
    """Stages 1 and 2 replaced by stand-ins that write their files (direction and S can be changed in between)."""
    from safesteer import pipeline

    state = {"ids": list(safety_ids), "spec": spec}

    def fake_direction(args, model, tokenizer, identity, out_dir):
        write_spec(state["spec"], out_dir)
        return state["spec"], False

    def fake_tokens(args, preset, model, tokenizer, identity, out_dir):
        (out_dir / "safety_tokens.json").write_text(json.dumps({"tokens": [{"id": i} for i in state["ids"]]}))
        return False

    monkeypatch.setattr(pipeline, "_ensure_direction", fake_direction)
    monkeypatch.setattr(pipeline, "_ensure_tokens", fake_tokens)
    return state


def test_a_finished_run_is_reused_only_with_the_settings_and_inputs_that_made_it(tmp_path, tiny_model_dir, spec,
                                                                               safety_ids, monkeypatch, capsys):
    """Item 1: a rerun with another training setting or another S stops with one line naming it and the ways
    out; --restart training redoes training; summary-only settings never make the trained model stale."""
    from safesteer import cli
    from safesteer.utils import sha256_file

    out = tmp_path / "run"
    stand_in = stand_in_stages(monkeypatch, spec, safety_ids)
    argv = ["align", "--model", str(tiny_model_dir), "--out", str(out), *SMALL, "--learning-rate", "1e-2"]
    assert cli.main(argv) == 0
    record = (out / "model" / "safesteer.json").read_bytes()
    capsys.readouterr()

    assert cli.main([*argv, "--learning-rate", "2e-2"]) == 2  # the last --learning-rate counts
    assert error_line(capsys.readouterr().err) == (
        f"safesteer align: error: {out} holds a trained model made with other settings or inputs (learning_rate "
        f"0.01 -> 0.02); " + WAYS_OUT.format(verb="reuse", stage="training"))
    assert (out / "model" / "safesteer.json").read_bytes() == record  # the old model stays as it was

    old_sha = sha256_file(out / "safety_tokens.json")
    stand_in["ids"] = safety_ids[:-1]  # stage 2 selected another S: the model was not trained on it
    assert cli.main(argv) == 2
    new_sha = sha256_file(out / "safety_tokens.json")
    assert error_line(capsys.readouterr().err) == (
        f"safesteer align: error: {out} holds a trained model made with other settings or inputs (safety_tokens.json "
        f"{old_sha[:12]} -> {new_sha[:12]}); " + WAYS_OUT.format(verb="reuse", stage="training"))
    stand_in["ids"] = list(safety_ids)

    # Settings of the summary alone, and the loss's memory knob: the trained model is reused as it is.
    assert cli.main([*argv, "--eval-limit", "8", "--eval-max-new-tokens", "4", "--chunk-size", "3"]) == 0
    timings = json.loads((out / "timings.json").read_text())
    assert timings["stages"]["training"]["reused"] is True
    assert (out / "model" / "safesteer.json").read_bytes() == record

    assert cli.main([*argv, "--learning-rate", "2e-2", "--restart", "training"]) == 0
    assert "redoing training and the stages after it: removed checkpoint, model, metrics.jsonl" in capsys.readouterr().out
    assert json.loads((out / "model" / "safesteer.json").read_text())["config"]["learning_rate"] == 2e-2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert cli.main([*argv, "--learning-rate", "2e-2"]) == 0  # and that run is reused by the same command
    assert json.loads((out / "timings.json").read_text())["stages"]["training"]["reused"] is True

    assert cli.main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "model" / "safesteer.json").read_text())["config"]["learning_rate"] == 1e-2
    assert len(json.loads((out / "timings.json").read_text())["previous_runs"]) == 0  # a run started over


def test_an_interrupted_run_resumes_with_the_same_command_and_refuses_another(tmp_path, tiny_model_dir, spec,
                                                                            safety_ids, monkeypatch, capsys):
    from safesteer import cli
    from safesteer.train.trainer import Trainer
    from safesteer.utils import sha256_file

    out = tmp_path / "run"
    stand_in = stand_in_stages(monkeypatch, spec, safety_ids)
    argv = ["align", "--model", str(tiny_model_dir), "--out", str(out), *SMALL, "--learning-rate", "1e-2"]
    train = Trainer.train

    def one_step_then_ctrl_c(self, max_steps=None):
        train(self, max_steps=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", one_step_then_ctrl_c)
    assert cli.main(argv) == 130
    monkeypatch.setattr(Trainer, "train", train)
    assert (out / "checkpoint" / "state.json").is_file() and not (out / "model").exists()
    capsys.readouterr()

    assert cli.main([*argv, "--lora-r", "8"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"safesteer align: error: {out} holds an interrupted training run made with other settings or inputs (lora_r "
        f"4 -> 8); " + WAYS_OUT.format(verb="resume", stage="training"))
    # Stage 1 made another direction: the half-trained student must not go on with another teacher.
    old_sha = sha256_file(out / "direction.safetensors")
    stand_in["spec"] = Spec.random(layer=1, seed=8)
    assert cli.main(argv) == 2
    assert error_line(capsys.readouterr().err) == (
        f"safesteer align: error: {out} holds an interrupted training run made with other settings or inputs "
        f"(direction.safetensors {old_sha[:12]} -> {sha256_file(out / 'direction.safetensors')[:12]}); "
        + WAYS_OUT.format(verb="resume", stage="training"))
    stand_in["spec"] = spec
    assert cli.main(argv) == 0
    assert "resuming from step 1 of 2" in capsys.readouterr().out
    assert json.loads((out / "timings.json").read_text())["stages"]["training"]["resumed_at_step"] == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


REAL_STAGES = [
    # paper preset: the absolute induce threshold, so that a random tiny model passes stage 1's filters
    "--preset", "paper", "--finetune", "lora", "--steps", "1", "--prompts-per-step", "1", "--rollouts-per-prompt", "2",
    "--max-new-tokens", "4", "--lora-r", "4", "--lora-alpha", "8", "--no-gradient-checkpointing",
    "--generation-dtype", "float32", "--skip-eval",
    "--direction.n-train", "4", "--direction.n-val", "4", "--direction.batch-size", "8", "--direction.layers", "1-2",
    "--direction.positions=-1", "--no-direction.filter-prompts", "--direction.kl-threshold", "1e9",
    "--direction.induce-threshold=-1e9", "--direction.max-layer-frac", "1", "--direction.selection-dtype", "float32",
    "--tokens.horizon", "2", "--tokens.samples-per-prompt", "1", "--tokens.n-prompts", "2",
    "--tokens.top-k-per-position", "20", "--tokens.n-tokens", "4", "--tokens.batch-size", "4",
    "--tokens.generation-dtype", "float32"]


def test_stage_settings_that_differ_from_the_stored_stages_are_named_not_reused(tmp_path, tiny_model_dir, capsys):
    """Item 1 on the real stages 1 and 2: each compares its stored result with the rerun's settings."""
    from safesteer import cli
    from safesteer.utils import sha256_file

    out = tmp_path / "run"
    argv = ["align", "--model", str(tiny_model_dir), "--out", str(out), *REAL_STAGES]
    assert cli.main(argv) == 0
    direction = (out / "direction.json").read_bytes()
    capsys.readouterr()

    assert cli.main([*argv, "--direction.kl-threshold", "1e8"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"safesteer align: error: {out} holds a refusal direction (stage 1) made with other settings or inputs "
        f"(direction.kl_threshold 1e+09 -> 1e+08); " + WAYS_OUT.format(verb="reuse", stage="direction"))
    assert (out / "direction.json").read_bytes() == direction

    assert cli.main([*argv, "--tokens.n-tokens", "3"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"safesteer align: error: {out} holds safety tokens (stage 2) made with other settings or inputs "
        f"(tokens.n_tokens 4 -> 3); " + WAYS_OUT.format(verb="reuse", stage="tokens"))

    assert cli.main([*argv, "--tokens.n-tokens", "3", "--restart", "tokens"]) == 0
    tokens = json.loads((out / "safety_tokens.json").read_text())
    record = json.loads((out / "model" / "safesteer.json").read_text())
    assert tokens["config"]["n_tokens"] == 3 and (out / "direction.json").read_bytes() == direction
    assert record["artifacts"]["safety_tokens.json"] == sha256_file(out / "safety_tokens.json")  # trained on the new S
    assert cli.main([*argv, "--tokens.n-tokens", "3"]) == 0
    stages = json.loads((out / "timings.json").read_text())["stages"]
    assert stages["direction"]["reused"] and stages["tokens"]["reused"] and stages["training"]["reused"]


def test_the_default_cpu_run_fits_its_gate_and_trains_with_contrast_prompts(tmp_path, tiny_model_dir, capsys):
    """`safesteer align` with no --preset on a CPU is cpu-gated: stages 1-2 of the cpu preset, a gate fitted
    into OUT, and training with the gated teacher on harmful rows and -0.15 r on the built-in contrast set."""
    from conftest import TINY_STAGES
    from safesteer import cli
    from safesteer.teacher.direction import DirectionConfig

    out = tmp_path / "run"
    assert cli.main(["align", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--steps", "2",
                     "--learning-rate", "1e-2", *TINY_STAGES]) == 0
    printed = capsys.readouterr().out
    assert "preset cpu-gated:" in printed and "[gate] no gate in" in printed
    direction = json.loads((out / "direction.json").read_text())
    assert direction["config"]["induce_fraction"] == DirectionConfig.from_preset("cpu").induce_fraction
    gate = json.loads((out / "gate.json").read_text())
    assert gate["layer"] <= direction["layer"]
    # Training skips the held-out measurements (`safesteer gate` makes them): only the fitting sets were read.
    assert set(gate["prompt_counts"]) == {"harmful_fit", "benign_fit", "harmful_val", "benign_val"}
    assert "vs_edgy_report" not in gate["chosen"] and "edgy_report" not in gate["mean_gate"]
    record = json.loads((out / "model" / "safesteer.json").read_text())
    assert record["config"]["preset"] == "cpu-gated" and record["config"]["gate"] == "on"
    assert record["config"]["contrast_coeff"] == -0.15 and record["gate"]["layer"] == gate["layer"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["teacher_gate_mean"] <= 1.0 and "contrast_loss" in r for r in rows)
    # The same command reuses everything, the gate included.
    assert cli.main(["align", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--steps", "2",
                     "--learning-rate", "1e-2", *TINY_STAGES]) == 0
    assert "[gate] no gate in" not in capsys.readouterr().out
    assert json.loads((out / "timings.json").read_text())["stages"]["training"]["reused"] is True
