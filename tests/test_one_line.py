"""Issue 24's hand-found cases: each bad input is one `mnv4-deploy: error:` line (exit 2), never a traceback, and
nothing is written; checks the documentation promises (shards of one run, paths inside the root, a report that
agrees with itself) hold. tests/test_fuzz.py looks for the next cases by machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable

import pytest

from mnv4_deploy import UserError
from mnv4_deploy.cli import main

TINY = ["convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random", "--to", "onnx", "--no-progress"]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one `mnv4-deploy:` line on stderr (and no traceback); fails otherwise."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("mnv4-deploy:")]
    assert len(ours) == 1 and "Traceback" not in err, err
    return ours[0]


# ---------------------------------------------------------------- images: bombs, huge pictures, links
def _big(path: Path, w: int, h: int, fmt: str = "PNG") -> Path:
    from PIL import Image

    Image.new("1" if fmt == "PNG" else "L", (w, h)).save(path, fmt)
    return path


def test_decompression_bombs_and_huge_images_are_skipped_and_counted(image_folder: Path):
    from mnv4_deploy.data import load_images, scan_folder
    from mnv4_deploy.preprocessing import Preprocessing

    _big(image_folder / "a" / "bomb.png", 20000, 20000)  # PIL's DecompressionBombError (400 Mpx)
    _big(image_folder / "b" / "scan.png", 11000, 11000)  # 121 Mpx: once decoded whole (1.4 GB peak)
    _big(image_folder / "b" / "photo.jpg", 8000, 7000, "JPEG")  # 56 Mpx JPEG: decoded at a reduced scale
    loaded = load_images(scan_folder(image_folder), Preprocessing(input_size=(32, 32), crop_pct=1.0))
    assert len(loaded) == 19 and loaded.unreadable == 2
    assert Path(loaded.unreadable_example).name in ("bomb.png", "scan.png")


def test_folder_links_out_of_an_image_folder_are_not_followed(image_folder: Path, tmp_path: Path):
    from mnv4_deploy.data import scan_folder

    os.symlink("/proc/1", image_folder / "proc1")  # PermissionError while scanning
    os.symlink("/", image_folder / "everything")  # walked the whole filesystem
    os.symlink("/", image_folder / "a" / "deeper")
    os.symlink(tmp_path / "nowhere", image_folder / "a" / "gone.jpg")
    os.symlink(image_folder / "a" / "0_0.jpg", image_folder / "b" / "same.jpg")  # a file link: read as a file
    found = scan_folder(image_folder)
    assert found.classes == ["a", "b"] and len(found) == 19 and found.links_out == 4
    assert all(Path(os.path.realpath(p)).is_relative_to(image_folder.resolve()) for p in found.paths)


# ---------------------------------------------------------------- manifests
def _valid_manifest(folder: Path) -> dict[str, Any]:
    from tests.test_report import fake_manifest

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"an artifact")
    m = fake_manifest()
    m["artifact"] |= {"file": "model.onnx", "size_bytes": 11, "sha256": hashlib.sha256(b"an artifact").hexdigest()}
    return m


@pytest.mark.parametrize("mutate, says", [
    (lambda m: m.clear(), "'schema_version' is missing"),
    (lambda m: m.update(verification=[1, 2]), "'verification' must be an object, got a list"),
    (lambda m: m.update(model="mobilenetv4_conv_small"), "'model' must be an object"),
    (lambda m: m["artifact"].update(file="../../etc/passwd"), "'artifact.file' must be a file name inside"),
    (lambda m: m["artifact"].update(sha256=None), "'artifact.sha256' must be a string, got null"),
    (lambda m: m["artifact"].update(sha256="ab" * 32), "does not match its manifest.json"),
])
def test_inspect_refuses_a_wrong_manifest_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      mutate: Callable[[dict], None], says: str):
    folder = tmp_path / "onnx"
    m = _valid_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(folder)]) == 0
    capsys.readouterr()
    mutate(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(folder)]) == 2
    assert says in one_line(capsys)
