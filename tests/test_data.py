from pathlib import Path

import numpy as np
import pytest

from mnv4_deploy import UserError
from mnv4_deploy.data import default_calibration, load_images, scan_folder
from mnv4_deploy.preprocessing import Preprocessing

PRE = Preprocessing(input_size=(64, 64), crop_pct=1.0)


def test_image_folder_gives_labels(image_folder: Path):
    found = scan_folder(image_folder)
    assert found.classes == ["a", "b"] and len(found) == 18 and sorted(set(found.labels)) == [0, 1]
    loaded = load_images(found, PRE)
    assert loaded.x.shape == (18, 3, 64, 64) and loaded.x.dtype == np.float32
    assert loaded.labels.tolist() == found.labels


def test_flat_folder_has_no_labels(image_folder: Path):
    found = scan_folder(image_folder / "a")
    assert found.labels is None and len(found) == 9


def test_corrupt_and_non_image_files_are_skipped_and_counted(image_folder: Path):
    (image_folder / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (image_folder / "a" / "notes.txt").write_text("hello")
    found = scan_folder(image_folder)
    assert found.skipped_files == 1
    loaded = load_images(found, PRE)
    assert loaded.unreadable == 1 and len(loaded) == 18


def test_empty_folder_is_an_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        scan_folder(tmp_path / "empty")


def test_missing_folder_is_an_error(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        scan_folder(tmp_path / "nope")


def test_all_unreadable_is_an_error(tmp_path: Path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="could be read"):
        load_images(scan_folder(tmp_path / "bad"), PRE)


def test_split_is_disjoint_and_deterministic(image_folder: Path):
    found = scan_folder(image_folder)
    cal, ver = found.split(10, 5, seed=3)
    assert not set(cal.paths) & set(ver.paths) and len(cal) == 10 and len(ver) == 5
    assert found.split(10, 5, seed=3)[0].paths == cal.paths


def test_default_calibration_uses_real_shipped_photos():
    images, source = default_calibration(PRE, n=16)
    assert images.x.shape == (16, 3, 64, 64) and "scikit-image" in source
    assert images.x.std() > 0.3  # real photographs, not constant or noise-free


def test_preprocessing_resizes_and_crops():
    from PIL import Image

    pre = Preprocessing(input_size=(32, 32), crop_pct=0.5, mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x = pre(img)
    assert x.shape == (3, 32, 32) and np.allclose(x[0], 1.0) and np.allclose(x[1], -1.0)
