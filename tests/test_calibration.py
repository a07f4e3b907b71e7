"""Pinned calibration sets (calibration/*.yaml): make, check, digest, --calib resolution, the manifest record,
and that a set gives the same quantization every run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mnv4_deploy import UserError
from mnv4_deploy.load.calibration_sets import (CalibrationSet, check_set, digest_of, dump_set, load_calibration,
                                               load_set, make_set, parse_set, shipped_sets)
from mnv4_deploy.cli import main
from mnv4_deploy.config.recipes import parse_recipe
from mnv4_deploy.infra.fileio import sha256_of
from mnv4_deploy.load.preprocessing import Preprocessing

from .conftest import reference_model

PRE = Preprocessing(input_size=(64, 64), crop_pct=1.0)
# A fast recipe: few images, no PTQ algorithms beyond calibration.
FAST = "quantization:\n  calibration: {images: %d, seed: 0}\nverification: {images: 16}\n"


def test_shipped_sets_parse_and_reference_is_balanced():
    assert {"reference-tin202", "imagenet1k-train-1k", "skimage-photos"} <= set(shipped_sets())
    ref = load_set("reference-tin202")
    per_class: dict[str, int] = {}
    for im in ref.images:
        per_class[im.label] = per_class.get(im.label, 0) + 1
    assert len(ref.images) == 512 and ref.hashed and len(per_class) == 202
    assert set(per_class.values()) == {2, 3}  # 512 over 202 classes: balanced to within one image
    imagenet = load_set("imagenet1k-train-1k")
    assert len(imagenet.images) == 1000 and not imagenet.hashed
    assert len({im.label for im in imagenet.images}) == 1000
    assert all(im.path.startswith(f"{im.label}/{im.label}_") for im in imagenet.images)


def test_reference_set_matches_the_shared_train_folder(tiny_imagenet: Path):
    ref = load_set("reference-tin202")
    problems, actual = check_set(ref, tiny_imagenet / "train")
    assert problems == [] and len(actual) == 512
    assert digest_of(actual.items()) == ref.digest


def test_make_is_seeded_balanced_and_hashed(image_folder: Path, tmp_path: Path):
    a = make_set(image_folder, "mine", per_class=3, seed=1)
    assert a == make_set(image_folder, "mine", per_class=3, seed=1)
    assert a.images != make_set(image_folder, "mine", per_class=3, seed=2).images
    assert [im.label for im in a.images].count("a") == 3 and [im.label for im in a.images].count("b") == 3
    assert all(im.sha256 == sha256_of(image_folder / im.path) for im in a.images)
    odd = make_set(image_folder, "odd", images=5, seed=0)
    counts = sorted([im.label for im in odd.images].count(c) for c in "ab")
    assert counts == [2, 3]
    # the file round-trips, and an edited list no longer matches its digest
    text = dump_set(a)
    assert parse_set(text, "x.yaml").digest == a.digest
    edited = text.replace(a.images[0].sha256, "f" * 64)
    with pytest.raises(UserError, match="digest does not match"):
        parse_set(edited, "x.yaml")
    with pytest.raises(UserError, match="fewer than the 10 asked"):
        make_set(image_folder, "big", per_class=10)


def test_calib_make_and_check_cli(image_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "sets" / "mine.yaml"
    assert main(["calib", "make", str(image_folder), "--per-class", "2", "--seed", "0", "--out", str(out)]) == 0
    assert load_set(out).name == "mine" and len(load_set(out).images) == 4
    assert main(["calib", "check", str(out), "--root", str(image_folder)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ok: all 4 images unchanged")
    first = load_set(out).images[0].path
    (image_folder / first).write_bytes((image_folder / first).read_bytes() + b"\0")
    (image_folder / load_set(out).images[1].path).unlink()
    assert main(["calib", "check", str(out), "--root", str(image_folder)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"changed: {first} (sha256 ") and lines[1].startswith("missing: ")


def test_a_changed_image_fails_check_and_convert_with_one_line(tiny_imagenet: Path, tmp_path: Path, capsys):
    """A copy of six reference images; one of them changed afterwards (never /work/shared itself)."""
    ref = load_set("reference-tin202")
    root = tmp_path / "root"
    chosen = ref.images[:6]
    for im in chosen:
        (root / im.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_imagenet / "train" / im.path, root / im.path)
    small = tmp_path / "six.yaml"
    small.write_text(dump_set(CalibrationSet("six", chosen)))
    assert main(["calib", "check", str(small), "--root", str(root)]) == 0
    victim = root / chosen[2].path
    victim.write_bytes(victim.read_bytes()[:-10])
    capsys.readouterr()
    assert main(["calib", "check", str(small), "--root", str(root)]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith(f"changed: {chosen[2].path}")
    rc = main(["convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random", "--input-size", "64",
               "--to", "onnx", "--int8", "--calib", str(small), "--calib-root", str(root), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len([l for l in err if "error:" in l]) == 1
    assert "calibration set 'six': 1 of 6 images missing or changed" in err[-1] and "--calib-allow-changed" in err[-1]
    assert not (tmp_path / "o" / "onnx").exists()
    # Told to go on, it calibrates on what is there, and the digest says so.
    data = load_calibration(small, root, parse_recipe(FAST % 8), PRE, allow_changed=True)
    assert data.calibration_set["images"] == 6 and data.calibration_set["digest"] != load_set(small).digest


def test_set_references_fail_with_one_line(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MNV4_CALIB_ROOT", raising=False)
    recipe = parse_recipe(FAST % 8)
    with pytest.raises(UserError, match=r"neither a folder of images nor a calibration set.*did you mean: reference-tin202"):
        load_calibration("reference-tin20", None, recipe, PRE)
    with pytest.raises(UserError, match="pass --calib-root DIR"):
        load_calibration("reference-tin202", None, recipe, PRE)
    with pytest.raises(UserError, match="is not a folder"):
        load_calibration("reference-tin202", tmp_path / "nope", recipe, PRE)
    with pytest.raises(UserError, match="calibration set file .* not found"):
        load_calibration(tmp_path / "missing.yaml", None, recipe, PRE)


def test_folder_and_default_calibration_are_recorded_as_sets(image_folder: Path):
    recipe = parse_recipe(FAST % 8)
    data = load_calibration(image_folder, None, recipe, PRE)
    used = data.calibration.files.paths
    expected = digest_of((p.relative_to(image_folder).as_posix(), sha256_of(p)) for p in used)
    assert data.calibration_set == {"name": "images", "digest": expected, "images": len(used)}
    default = load_calibration(None, None, recipe, PRE).calibration_set
    assert default["name"] == "skimage-photos" and default["images"] == 8 and default["digest"].startswith("sha256:")
    assert default == load_calibration("skimage-photos", None, recipe, PRE).calibration_set
    assert default != load_calibration(None, None, parse_recipe(FAST % 9), PRE).calibration_set


def test_pixel_cap_shrinks_calibration_not_the_held_back_images(image_folder: Path):
    """At a large input size fewer calibration images are used (`pixels`, at least `min_images`); the
    held-back verification images are the same ones, so verification is no weaker."""
    capped = parse_recipe("quantization:\n  calibration: {images: 12, seed: 0, pixels: 16384, min_images: 2}\n"
                          "verification: {images: 4}\n")
    full = parse_recipe("quantization:\n  calibration: {images: 12, seed: 0}\nverification: {images: 4}\n")
    assert capped.quantization.calibration.images_for(64, 64) == 4
    assert capped.quantization.calibration.images_for(8, 8) == 12  # never more than `images`
    assert capped.quantization.calibration.images_for(1024, 1024) == 2  # never fewer than `min_images`
    assert full.quantization.calibration.images_for(224, 224) == 12  # the default cap keeps 128 at 224
    a, b = load_calibration(image_folder, None, capped, PRE), load_calibration(image_folder, None, full, PRE)
    assert len(a.calibration) == 4 and len(b.calibration) == 12
    assert a.calibration.files.paths == b.calibration.files.paths[:4]
    assert a.held_back.files.paths == b.held_back.files.paths and a.calibration_set["images"] == 4


def test_recipe_names_its_set_and_user_folder_overrides(tiny_imagenet: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MNV4_CALIB_ROOT", str(tiny_imagenet / "train"))
    recipe = parse_recipe("quantization:\n  calibration: {set: reference-tin202, images: 12}\nverification: {images: 8}\n")
    data = load_calibration(None, None, recipe, PRE)
    assert data.calibration_set["name"] == "reference-tin202" and data.calibration_set["images"] == 12
    assert len(data.calibration) == 12 and len(data.held_back) == 8
    ref_paths = {im.path for im in load_set("reference-tin202").images}
    held = {p.relative_to(tiny_imagenet / "train").as_posix() for p in data.held_back.files.paths}
    assert not held & ref_paths  # verification images are never calibration images
    # A set of the same name in the user folder wins over the shipped one.
    monkeypatch.setenv("MNV4_DEPLOY_HOME", str(tmp_path))
    (tmp_path / "calibration").mkdir()
    mine = CalibrationSet("reference-tin202", load_set("reference-tin202").images[:3], "mine")
    (tmp_path / "calibration" / "reference-tin202.yaml").write_text(dump_set(mine))
    assert load_set("reference-tin202").description == "mine"


def test_reference_set_gives_identical_quantization(reference_checkpoint: Path, tiny_imagenet: Path):
    """Two runs calibrated on reference-tin202 (every image) have the same scale and zero point everywhere.
    (min-max observers keep it fast: the default percentile observer costs 25 s a run here.)"""
    from mnv4_deploy.pipeline import ConvertSettings, load_data
    from mnv4_deploy.quantization.pt2e import quantize

    loaded = reference_model(reference_checkpoint)
    recipe = parse_recipe("quantization:\n  activations: {observer: minmax}\n  calibration: {set: reference-tin202}\n"
                          "verification: {images: 16}\n")
    settings = ConvertSettings(model="mobilenetv4_conv_small", out=Path("."), precision="int8",
                               calib=Path("reference-tin202"), calib_root=tiny_imagenet / "train", progress=False)
    params, sets = [], []
    for _ in range(2):
        cal, _src, _ver, _ = load_data(settings, loaded, recipe)
        q = quantize(loaded.model, cal, recipe)
        sets.append(cal.calibration_set)
        params.append({name: [t.tolist() for t in m.calculate_qparams()]
                       for name, m in q.prepared.named_modules() if hasattr(m, "calculate_qparams")})
    assert sets[0] == sets[1] == {"name": "reference-tin202", "digest": load_set("reference-tin202").digest,
                                  "images": 512}
    assert len(params[0]) > 50 and params[0] == params[1]


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_manifest_names_the_set_and_flat_imagenet_val_is_scored(tiny_imagenet: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="pip install 'mnv4-deploy[onnx]'")
    from .test_data import fake_imagenet_val

    val, labels = fake_imagenet_val(tmp_path)
    recipe = tmp_path / "fast.yaml"
    recipe.write_text(FAST % 32)
    out = tmp_path / "out"
    rc = main(["convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random", "--input-size", "64",
               "--crop-pct", "1.0", "--to", "onnx", "--int8", "--recipe", str(recipe), "--calib", "reference-tin202",
               "--calib-root", str(tiny_imagenet / "train"), "--val", str(val), "--val-labels", str(labels),
               "--out", str(out), "--no-progress", "--no-verify-gate", "--latency-runs", "2"])
    assert rc == 0
    m = json.loads((out / "onnx" / "manifest.json").read_text())
    cset = m["quantization"]["calibration_set"]
    assert cset["name"] == "reference-tin202" and cset["images"] == 32 and cset["digest"].startswith("sha256:")
    assert m["verification"]["val"]["vs_float"]["images"] == 4 and m["verification"]["val"]["vs_float"]["top1"] is not None
