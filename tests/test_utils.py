import os
import platform
import stat
import sys
from pathlib import Path

import pytest

from safesteer.utils import atomic_path, int_list, temp_dir_in


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_gives_umask_permissions_even_when_the_writer_recreates_the_file(tmp_path, umask_022):
    target = tmp_path / "a.bin"
    with atomic_path(target) as tmp:
        tmp.unlink()  # as safetensors does: a new file with the writer's own (private) mode
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"x")
        os.close(fd)
    assert target.read_bytes() == b"x" and _mode(target) == 0o644


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "b.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_temp_dir_in_is_readable_by_others_under_the_usual_umask(tmp_path, umask_022):
    d = temp_dir_in(tmp_path, ".model.")
    assert d.parent == tmp_path and d.name.startswith(".model.") and _mode(d) == 0o755


def test_int_list_parsing():
    assert int_list("6-9") == (6, 7, 8, 9)
    assert int_list("8,10,12") == (8, 10, 12)
    assert int_list("-1,-2") == (-1, -2)
    assert int_list("2-3,7") == (2, 3, 7)
    assert int_list(" 3 , ,4") == (3, 4)  # spaces and empty parts


# ----------------------------------------------------------------------------- crash safety (issue #12, item 6)


@pytest.fixture
def disk_events(monkeypatch):
    """Every fsync (by the path it reached) and every rename, in order."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the fsynced files")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, disk_events):
    from safesteer.utils import write_json_atomic

    write_json_atomic(tmp_path / "a.json", {"x": 1})
    (_, tmp), rename, folder = disk_events
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".a.json.")  # the data, under its temporary name
    assert rename == ("replace", tmp, str(tmp_path / "a.json"))
    assert folder == ("fsync", str(tmp_path))  # the new name itself


def test_a_folder_artifact_is_fsynced_whole_before_its_rename(tmp_path, disk_events):
    from safesteer.utils import replace_dir

    tmp = temp_dir_in(tmp_path, ".model.")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "w.bin").write_bytes(b"w")
    (tmp / "c.json").write_text("{}")
    replace_dir(tmp, tmp_path / "model")
    fsynced = [e[1] for e in disk_events[:-2]]
    assert sorted(fsynced) == sorted(str(p) for p in (tmp, tmp / "sub", tmp / "sub" / "w.bin", tmp / "c.json"))
    assert disk_events[-2:] == [("replace", str(tmp), str(tmp_path / "model")), ("fsync", str(tmp_path))]


def test_disk_full_is_recognised_also_inside_a_library_error():
    import errno

    from safesteer.utils import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    # safetensors' Rust writer: "Error while serializing: Os { code: 28, kind: StorageFull, message: ... }"
    library_error = f'Error while serializing: Os {{ code: 28, message: "{os.strerror(errno.ENOSPC)}" }}'
    assert is_disk_full(RuntimeError(library_error))
    assert not is_disk_full(OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert not is_disk_full(RuntimeError("shape mismatch"))


def test_a_failed_write_on_a_disk_with_no_space_left_counts_as_disk_full(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from safesteer.utils import is_disk_full

    # What torch.save raises when the disk fills up under it (measured by writing to /dev/full).
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert not is_disk_full(torch_error, tmp_path)  # plenty of space here: some other failure
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 4096))
    assert is_disk_full(torch_error, tmp_path) and not is_disk_full(torch_error)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_freed_memory_hands_free_heap_pages_back():
    from safesteer.utils import release_freed_memory

    def rss_pages() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1])

    # 64 KiB blocks sit below glibc's mmap threshold, so freeing them leaves free pages inside the heap.
    blocks = [bytearray(64 << 10) for _ in range(4000)]  # ~256 MiB, touched (bytearray zero-fills)
    held = rss_pages()
    del blocks[:-1]  # keep the last block: the heap top stays in use, so only an in-heap trim can shrink it
    before = rss_pages()
    assert release_freed_memory() is True
    after = rss_pages()
    page = os.sysconf("SC_PAGE_SIZE")
    assert (before - after) * page > 128 << 20, (held, before, after)
