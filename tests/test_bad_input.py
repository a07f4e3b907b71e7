"""User mistakes around files: each ends in one line naming the problem and the fix, never a traceback."""
import os
import sys
from pathlib import Path

import pytest

from mnv4_deploy import UserError
from mnv4_deploy.infra.fileio import atomic_path, ensure_writable_dir, write_json


def test_out_under_a_regular_file_is_one_line(tmp_path: Path):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "out"
    with pytest.raises(UserError) as err:
        ensure_writable_dir(out)
    msg = str(err.value)
    assert msg == f"cannot write to --out '{out}': Not a directory; choose a writable folder"


def test_out_that_is_a_file_is_one_line(tmp_path: Path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="cannot write to --out .*choose a writable folder"):
        ensure_writable_dir(tmp_path / "file.txt")


def test_out_is_created_and_left_clean(tmp_path: Path):
    out = tmp_path / "a" / "b"
    ensure_writable_dir(out)
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is removed


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out_is_one_line(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="Permission denied; choose a writable folder"):
            ensure_writable_dir(ro / "out")
        with pytest.raises(UserError, match="Permission denied; choose a writable folder"):
            ensure_writable_dir(ro)
    finally:
        ro.chmod(0o700)


def test_atomic_write_under_a_regular_file_is_one_line(tmp_path: Path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError) as err:
        write_json(tmp_path / "file.txt" / "sub" / "manifest.json", {"a": 1})
    assert "cannot write to" in str(err.value) and "choose a writable folder" in str(err.value)
    assert "\n" not in str(err.value)


def test_atomic_path_keeps_writer_errors():
    """Only the folder set-up is relabelled; a failing writer is not a --out problem."""
    import tempfile

    with tempfile.TemporaryDirectory() as d, pytest.raises(RuntimeError, match="writer produced nothing"), \
            atomic_path(Path(d) / "x.onnx"):
        pass
