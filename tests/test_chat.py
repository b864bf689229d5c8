"""`safesteer chat`: the side-by-side formatting, and one-shot mode through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from safesteer import cli
from safesteer.chat import BASE_LABEL, STEERED_LABEL, format_exchange


def test_format_exchange_labels_both_answers_in_order():
    text = format_exchange("How do I clean a showerhead?", "Soak it in vinegar.\nThen rinse.",
                           "I'm sorry, but I can't help with that.", steer_note="layer 9, coeff 1")
    lines = text.splitlines()
    assert lines[0] == ">>> How do I clean a showerhead?"
    base_at = next(i for i, l in enumerate(lines) if BASE_LABEL in l)
    steer_at = next(i for i, l in enumerate(lines) if STEERED_LABEL in l)
    assert base_at < steer_at and "layer 9, coeff 1" in lines[steer_at]
    assert lines[base_at + 1: steer_at] == ["Soak it in vinegar.", "Then rinse."]  # line breaks kept
    assert lines[steer_at + 1] == "I'm sorry, but I can't help with that."


def test_format_exchange_wraps_long_lines_and_marks_empty_answers():
    text = format_exchange("q", "word " * 60, "", width=40)
    body = text.split(STEERED_LABEL)[0].splitlines()[2:]
    assert len(body) > 1 and all(len(l) <= 40 for l in body)
    assert "(empty answer)" in text.split(STEERED_LABEL)[1]


def write_direction(path, hidden, layer=1):
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file({"direction": torch.randn(hidden) * 8}, str(path / "direction.safetensors"))
    (path / "direction.json").write_text(json.dumps({"layer": layer, "coeff": 1.0, "position": -1}))
    return path


def test_chat_one_shot_on_a_tiny_local_model(tmp_path, tiny_model_dir, capsys):
    steer = write_direction(tmp_path / "run", 32)
    argv = ["chat", "--model", str(tiny_model_dir), "--steer", str(steer), "--prompt", "Say hi.", "--max-new-tokens", "5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> Say hi.") and BASE_LABEL in out and f"{STEERED_LABEL} (layer 1, coeff 1)" in out
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--steer", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "direction" in capsys.readouterr().err


def test_chat_interactive_loop_ends_on_exit(tmp_path, tiny_model_dir, capsys, monkeypatch):
    steer = write_direction(tmp_path / "run", 32)
    answers = iter(["Name a colour.", "", "exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--steer", str(steer), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 1 and ">>> Name a colour." in out


@pytest.mark.slow
def test_chat_one_shot_on_smollm2(tmp_path, capsys):
    steer = write_direction(tmp_path / "run", 576, layer=10)
    argv = ["chat", "--model", "smollm2-135m-instruct", "--steer", str(steer), "--prompt", "What is the capital of France?",
            "--max-new-tokens", "16", "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    base = out.split(BASE_LABEL)[1].split(STEERED_LABEL)[0]
    steered = out.split(STEERED_LABEL)[1]
    assert base.strip() and steered.strip() and base != steered  # a strong random direction changes the answer
