"""Atomic writes: the old file survives a failed write, no temporary is left, and the result has an
ordinary file's permissions (not mkstemp's 0600)."""
import os
import stat

import pytest

from leanlm.io.atomic import atomic_dir, atomic_open, atomic_write_text


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_file_keeps_the_old_one_on_error_and_has_plain_permissions(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_text(p, "one")
    assert p.read_text() == "one"
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask()
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert p.read_text() == "one" and [x.name for x in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_whole_and_has_plain_permissions(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as t:
        (t / "a").write_text("1")
    assert (d / "a").read_text() == "1" and stat.S_IMODE(d.stat().st_mode) == 0o777 & ~_umask()
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as t:
            (t / "b").write_text("2")
            raise RuntimeError("crash")
    assert sorted(x.name for x in d.iterdir()) == ["a"] and [x.name for x in tmp_path.iterdir()] == ["model"]
