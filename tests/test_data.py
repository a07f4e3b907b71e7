from pathlib import Path

import numpy as np
import pytest

from mnv4_deploy import UserError
from mnv4_deploy.load.images import default_calibration, load_images, scan_folder
from mnv4_deploy.load.preprocessing import Preprocessing

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


def test_one_unreadable_file_says_what_was_found(tmp_path: Path):
    """Not 'found 1': the one file is not an image at all, and the message says so and names it."""
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "broken.jpg").write_bytes(b"not a jpeg at all")
    found = scan_folder(tmp_path / "calib")
    with pytest.raises(UserError) as err:
        found.split(64, 16)
    msg = str(err.value)
    assert "found 1 image file, 1 of them not readable as images" in msg
    assert f"'{tmp_path / 'calib' / 'broken.jpg'}': cannot identify image file" in msg
    assert "replace the unreadable files" in msg and "\n" not in msg


def test_one_readable_image_asks_for_more(image_folder: Path, tmp_path: Path):
    (tmp_path / "one").mkdir()
    (image_folder / "a" / "0_0.jpg").rename(tmp_path / "one" / "x.jpg")
    with pytest.raises(UserError, match="found 1 image file: add images to the folder"):
        scan_folder(tmp_path / "one").split(64, 16)


def test_all_unreadable_names_counts_and_an_example(tmp_path: Path):
    (tmp_path / "bad").mkdir()
    for name in ("x.png", "y.jpg", "z.jpg"):
        (tmp_path / "bad" / name).write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError) as err:
        load_images(scan_folder(tmp_path / "bad"), PRE)
    msg = str(err.value)
    assert "none of the 3 image files read from" in msg and "could be read as images" in msg
    assert f"(e.g. '{tmp_path / 'bad' / 'x.png'}': cannot identify image file)" in msg
    assert "replace or remove the unreadable files" in msg


def test_unreadable_subset_says_how_many_the_folder_has(image_folder: Path):
    (image_folder / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    found = scan_folder(image_folder)
    broken = found.subset([found.paths.index(image_folder / "a" / "broken.jpg")])
    with pytest.raises(UserError, match=r"none of the 1 image file read from .* \(of 19 found there\)"):
        load_images(broken, PRE)
    loaded = load_images(found, PRE)
    assert loaded.unreadable == 1 and loaded.unreadable_example == str(image_folder / "a" / "broken.jpg")


def test_worker_processes_give_the_same_arrays(image_folder: Path, monkeypatch):
    """Workers are started with forkserver/spawn (a fork after JAX/TF import can deadlock), not fork."""
    import torch.utils.data

    contexts = []
    real = torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        contexts.append(kwargs.get("multiprocessing_context"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", spy)
    (image_folder / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    found = scan_folder(image_folder)
    serial = load_images(found, PRE, workers=0)
    parallel = load_images(found, PRE, workers=2)
    assert contexts[0] is None and contexts[1] in ("forkserver", "spawn")
    assert np.array_equal(serial.x, parallel.x) and np.array_equal(serial.uint8, parallel.uint8)
    assert serial.labels.tolist() == parallel.labels.tolist() and parallel.unreadable == 1


# ---------------------------------------------------------------- ImageNet as users keep it
# (file, wnid, index in timm's 1000-class order = position in its sorted imagenet_synsets.txt)
FAKE_VAL = [("ILSVRC2012_val_00000001.JPEG", "n01751748", 65), ("ILSVRC2012_val_00000002.JPEG", "n09193705", 970),
            ("ILSVRC2012_val_00000003.JPEG", "n01440764", 0), ("ILSVRC2012_val_00000004.JPEG", "n15075141", 999)]


def fake_imagenet_val(tmp_path: Path) -> tuple[Path, Path]:
    """A flat ILSVRC2012 val folder of four real photographs (crops of scikit-image's) and Kaggle's
    LOC_val_solution.csv ground truth (wnid first, then boxes), in shuffled order."""
    import skimage
    from PIL import Image

    val = tmp_path / "imagenet" / "val"
    val.mkdir(parents=True)
    photos = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]
    for (name, _, _), photo in zip(FAKE_VAL, photos):
        Image.open(Path(skimage.__file__).parent / "data" / photo).convert("RGB").resize((80, 80)).save(val / name)
    labels = tmp_path / "imagenet" / "LOC_val_solution.csv"
    rows = [f"{Path(n).stem},{w} 10 20 30 40 {w} 1 2 3 4" for n, w, _ in reversed(FAKE_VAL)]
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return val, labels


def test_imagenet_flat_val_is_labelled_in_timm_order(tmp_path: Path):
    from mnv4_deploy.load.images import imagenet_classes

    classes = imagenet_classes()
    assert len(classes) == 1000 and classes == sorted(classes)
    val, labels = fake_imagenet_val(tmp_path)
    found = scan_folder(val, labels_file=labels)
    assert [p.name for p in found.paths] == [n for n, _, _ in FAKE_VAL]
    assert found.labels == [i for _, _, i in FAKE_VAL] and found.classes == classes
    assert [classes[i] for i in found.labels] == [w for _, w, _ in FAKE_VAL]
    # Caffe-style '<file> <index>' and '<file> <wnid>' lists give the same labels.
    for col in (2, 1):
        other = tmp_path / f"val{col}.txt"
        other.write_text("".join(f"{row[0]} {row[col]}\n" for row in FAKE_VAL))
        assert scan_folder(val, labels_file=other).labels == found.labels
    assert load_images(found, PRE).labels.tolist() == found.labels


def test_imagenet_devkit_ground_truth_and_foreign_labels_are_refused(tmp_path: Path):
    val, _ = fake_imagenet_val(tmp_path)
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n171\n822\n")
    with pytest.raises(UserError, match="ILSVRC2012_IDs, not timm's class order"):
        scan_folder(val, labels_file=devkit)
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("ILSVRC2012_val_00000001.JPEG n99999999\n")
    with pytest.raises(UserError, match="neither an ImageNet-1k wnid nor a class index"):
        scan_folder(val, labels_file=foreign)
    unrelated = tmp_path / "unrelated.txt"
    unrelated.write_text("other_file.JPEG n01440764\n")
    with pytest.raises(UserError, match="none of the 4 images .* is named in"):
        scan_folder(val, labels_file=unrelated)
