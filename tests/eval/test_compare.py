"""`safesteer compare`: base model, steered teacher and finished align runs (merged and adapter) on one
evaluation, one model in memory besides the base at a time; its outputs, its resume, taking over a run's
own answers only when weights and settings match, and its one-line errors."""

import gc
import json
import struct
import weakref

import pytest
import torch

from conftest import perturbed_copy
from safesteer import cli
from safesteer.core import generation
from safesteer.eval import suites
from safesteer.eval.suites import evaluate_models, eval_config_from_args, load_align_entries
from safesteer.io import models

pytestmark = pytest.mark.usefixtures("one_thread")

# Every suite but GSM8K (the table has no column for it), small enough for the tiny random models.
FLAGS = ["--n-harmful", "3", "--n-edgy", "3", "--n-harmless", "2", "--n-mmlu", "4", "--n-gsm8k", "0", "--n-drift", "3",
         "--max-new-tokens", "4", "--drift-max-new-tokens", "5", "--batch-size", "4", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def _write_direction(path, hidden=32, layer=1, coeff=1.0, scale=4.0):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"direction": scale * torch.randn(hidden, generator=torch.Generator().manual_seed(3))},
              str(path / "direction.safetensors"))
    (path / "direction.json").write_text(json.dumps({"layer": layer, "coeff": coeff}))
    return path


def _record(path, base_dir):
    """OUT/model/safesteer.json as training leaves it, reduced to what compare reads."""
    (path / "model" / "safesteer.json").write_text(json.dumps({"format": 1, "base_model": {"name": str(base_dir.resolve())}}))


def _merged_run(path, base_dir, tokenizer, seed=1):
    """A finished align run whose student is merged: direction files and RUN/model (other weights, same tokenizer)."""
    from transformers import AutoModelForCausalLM

    _write_direction(path)
    perturbed_copy(AutoModelForCausalLM.from_pretrained(base_dir), seed=seed).save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    _record(path, base_dir)
    return path


