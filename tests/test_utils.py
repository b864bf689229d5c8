import os
import stat

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
