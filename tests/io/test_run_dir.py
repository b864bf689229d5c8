"""Output folders (issue #12, item 5): only new, empty or safesteer-made folders are written into or cleaned."""

import json

import pytest

from safesteer.errors import SafesteerError
from safesteer.io.run_dir import (MARKER, changed_settings, check_out_dir, claim_out_dir, is_run_dir,
                                  remove_run_files, summarize_changes)


def test_a_new_or_empty_folder_is_claimed_with_the_marker(tmp_path):
    new = claim_out_dir(tmp_path / "a" / "run", "align")
    assert json.loads((new / MARKER).read_text())["created_by"] == "safesteer align"
    (tmp_path / "empty").mkdir()
    claim_out_dir(tmp_path / "empty", "eval")
    assert is_run_dir(tmp_path / "empty")
    claim_out_dir(new, "tokens")  # a run is claimed again without complaint; the first marker stays
    assert json.loads((new / MARKER).read_text())["created_by"] == "safesteer align"


def test_a_folder_of_an_older_version_is_a_run_by_its_artifacts(tmp_path):
    for name in ("direction.json", "safety_tokens.json", "metrics.jsonl", "model/safesteer.json"):
        folder = tmp_path / name.replace("/", "-")
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_text("{}")
        check_out_dir(folder)
        claim_out_dir(folder, "align")
        assert (folder / MARKER).is_file()


def test_a_foreign_folder_or_a_file_is_refused_and_left_alone(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(SafesteerError) as info:
        claim_out_dir(foreign, "align")
    assert str(info.value) == (f"--out {foreign} is a non-empty folder that is not a safesteer run (it has no "
                               f"{MARKER}); safesteer writes and removes files in --out, so choose a new or empty folder")
    with pytest.raises(SafesteerError, match="is not a safesteer run"):
        remove_run_files(foreign, ["*"])
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    with pytest.raises(SafesteerError, match="is a file, not a folder"):
        check_out_dir(foreign / "thesis.tex")


def test_removal_takes_only_what_the_patterns_name(tmp_path):
    run = claim_out_dir(tmp_path / "run", "align")
    for name in ("checkpoint/state.json", ".checkpoint.old/state.json", "model/safesteer.json", "notes.txt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    removed = remove_run_files(run, ["checkpoint", ".checkpoint.*", "model", "metrics.jsonl"])
    assert removed == ["checkpoint", ".checkpoint.old", "model"]
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "notes.txt"]


def test_changes_name_each_setting_with_its_old_and_new_value():
    old = {"lr": 5e-05, "layers": [1, 2], "nested": {"a": 1}, "sha": "ab" * 32, "gone": 1}
    new = {"lr": 2e-4, "layers": (1, 2), "nested": {"a": 2}, "sha": "cd" * 32, "added": True}
    assert changed_settings(old, new, "x.") == [
        "x.lr 5e-05 -> 0.0002", "x.nested.a 1 -> 2", f"x.sha {'ab' * 6} -> {'cd' * 6}", "x.gone 1 -> (not recorded)",
        "x.added (not recorded) -> true"]
    assert changed_settings(old, old) == [] and changed_settings({"a": 1}, {"a": 2}, skip=("a",)) == []
    assert summarize_changes(["a", "b", "c", "d", "e"]) == "a; b; c; and 2 more"