def _adapter_run(path, base_dir):
    """A finished align run saved as a LoRA adapter (non-zero, so the student differs from the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path / "model")
    _record(path, base_dir)
    return path


class Counters:
    """What is computed: answers generated (both engines start in `_generate_todo`, called also when every
    answer is on file, so its todo list is counted), the drift reference's generation batches, MMLU scoring
    and drift forward passes (calls)."""

    def __init__(self, monkeypatch):
        self.calls = {"generate": 0, "generate_batch": 0, "mmlu": 0, "drift": 0}
        for module, name, key in ((generation, "_generate_todo", "generate"),
                                  (generation, "generate_batch", "generate_batch"),
                                  (suites, "mmlu_letter_logprobs", "mmlu"), (suites, "token_drift", "drift")):
            monkeypatch.setattr(module, name, self._counting(getattr(module, name), key))

    def _counting(self, real, key):
        def wrapper(*a, **k):
            self.calls[key] += len(a[2]) if key == "generate" else 1  # _generate_todo(model, tokenizer, todo, ...)
            return real(*a, **k)

        return wrapper

    def reset(self):
        self.calls = dict.fromkeys(self.calls, 0)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG
    return struct.unpack(">II", data[16:24])


def test_every_point_evaluated_once_with_the_rates_of_its_results_and_a_rerun_computes_nothing(
        tmp_path, tiny_model_dir, smol_tokenizer, monkeypatch, capsys):
    run_a = _merged_run(tmp_path / "runs" / "a", tiny_model_dir, smol_tokenizer)
    run_b = _adapter_run(tmp_path / "runs" / "b", tiny_model_dir)
    out = tmp_path / "cmp"
    loads = []
    real_load = models.load_model

    def tracking_load(name, **kw):
        gc.collect()
        alive = [n for n, ref in loads[1:] if ref() is not None]
        assert not alive, f"{alive} still in memory while {name} loads"  # one model besides the base at a time
        loaded = real_load(name, **kw)
        loads.append((name, weakref.ref(loaded.model)))
        return loaded

    monkeypatch.setattr(models, "load_model", tracking_load)
    argv = ["compare", "--model", str(tiny_model_dir), "--teacher", str(run_a), "--run", f"cpu={run_a}",
            "--run", f"lora={run_b}", "--out", str(out), *FLAGS]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # The base, then each run's model (the adapter on a fresh copy of the base); all freed once done.
    assert [n for n, _ in loads] == [str(tiny_model_dir), str(run_a / "model"), str(tiny_model_dir)]
    gc.collect()
    assert [n for n, ref in loads[1:] if ref() is not None] == []

    data = json.loads((out / "compare.json").read_text())
    results = json.loads((out / "results.json").read_text())
    points = {p["name"]: p for p in data["points"]}
    assert list(points) == list(results["models"]) == ["base", "teacher", "cpu", "lora"]
    assert [p["kind"] for p in data["points"]] == ["base", "teacher", "run", "run"]
    assert data["part"] == "report" and data["tradeoff_set"] == "edgy"
    assert points["cpu"]["source"] == str(run_a) and points["teacher"]["what"] == "steered teacher"
    for name, p in points.items():
        m = results["models"][name]
        assert p["harmful_refusal"]["n"] == 6 and p["overrefusal"]["edgy"]["n"] == 3
        assert p["overrefusal"]["harmless"]["n"] == 2 and p["mmlu"]["n"] == 4
        # The numbers are the evaluation's own, and its judged answers count to them.
        assert p["harmful_refusal"] == m["safety"]["overall"]["refusal"]
        assert p["overrefusal"] == {s: e["refusal"] for s, e in m["overrefusal"]["sets"].items()}
        assert p["mmlu"] == m["mmlu"]["accuracy"] and p["kl_drift"] == m["drift"]
        judged = [json.loads(line) for line in (out / p["folder"] / "safety.judged.jsonl").read_text().splitlines()]
        assert (sum(r["refused"] for r in judged), len(judged)) == (p["harmful_refusal"]["k"], 6)
        assert p["harmful_refusal"]["ci_low"] <= p["harmful_refusal"]["rate"] <= p["harmful_refusal"]["ci_high"]
    assert points["base"]["kl_drift"]["is_reference"]
    assert all(points[n]["kl_drift"]["kl_mean"] > 0 for n in ("teacher", "cpu", "lora"))

    width, height = _png_size(out / "tradeoff.png")
    assert 500 <= width <= 1600 and 400 <= height <= 1200 and (out / "tradeoff.png").stat().st_size > 10_000
    md = (out / "compare.md").read_text()
    assert "| point | what | harmful refusal | edgy over-refusal | harmless over-refusal | KL drift | MMLU |" in md
    for name in points:
        assert f"| {name} |" in md and f"| {name} |" in printed
    page = (out / "compare.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 and "<script" not in page and "Trade-off of harmful" in page
    assert all(f"<td>{name}</td>" in page for name in points)

    # The same command again: every answer and score is read back, nothing is computed, the numbers stay.
    monkeypatch.setattr(models, "load_model", real_load)
    counters = Counters(monkeypatch)
    assert cli.main(argv) == 0
    assert counters.calls == {"generate": 0, "generate_batch": 0, "mmlu": 0, "drift": 0}
    assert json.loads((out / "compare.json").read_text())["points"] == data["points"]


def test_a_runs_own_answers_are_taken_over_only_with_the_same_weights_and_settings(
        tmp_path, tiny_model_dir, smol_tokenizer, monkeypatch):
    run = _merged_run(tmp_path / "run", tiny_model_dir, smol_tokenizer)
    # The run's own evaluation, as align's summary makes it (same loading, same settings as FLAGS).
    config = eval_config_from_args(cli.build_parser().parse_args(["compare", "--out", "x", *FLAGS]))
    own = evaluate_models(load_align_entries(run, str(tiny_model_dir), None, None), config, run / "eval")
    gc.collect()
    counters = Counters(monkeypatch)
    argv = ["compare", "--model", str(tiny_model_dir), "--run", f"cpu={run}", *FLAGS]

    assert cli.main([*argv, "--out", str(tmp_path / "same")]) == 0
    assert counters.calls == {"generate": 0, "generate_batch": 0, "mmlu": 0, "drift": 0}
    cpu = json.loads((tmp_path / "same" / "compare.json").read_text())["points"][1]
    assert cpu["reused_answers"]["from"] == str(run / "eval" / "aligned") and cpu["reused_answers"]["rows"] > 0
    assert cpu["harmful_refusal"] == own["models"]["aligned"]["safety"]["overall"]["refusal"]
    assert cpu["kl_drift"] == own["models"]["aligned"]["drift"]

    # Other settings: the rows are there, but none has this comparison's key, so every answer is generated.
    counters.reset()
    assert cli.main([*argv, "--max-new-tokens", "5", "--out", str(tmp_path / "longer")]) == 0
    assert counters.calls["generate"] == 2 * (6 + 5)  # the base and cpu answer every prompt again
    rows = [json.loads(line) for line in (tmp_path / "longer" / "cpu" / "safety.jsonl").read_text().splitlines()]
    assert sorted(r["settings"]["max_new_tokens"] for r in rows) == [4] * 6 + [5] * 6

    # Other weights in RUN/model: nothing is taken over.
    from transformers import AutoModelForCausalLM

    perturbed_copy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), seed=9).save_pretrained(run / "model")
    counters.reset()
    assert cli.main([*argv, "--out", str(tmp_path / "retrained")]) == 0
    cpu = json.loads((tmp_path / "retrained" / "compare.json").read_text())["points"][1]
    assert cpu["reused_answers"] is None and counters.calls["generate"] == 6 + 5 and counters.calls["mmlu"] > 0
    assert len((tmp_path / "retrained" / "cpu" / "safety.jsonl").read_text().splitlines()) == 6  # all its own


def test_bad_points_are_one_line_errors_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    finished = tmp_path / "finished"
    (finished / "model").mkdir(parents=True)
    (finished / "model" / "safesteer.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "cmp"
    cases = [
        (["--run", str(finished)], f"--run '{finished}' has no name; use --run NAME=RUN_DIR, e.g. --run cpu={finished}"),
        (["--run", f"=={finished}"], "use --run NAME=RUN_DIR with both parts"),
        (["--run", f"cpu={empty}"], f"--run cpu={empty}: {empty} holds no trained model (no model/safesteer.json)"),
        (["--run", f"cpu={tmp_path / 'nowhere'}"], "is not a folder"),
        (["--teacher", str(empty)],
         f"--teacher {empty}: {empty} lacks direction.json, direction.safetensors; make them with `safesteer align"),
        (["--gated", f"g={empty}"], "lacks direction.json, direction.safetensors, gate.json, gate.safetensors"),
        (["--run", f"a={finished}", "--run", f"a={finished}"], "point name(s) a given twice"),
        (["--run", f"base={finished}"], "point name(s) base given twice ('base' is the --model)"),
        ([], "nothing to compare with the base model"),
    ]
    for extra, message in cases:
        assert cli.main(["compare", "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("safesteer compare: error: ") and message in err, (extra, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()  # nothing written
    assert cli.main(["compare", "--out", str(finished), "--run", f"a={finished}"]) == 2
    assert "is the folder of the point a; give the comparison a folder of its own" in capsys.readouterr().err
