"""Hostile and malformed inputs through the real command line (issue #12).

Every case must end in ONE line on stderr that names the problem and the fix, a non-zero exit code,
no traceback and no output left behind. Most cases call `cli.main` in this process (a traceback would
fail the test just the same); a few run `python -m safesteer.cli` in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_ALIGN, default_sigint, make_tiny_model
from safesteer import cli
from safesteer.errors import SafesteerError
from safesteer.io.prompts import MAX_PROMPT_CHARS, load_prompts
from safesteer.teacher.direction import load_direction
from safesteer.teacher.tokens import load_safety_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parent.parent / "src"


def run_cli(args: list[str], cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    """`python -m safesteer.cli ARGS` (or `python -c CODE`) as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "safesteer.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=default_sigint)


PROGRESS_BAR = re.compile(r"\|.*\| *\d+/\d+ \[")  # transformers' "Loading weights" bar of a model that did load


def assert_one_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in re.split(r"[\r\n]+", err) if ln.strip() and not PROGRESS_BAR.search(ln)]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- prompt files

HOSTILE_PROMPT_FILES = {
    # name: (bytes, what the error line must say)
    "latin1.txt": (b"How do I bake bread?\nCr\xe8me br\xfbl\xe9e recipe\n", "line 2 is not UTF-8 text"),
    "binary.txt": (bytes(range(256)) * 16, "looks like a binary file"),
    "utf16.txt": ("How do I bake bread?\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    "long.txt": (b"x" * (10 << 20) + b"\n", f"over the {MAX_PROMPT_CHARS:,}-character limit"),
    "empty.txt": (b"", "is empty"),
    "blank.jsonl": (b"\n  \n", "is empty"),
    "bom.csv": (b"\xef\xbb\xbfprompt\n" + b"y" * 200_000 + b"\n", "not valid CSV near line 2"),
    "scalar.json": (b'"just a string"', "expected a JSON list of prompts"),
}


@pytest.mark.parametrize("name", HOSTILE_PROMPT_FILES)
def test_hostile_prompt_files_give_one_line_and_write_nothing(tmp_path, capsys, name):
    data, needle = HOSTILE_PROMPT_FILES[name]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out" / "responses.jsonl"
    code, err = run_main(["generate", "--prompts", str(tmp_path / name), "--model", "smollm2-135m-instruct",
                          "--limit", "1", "--out", str(out)], capsys)
    assert code == 2
    line = assert_one_line(err, "safesteer generate: error:", name, needle)
    assert any(fix in line for fix in ("UTF-8", "shorten", "put at least one prompt", "fix the file", "list of prompts"))
    assert files_under(tmp_path) == {name}


def test_prompt_file_with_a_byte_order_mark_loads(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,type\nHow do I kill a process?,homonyms\n")
    assert [p.text for p in load_prompts(str(tmp_path / "bom.csv"))] == ["How do I kill a process?"]


def test_prompt_at_the_length_limit_loads(tmp_path):
    (tmp_path / "p.txt").write_text("x" * MAX_PROMPT_CHARS + "\nshort\n")
    assert [len(p.text) for p in load_prompts(str(tmp_path / "p.txt"))] == [MAX_PROMPT_CHARS, 5]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}) + "\n")
    with pytest.raises(SafesteerError, match="row 1 is 100,001 characters long"):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_non_utf8_prompt_file_through_the_real_command(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\x00garbage\xc3\n")
    (tmp_path / "latin.txt").write_bytes(b"Cr\xe8me\n")
    proc = run_cli(["generate", "--prompts", "latin.txt", "--model", "smollm2-135m-instruct", "--limit", "1",
                    "--out", "x.jsonl"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line(proc.stderr, "safesteer generate: error: latin.txt: line 1 is not UTF-8 text (byte 0xe8",
                    "iconv -f latin1 -t utf-8")
    assert files_under(tmp_path) == {"bad.txt", "latin.txt"}


# ----------------------------------------------------------------------------- model folders


def _broken_model(tmp_path: Path, tiny_model_dir: Path, how: str) -> Path:
    folder = tmp_path / f"model-{how}"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif how == "tiny":
        weights.write_bytes(b"\x01\x02")
    elif how == "badconfig":
        (folder / "config.json").write_text('{"model_type": "llama", ')
    elif how == "noweights":
        weights.unlink()
    elif how == "shard":
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    return folder


@pytest.mark.parametrize("how,needle", [
    ("truncated", "model.safetensors is truncated or corrupted"),
    ("garbage", "model.safetensors is truncated or corrupted (its header claims"),
    ("tiny", "model.safetensors is truncated or corrupted (it is 2 bytes long"),
    ("badconfig", "cannot load model"),
    ("noweights", "cannot load model"),
    ("shard", "lists 1 weight file(s) that are missing (model-00002-of-00002.safetensors)"),
])
def test_broken_model_folders_give_one_line_and_write_nothing(tmp_path, tiny_model_dir, capsys, how, needle):
    folder = _broken_model(tmp_path, tiny_model_dir, how)
    (tmp_path / "p.txt").write_text("Say hi.\n")
    out = tmp_path / "out" / "responses.jsonl"
    before = files_under(tmp_path)
    code, err = run_main(["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(folder),
                          "--out", str(out), "--device", "cpu"], capsys)
    assert code == 2
    assert_one_line(err, "safesteer generate: error:", needle, "copy or download the model again")
    assert files_under(tmp_path) == before


def test_empty_model_folder(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "p.txt").write_text("Say hi.\n")
    code, err = run_main(["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(tmp_path / "empty-model"),
                          "--out", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2
    assert_one_line(err, "is an empty folder; pass a Hugging Face model directory")
    assert not (tmp_path / "o.jsonl").exists()


def test_corrupted_model_through_the_real_command(tmp_path, tiny_model_dir):
    folder = _broken_model(tmp_path, tiny_model_dir, "truncated")
    (tmp_path / "p.txt").write_text("Say hi.\n")
    proc = run_cli(["generate", "--prompts", "p.txt", "--model", str(folder), "--out", "o.jsonl", "--device", "cpu"],
                   tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "model.safetensors is truncated or corrupted", "bytes of tensor data where its header needs")
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------- run artifacts


def write_direction(path: Path, hidden: int, layer: int = 1, **meta) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({"direction": torch.randn(hidden)}, str(path / "direction.safetensors"))
    (path / "direction.json").write_text(json.dumps({"layer": layer, "coeff": 1.0, "position": -1,
                                                     "identity": {"name": "other-model"}, **meta}))
    return path


@pytest.mark.parametrize("how,needle", [
    ("hidden", "made for other-model (hidden size 64) but this model's hidden size is 32"),
    ("layer", "is for layer 7 but this model has layers 0-3"),
    ("negative", "is for layer -2 but this model has layers 0-3"),
    ("truncated", "direction.safetensors is truncated or corrupted"),
    ("meta", "direction.json is unreadable"),
    ("layer-text", "does not hold a layer (integer)"),
    ("matrix", "holds a torch.float32 tensor of shape [2, 32], not a one-dimensional float direction"),
    ("nan", "holds NaN or infinite values"),
])
def test_bad_direction_artifacts_give_one_line_and_write_nothing(tmp_path, tiny_model_dir, capsys, how, needle):
    direction = write_direction(tmp_path / "dir", 64 if how == "hidden" else 32,
                                layer={"layer": 7, "negative": -2}.get(how, 1))
    if how == "truncated":
        data = (direction / "direction.safetensors").read_bytes()
        (direction / "direction.safetensors").write_bytes(data[:-10])
    elif how == "meta":
        (direction / "direction.json").write_bytes(b"\xff{")
    elif how == "layer-text":
        (direction / "direction.json").write_text(json.dumps({"layer": "seven"}))
    elif how == "matrix":
        save_file({"direction": torch.randn(2, 32)}, str(direction / "direction.safetensors"))
    elif how == "nan":
        save_file({"direction": torch.full((32,), float("nan"))}, str(direction / "direction.safetensors"))
    (tmp_path / "p.txt").write_text("Say hi.\nName a colour.\n")
    out = tmp_path / "run"
    before = files_under(tmp_path)
    code, err = run_main(["tokens", "--model", str(tiny_model_dir), "--direction", str(direction), "--out", str(out),
                          "--prompts", str(tmp_path / "p.txt"), "--no-filter", "--horizon", "2",
                          "--samples-per-prompt", "1", "--device", "cpu"], capsys)
    assert code == 2
    line = assert_one_line(err, "safesteer tokens: error:", needle)
    assert "safesteer direction" in line  # the fix: make a direction for this model
    assert files_under(tmp_path) == before


def test_damaged_direction_is_recomputed_not_reused(tmp_path, smol_tokenizer, monkeypatch):
    from safesteer.teacher import direction as d

    model = make_tiny_model(smol_tokenizer)
    out = write_direction(tmp_path / "run", 32)
    (out / "direction.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(SafesteerError, match="truncated or corrupted"):
        load_direction(out, model)

    # Even when its metadata matches (reusable), the damaged tensor is not used: the stage computes again.
    def computing(*a, **k):
        raise RuntimeError("computing again")

    monkeypatch.setattr(d, "_reusable", lambda *a: True)
    monkeypatch.setattr(d, "post_instruction_length", computing)
    with pytest.warns(UserWarning, match="not reusing the refusal direction"), pytest.raises(RuntimeError, match="again"):
        d.run_direction_stage(model, smol_tokenizer, {}, out, ["a"], ["b"], ["c"], ["d"], progress=False)


@pytest.mark.parametrize("tokens,needle", [
    ([{"id": 10}, {"id": 10 ** 9}], "token 2 has id 1000000000, outside the model's vocabulary of 49,152"),
    ([{"id": -1}], "token 1 has id -1, outside the model's vocabulary"),
    ([{"id": 1.5}], "token 1 has id 1.5, not an integer"),
    ([{"id": "12"}], "token 1 has id '12', not an integer"),
    ([{"id": True}], "token 1 has id True, not an integer"),
    ([{"text": "Sorry"}], "token 1 has id None, not an integer"),
    ([{"id": 3}, {"id": 3}], "lists a token id twice"),
    ({"id": 3}, 'it has no "tokens" list'),
])
def test_bad_safety_tokens_give_one_line(tmp_path, smol_tokenizer, tokens, needle):
    model = make_tiny_model(smol_tokenizer, n_layers=2)
    (tmp_path / "safety_tokens.json").write_text(json.dumps({"tokens": tokens}))
    with pytest.raises(SafesteerError) as info:
        load_safety_tokens(tmp_path, model)
    message = str(info.value)
    assert needle in message and "\n" not in message and "safesteer tokens --out" in message


def test_safety_tokens_with_ids_beyond_the_vocabulary_are_selected_again(tmp_path, smol_tokenizer):
    from safesteer.teacher.tokens import SafetyTokenConfig, run_token_stage

    model = make_tiny_model(smol_tokenizer, n_layers=2)
    direction = write_direction(tmp_path / "run", 32)
    config = SafetyTokenConfig(horizon=2, samples_per_prompt=1, top_k_per_position=10, n_tokens=4)
    prompts = ["Say hi.", "Name a colour."]
    identity = {"name": "tiny"}
    first = run_token_stage(model, smol_tokenizer, identity, direction, direction, prompts, config, progress=False)
    path = direction / "safety_tokens.json"
    data = json.loads(path.read_text())
    data["tokens"][0]["id"] = 10 ** 9  # hand-edited, or copied from a model with a larger vocabulary
    path.write_text(json.dumps(data))
    again = run_token_stage(model, smol_tokenizer, identity, direction, direction, prompts, config, progress=False)
    assert again.ids == first.ids and load_safety_tokens(direction, model) == first.ids


# ----------------------------------------------------------------------------- a full disk

def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import errno

    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = ["align", "--model", str(tiny_model_dir), "--out", str(out), "--steps", "3", *TINY_ALIGN]
    real_save, checkpoint_writes = torch.save, []

    def disk_fills_up(obj, path, *args, **kwargs):
        if Path(path).parent.name.startswith(".checkpoint."):
            checkpoint_writes.append(path)
            if len(checkpoint_writes) == 3:  # step 2's optimizer state: half of it fits
                Path(path).write_bytes(b"\x00" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_fills_up)
        code, err = run_main(argv, capsys)
    assert code == 2
    assert_one_line(err, f"safesteer align: error: no space left on the disk while writing the checkpoint of step 2 "
                         f"in {out}; free some space and rerun the same command to resume, or point --out at a "
                         f"folder on another disk")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1  # the last good one, whole
    assert load_file(str(out / "checkpoint" / "trainable.safetensors"))
    assert not list(out.glob(".checkpoint.*")) and not (out / "model").exists()  # the half-written one is gone

    assert cli.main(argv) == 0  # space freed: the same command resumes from it
    assert "resuming from step 1 of 3" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "model" / "safesteer.json").is_file()


# ----------------------------------------------------------------------------- Ctrl-C


def test_interrupt_is_one_line_and_exit_130(tmp_path):
    # A real SIGINT in the middle of a command, delivered to the real CLI entry point.
    code = (
        "import os, signal, sys, time\n"
        "import safesteer.io.prompts as prompts\n"
        "def interrupted(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "prompts.load_prompts = interrupted\n"
        "from safesteer.cli import main\n"
        "sys.exit(main(['generate', '--prompts', 'p.txt', '--out', 'o.jsonl']))\n"
    )
    proc = run_cli([], tmp_path, code=code)
    assert proc.returncode == 130
    assert proc.stderr.strip() == "safesteer generate: interrupted; rerun the same command to resume"


def test_interrupt_while_building_the_parser(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, err = run_main(["generate"], capsys)
    assert code == 130
    assert err.strip() == "safesteer: interrupted; rerun the same command to resume"


def test_interrupt_message_starts_its_own_line_after_a_progress_bar(monkeypatch, capsys):
    import argparse

    from tqdm import tqdm

    bars = []

    def generating(args):
        bars.append(tqdm(total=10, desc="generating"))  # a bar left open (still referenced), its line unfinished
        bars[0].update(3)
        raise KeyboardInterrupt

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["generate"].set_defaults(func=generating)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["generate", "--out", "x.jsonl"]) == 130
    err = capsys.readouterr().err
    assert "generating:  30%" in err
    assert err.splitlines()[-1] == "safesteer generate: interrupted; rerun the same command to resume"


# ----------------------------------------------------------------------------- --out: someone else's folder or file


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["align", "align --overwrite", "align --restart training", "direction", "tokens",
                                     "gate", "eval"])
def test_an_out_folder_that_is_not_a_safesteer_run_is_refused_and_never_cleaned(tmp_path, tiny_model_dir, capsys,
                                                                               command):
    """Issue #12 item 5: commands write into --out and remove things there (OUT/model, checkpoints, metrics,
    answers), so a non-empty folder without the marker or a safesteer artifact is refused before anything."""
    mine = tmp_path / "project"
    for name, text in (("model/weights.bin", "mine"), ("checkpoint/notes.txt", "mine"), ("results.md", "mine")):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    given = write_direction(tmp_path / "given", 32)
    before = _snapshot(tmp_path)
    name, *flags = command.split()
    extra = {"tokens": ["--direction", str(given)], "gate": ["--direction", str(given)]}.get(name, [])
    code, err = run_main([name, "--model", str(tiny_model_dir), "--out", str(mine), *extra, *flags], capsys)
    assert code == 2
    assert assert_one_line(err) == (
        f"safesteer {name}: error: --out {mine} is a non-empty folder that is not a safesteer run (it has no "
        f".safesteer-run); safesteer writes and removes files in --out, so choose a new or empty folder")
    assert _snapshot(tmp_path) == before


def test_an_out_that_is_a_file_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "run").write_text("a file")
    code, err = run_main(["align", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert assert_one_line(err) == (f"safesteer align: error: --out {tmp_path / 'run'} is a file, not a folder; choose "
                                    f"a folder for --out")
    assert (tmp_path / "run").read_text() == "a file"


def test_generate_refuses_an_answers_file_of_another_model_or_other_settings(tmp_path, tiny_model_dir, smol_tokenizer,
                                                                            capsys):
    """Issue #12 item 2 through the command: another --model (or setting) with the same --out is one line."""
    from conftest import perturbed_copy
    from safesteer.eval.suites import ModelEntry, model_fingerprint
    from safesteer.io.models import load_model

    other = tmp_path / "tiny-b"
    perturbed_copy(load_model(str(tiny_model_dir), device="cpu").model).save_pretrained(other)
    smol_tokenizer.save_pretrained(other)
    (tmp_path / "p.txt").write_text("Say hi.\nName a colour.\n")
    out = tmp_path / "r.jsonl"
    argv = ["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--max-new-tokens", "3",
            "--device", "cpu"]
    assert cli.main([*argv, "--model", str(tiny_model_dir)]) == 0
    assert cli.main([*argv, "--model", str(tiny_model_dir)]) == 0  # the same command resumes: nothing new
    assert "(0 new" in capsys.readouterr().out
    before = out.read_bytes()
    weights = {str(m): model_fingerprint(ModelEntry(str(m), load_model(str(m), device="cpu").model, None))
               for m in (tiny_model_dir, other)}
    fix = f"rerun with the earlier model and settings to resume it, or choose a new --out (or delete {out} to start over)"

    code, err = run_main([*argv, "--model", str(other)], capsys)
    assert code == 2
    assert assert_one_line(err) == (
        f"safesteer generate: error: {out} holds answers made with another model or other settings (model "
        f"{tiny_model_dir} (weights {weights[str(tiny_model_dir)]}) -> {other} (weights {weights[str(other)]})); {fix}")
    code, err = run_main([*argv, "--model", str(tiny_model_dir), "--max-new-tokens", "4"], capsys)
    assert code == 2
    assert assert_one_line(err) == (f"safesteer generate: error: {out} holds answers made with another model or other "
                                    f"settings (max_new_tokens 3 -> 4); {fix}")
    assert out.read_bytes() == before
