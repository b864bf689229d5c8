"""Output folders: which ones safesteer may write into and clean up, and how a rerun names what changed.

    claim_out_dir(out)          # refuses a non-empty folder that is not a safesteer run, then marks it
    changed_settings(old, new)  # ["learning_rate 5e-05 -> 0.0002", ...]: what a stored result differs in

Commands that write into --out (align, direction, tokens, gate, eval) also replace and remove files
there: OUT/model, OUT/checkpoint, metrics.jsonl, answers. So they only take a folder that is new, empty
or a safesteer run: one holding the marker OUT/.safesteer-run, which the first command to use the
folder writes, or (folders made before the marker existed) one of the artifacts a command leaves.
Any other non-empty folder is refused with one line and left untouched.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Collection, Mapping

from ..errors import SafesteerError

MARKER = ".safesteer-run"
# What older versions left in a run folder before the marker existed: such a folder is a run too.
RUN_ARTIFACTS = ("direction.json", "safety_tokens.json", "metrics.jsonl", "model/safesteer.json",
                 "checkpoint/state.json", "gate.json", "timings.json", "results.json", "eval/results.json")


def is_run_dir(path: str | Path) -> bool:
    """True for a folder safesteer made: it holds the marker or a recognisable artifact."""
    path = Path(path)
    return (path / MARKER).is_file() or any((path / name).is_file() for name in RUN_ARTIFACTS)


def check_out_dir(path: str | Path) -> None:
    """Refuse an --out that safesteer must not write into; reads only (every process may call it)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SafesteerError(f"--out {path} is a file, not a folder; choose a folder for --out")
    if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
        raise SafesteerError(f"--out {path} is a non-empty folder that is not a safesteer run (it has no {MARKER}); "
                             f"safesteer writes and removes files in --out, so choose a new or empty folder")


def claim_out_dir(path: str | Path, command: str) -> Path:
    """Check `path` (`check_out_dir`), create it and write the marker, once per run folder.

    With several processes every process checks before any of them writes, and the main process
    writes: a process still looking would otherwise see the marker's temporary file in a folder
    without a marker, and refuse it.
    """
    from ..parallel import barrier, is_main_process
    from ..utils import write_json_atomic

    path = Path(path)
    check_out_dir(path)
    barrier()
    if is_main_process() and not (path / MARKER).is_file():
        from .. import __version__

        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path / MARKER, {"created_by": f"safesteer {command}", "version": __version__,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    barrier()
    return path


def remove_run_files(path: str | Path, patterns: Collection[str]) -> list[str]:
    """Remove what `patterns` (names or globs relative to the run folder `path`) match; returns the names
    removed. Only in a safesteer run: a command that cleans up never touches another folder."""
    import shutil

    path = Path(path)
    if not is_run_dir(path):
        raise SafesteerError(f"{path} is not a safesteer run (it has no {MARKER}); nothing was removed")
    removed = []
    for pattern in patterns:
        for target in sorted(path.glob(pattern)):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
            removed.append(str(target.relative_to(path)))
    return removed


# ----------------------------------------------------------------------------- what changed

_MISSING = object()
_HEX = re.compile(r"[0-9a-f]{16,}")


def _canonical(value: Any) -> str:
    # JSON as records hold it: a tuple and the list it was saved as compare equal.
    return json.dumps(value, sort_keys=True, default=str)


def shown_value(value: Any) -> str:
    """A recorded value as a change line shows it: hashes shortened, long values cut."""
    if value is _MISSING:
        return "(not recorded)"
    if isinstance(value, str) and _HEX.fullmatch(value):
        return value[:12]
    text = f"{value:g}" if isinstance(value, float) else _canonical(value) if not isinstance(value, str) else value
    return text if len(text) <= 48 else text[:45] + "..."


def changed_settings(old: Mapping, new: Mapping, prefix: str = "", skip: Collection[str] = ()) -> list[str]:
    """'NAME OLD -> NEW' for every setting whose recorded value `old[NAME]` differs from this run's
    `new[NAME]`; nested mappings by dotted name (PREFIX + name), keys in `skip` left out."""
    changes = []
    for key in [*old, *(k for k in new if k not in old)]:
        if key in skip:
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += changed_settings(a, b, f"{prefix}{key}.")
        elif a is _MISSING or b is _MISSING or _canonical(a) != _canonical(b):
            changes.append(f"{prefix}{key} {shown_value(a)} -> {shown_value(b)}")
    return changes


def summarize_changes(changes: list[str], limit: int = 3) -> str:
    """The first `limit` changes on one line, and how many more there are."""
    more = len(changes) - limit
    return "; ".join(changes[:limit]) + (f"; and {more} more" if more > 0 else "")
