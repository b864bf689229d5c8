"""Small helpers shared by every stage: atomic writes, JSONL, hashing, seeding, config fields."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping


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
        fsync_path(tmp_path)  # the data reaches the disk before the name points at it
        os.replace(tmp_path, path)
        fsync_path(path.parent)  # and the rename itself survives a power cut
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


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's list of names, to the disk.

    A rename is crash-safe only once the renamed file's data and the folder holding the new name are
    both on disk; without it a power cut can leave a finished-looking name over an empty file.
    """
    if os.name == "nt" and os.path.isdir(path):  # Windows cannot open a folder; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder`: before a temporary folder is renamed onto an artifact."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder `tmp` onto the missing `target`, durably (its contents first, then the rename)."""
    fsync_tree(tmp)
    os.replace(tmp, target)
    fsync_path(Path(target).parent)


# Less free space than this, when a write fails, means the disk filled up (see is_disk_full).
NEARLY_FULL_BYTES = 64 << 20


def is_disk_full(exc: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """True for the error a full disk (or an exhausted quota) gives.

    Libraries re-raise it as their own: safetensors keeps the OS's words, but torch.save only says
    "unexpected pos". So with `folder`, any error while the disk holding it has (almost) no space
    left counts too; ask before the failed write's partial files are removed.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(text in str(exc) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
        return True
    try:
        return folder is not None and shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_full_error(what: str, where: str | os.PathLike) -> Exception:
    """The one-line user error for a full disk while writing `what` under `where`."""
    from .errors import SafesteerError

    return SafesteerError(f"no space left on the disk while writing {what} in {where}; free some space and rerun the "
                          f"same command to resume, or point --out at a folder on another disk")


def release_freed_memory() -> bool:
    """Collect garbage, empty the CUDA cache and hand the heap's free pages back to the OS (glibc `malloc_trim`).

    One `align` (or `compare`) process runs every stage (every model); tensors freed by one otherwise stay in
    the process's heap as fragmented free space, and the next one's peak lands on top of them. Returns whether
    anything could be trimmed (False off glibc, e.g. macOS or musl).
    """
    import ctypes
    import ctypes.util
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


def phase(name: str) -> None:
    """Announce that the run reached `name` (e.g. "checkpoint-swap:3"), for the kill -9 soak test.

    Outside that test nothing is set and this does nothing. With SAFESTEER_PHASE_FILE=PATH each name
    is appended to PATH as it is reached; with SAFESTEER_PAUSE_AT=NAME too, the process also stops
    (sleeps) at NAME, so that tests/test_kill_soak.py can SIGKILL it at exactly that point.
    """
    path = os.environ.get("SAFESTEER_PHASE_FILE")
    if not path:
        return
    pause = os.environ.get("SAFESTEER_PAUSE_AT") == name
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one unbuffered write per line: a reader never sees half a name
        os.write(fd, f"{'paused ' if pause else ''}{name}\n".encode())
    finally:
        os.close(fd)
    while pause:
        time.sleep(60)


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


def check_choice(value: Any, choices: Collection[str], what: str) -> None:
    """Refuse a setting outside `choices` with the user error that names them:
    "unknown WHAT 'VALUE'; use one of: A, B"."""
    from .errors import SafesteerError

    if value not in choices:
        raise SafesteerError(f"unknown {what} '{value}'; use one of: {', '.join(choices)}")


def preset_config(config_cls: type, presets: Mapping[str, Mapping[str, Any]], name: str, overrides: Mapping[str, Any],
                  what: str = "preset") -> Any:
    """`config_cls` with the settings of `presets[name]`, then the `overrides` that are not None (an option
    not given on the command line). An unknown name is a user error naming the presets there are."""
    check_choice(name, presets, what)
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
