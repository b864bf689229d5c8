"""Evaluation pieces beyond the paper: the edgy set's tune/report parts and the gated teacher as a model entry."""

import json

import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.eval.capability import token_drift
from safesteer.eval.suites import (EvalConfig, ModelEntry, build_sets, evaluate_models, gated_entry, model_slug,
                                   steered_entry)
from safesteer.io.prompts import builtin_splits
from safesteer.teacher.gate import Gate, Probe, direction_sha, save_gate
from safesteer.teacher.direction import load_direction


def test_every_builtin_set_reads_its_report_part_unless_told_tune():
    splits = builtin_splits(0)
    config = dict(n_harmful=None, n_edgy=None, n_harmless=None)
    default = {s.name: s for s in build_sets(EvalConfig(**config))}
    tuned = {s.name: s for s in build_sets(EvalConfig(**config, part="tune"))}
    assert set(default) == set(tuned) == {"advbench", "harmbench", "edgy", "harmless"}
    for name, split in (("advbench", "harmful"), ("harmbench", "harmbench"), ("edgy", "edgy"), ("harmless", "harmless")):
        report, tune = ({p.text for p in splits[split][part]} for part in ("report", "tune"))
        assert report and tune and not report & tune, name
        assert {p.text for p in default[name].prompts} == report and "report part" in default[name].source
        assert {p.text for p in tuned[name].prompts} == tune and "tune part" in tuned[name].source
    assert default["harmless"].kind == "overrefusal"
    with pytest.raises(SafesteerError, match="unknown evaluation part 'all'; use one of: tune, report"):
        EvalConfig(part="all")


def _run_dir(path, hidden, bias):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"direction": 4.0 * torch.randn(hidden, generator=torch.Generator().manual_seed(3))},
              str(path / "direction.safetensors"))
    (path / "direction.json").write_text(json.dumps({"layer": 2, "coeff": 1.0}))
    spec = load_direction(path)
    gate = Gate(1, Probe(torch.zeros(hidden), torch.ones(hidden), torch.zeros(hidden), bias), 0.0, 1.0)
    save_gate(path, gate, {"layer": 1, "shape": "ramp", "thresholds": {"low": 0.0, "high": 1.0},
                           "direction_sha256": direction_sha(spec)})
    return path


def test_gated_entry_is_the_steered_teacher_where_g_is_one_and_the_base_where_it_is_zero(tmp_path, tiny_model,
                                                                                       smol_tokenizer):
    hidden = tiny_model.config.hidden_size
    base = ModelEntry("base", tiny_model, smol_tokenizer)
    on, off = _run_dir(tmp_path / "on", hidden, 5.0), _run_dir(tmp_path / "off", hidden, -5.0)
    steered, gated_on, gated_off = steered_entry(base, on), gated_entry(base, on), gated_entry(base, off)
    assert gated_on.name == "base+gated" and gated_on.info["steering"]["mode"] == "gated"
    assert gated_on.info["steering"]["gate_layer"] == 1
    prompts, completions = ["Hello there.", "How do I bake bread?"], [[50, 60, 70], [80, 90]]
    drift_steered = token_drift(base, steered, prompts, completions)
    assert token_drift(base, gated_on, prompts, completions) == drift_steered  # g = 1: the steered teacher
    assert all(r["kl_sum"] == 0 for r in token_drift(base, gated_off, prompts, completions))  # g = 0: the base
    assert drift_steered[0]["kl_sum"] > 0


def test_gated_entry_refuses_a_gate_of_another_direction(tmp_path, tiny_model, smol_tokenizer):
    run = _run_dir(tmp_path / "run", tiny_model.config.hidden_size, 5.0)
    meta = json.loads((run / "gate.json").read_text())
    (run / "gate.json").write_text(json.dumps({**meta, "direction_sha256": "elsewhere"}))
    with pytest.raises(SafesteerError, match="another refusal direction"):
        gated_entry(ModelEntry("base", tiny_model, smol_tokenizer), run)
    with pytest.raises(SafesteerError, match="no gate"):
        gated_entry(ModelEntry("base", tiny_model, smol_tokenizer), _only_direction(tmp_path / "run2",
                                                                                 tiny_model.config.hidden_size))


def _only_direction(path, hidden):
    run = _run_dir(path, hidden, 0.0)
    (run / "gate.json").unlink()
    return run


def test_gated_entry_answers_in_an_evaluation(tmp_path, tiny_model, smol_tokenizer):
    """Fixed batches (generate): continuous batching would move rows away from their gate values."""
    base = ModelEntry("base", tiny_model, smol_tokenizer)
    gated = gated_entry(base, _run_dir(tmp_path / "on", tiny_model.config.hidden_size, 5.0))
    assert gated.engine == "generate"
    config = EvalConfig(suites=("safety", "overrefusal"), n_harmful=3, n_edgy=3, n_harmless=3, max_new_tokens=3, batch_size=2,
                        progress=False)
    results = evaluate_models([base, steered_entry(base, tmp_path / "on"), gated], config, tmp_path / "eval")
    assert set(results["models"]) == {"base", "base+steer", "base+gated"}
    steered = [r["response"] for r in _answers(tmp_path / "eval" / model_slug("base+steer"))]
    assert len(steered) == 12
    assert [r["response"] for r in _answers(tmp_path / "eval" / model_slug("base+gated"))] == steered  # g = 1 here


def _answers(folder):
    rows = []
    for name in ("safety.jsonl", "overrefusal.jsonl"):
        path = folder / name
        if path.is_file():
            rows += sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                           key=lambda r: r["prompt_uid"])
    return rows
