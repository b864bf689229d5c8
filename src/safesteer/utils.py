"""Small helpers shared by every stage: atomic writes, JSONL, hashing, seeding, config fields."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A crash mid-write therefore never leaves a truncated artifact where a finished one is expected.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files and some writers (safetensors) recreate the file with their own mode;
        # the finished artifact gets the usual permissions.
        os.chmod(tmp_path, _with_umask(0o666))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def temp_dir_in(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh hidden directory in `parent`, to be renamed onto the finished artifact once complete.

    mkdtemp makes it 0700; the artifact should get the usual permissions (umask applied).
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, _with_umask(0o777))
    return tmp


def _with_umask(mode: int) -> int:
    """`mode` as a newly created file would get it: the process umask applied (reading it means setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Replace `path` with these rows, one JSON object a line, atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, skipping a torn last line left by a crash mid-append."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn tail from an interrupted append; the rest is intact
            raise
    return rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows and fsync, so a finished batch survives a crash of the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # If a previous run died mid-line, start on a fresh line so the torn row stays isolated.
    needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        if needs_newline:
            f.write("\n")
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_texts(texts: Iterable[str]) -> str:
    """Order-sensitive hash of a list of prompts, recorded in artifacts to tie them to their data."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def help_field(default: Any, text: str) -> Any:
    """A dataclass field with this default and its command-line help in the metadata (see cli.add_config_args)."""
    return field(default=default, metadata={"help": text})


def preset_config(config_cls: type, presets: Mapping[str, Mapping[str, Any]], name: str, overrides: Mapping[str, Any],
                  what: str = "preset") -> Any:
    """`config_cls` with the settings of `presets[name]`, then the `overrides` that are not None (an option
    not given on the command line). An unknown name is a user error naming the presets there are."""
    from .errors import SafesteerError

    if name not in presets:
        raise SafesteerError(f"unknown {what} '{name}'; use one of: {', '.join(presets)}")
    return config_cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})


def int_list(text: str) -> tuple[int, ...]:
    """'6-14' or '8,10,12' or '-1,-2' -> ints; a range needs a non-negative start, empty parts are skipped."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        head, sep, tail = part.partition("-") if not part.startswith("-") else ("", "", "")
        if sep and head and tail:
            out.extend(range(int(head), int(tail) + 1))
        else:
            out.append(int(part))
    return tuple(out)
