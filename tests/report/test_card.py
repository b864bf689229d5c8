"""The model card: front matter, the preset's departures from the paper, and the before/after table."""

from dataclasses import asdict

import yaml

from safesteer.eval.stats import Rate
from safesteer.report.card import build_model_card, write_model_card
from safesteer.teacher.direction import DirectionConfig
from safesteer.teacher.tokens import SafetyTokenConfig
from safesteer.train.config import TrainConfig
from safesteer.utils import write_json_atomic


def trained_run(root, *, summary: bool, identity=None, saved_as="model"):
    """A run directory as `align` leaves it, written by hand (no model needed)."""
    identity = identity or {"name": "qwen2.5-coder-0.5b-instruct", "kind": "builtin", "gguf_sha256": "ab" * 32,
                            "family": "qwen", "architecture": "Qwen2ForCausalLM", "n_layers": 24}
    write_json_atomic(root / "model" / "safesteer.json", {
        "config": asdict(TrainConfig.from_preset("cpu", "qwen")), "base_model": identity, "saved_as": saved_as,
        "steps_done": 12, "train_prompts": {"n": 100}, "direction": {"layer": 17, "coeff": 1.0},
        "safety_tokens": {"ids": [1, 2, 3], "texts": ["Sorry", " cannot", "a|b"]},
        "versions": {"safesteer": "0.1.0", "peft": None}})
    tokens = SafetyTokenConfig.from_preset("cpu")
    write_json_atomic(root / "safety_tokens.json", {"config": asdict(tokens), "tokens": [{"id": 1, "text": "Sorry"}],
                                                   "resolved": {"horizon": 7, "min_steered_prob": 1e-3}})
    write_json_atomic(root / "direction.json", {"layer": 17, "position": -1, "coeff": 1.0,
                                                "config": asdict(DirectionConfig.from_preset("cpu"))})
    if summary:
        rates = {"harmful (held-out AdvBench)": {"base": Rate(37, 64).to_dict(), "aligned": Rate(54, 64).to_dict()},
                 "edgy (over-refusal)": {"base": Rate(17, 64).to_dict(), "aligned": Rate(28, 64).to_dict()}}
        write_json_atomic(root / "summary.json", {"judge": "keyword-v1", "rates": rates})
    return root


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_card_names_the_base_model_the_presets_departures_and_the_judges_limits(tmp_path):
    text = build_model_card(trained_run(tmp_path, summary=False))
    meta = front_matter(text)
    assert meta["base_model"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and {"safesteer", "lora"} <= set(meta["tags"])
    assert "localized on-policy distillation" in text
    # the cpu preset's departures, each named with the paper's value beside it
    for phrase in ("Loss `localized_bucket`", "instead of a full fine-tune", "steering layer and above",
                   ">= 0.001 (paper: 1e-08)", "K'=10 tokens (paper: K'=200)", "relative induce filter"):
        assert phrase in text, phrase
    assert "| steps | 12 | 25 |" in text and "| votes per position (K') | 10 | 200 |" in text
    assert "Not evaluated yet" in text and "not a harm classifier" in text
    assert "'a|b'" in text  # token texts as Python literals, not markdown


def test_card_names_the_training_extensions_beyond_the_paper(tmp_path):
    run = trained_run(tmp_path, summary=False)
    assert "Beyond the paper" not in build_model_card(run)  # the cpu preset uses none of them
    record_path = run / "model" / "safesteer.json"
    import json

    record = json.loads(record_path.read_text())
    record["config"] = asdict(TrainConfig.from_preset("cpu-contrast", "qwen", contrast_coeff=-0.5))
    write_json_atomic(record_path, record)
    text = build_model_card(run)
    assert "contrast prompts (builtin), 2 per step" in text and "steered with coefficient -0.5" in text
    assert "loss weight 4" in text and "greedy continuation" in text
    assert "first 4 completion positions weigh 4x" in text and "gated teacher" not in text


def test_card_has_the_before_after_table_with_intervals_once_the_summary_exists(tmp_path):
    run = trained_run(tmp_path, summary=True)
    path = write_model_card(run)
    text = path.read_text()
    assert path == run / "model" / "README.md" and not list((run / "model").glob(".README.md.*"))
    assert "| metric | base | aligned |" in text
    assert f"| harmful (held-out AdvBench) | 57.8% [{100 * Rate(37, 64).low:.1f}%-" in text
    assert "(54/64) |" in text and "Not evaluated yet" not in text and "`keyword-v1`" in text


def test_an_adapter_and_a_local_base_model(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    run = trained_run(tmp_path / "run", summary=False, saved_as="adapter",
                      identity={"name": str(base), "kind": "local", "family": "llama"})
    meta = front_matter(build_model_card(run))
    assert meta["library_name"] == "peft" and meta["license"] == "mit" and "base_model" not in meta
    (tmp_path / "empty").mkdir()
    assert write_model_card(tmp_path / "empty") is None  # no trained model: no card
