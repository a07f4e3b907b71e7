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


# ---------------------------------------------------------------- recipes: every number in its range
RECIPE_CASES = {
    "quantization:\n  calibration:\n    batch_size: 0\n": "r.yaml:3: 'quantization.calibration.batch_size' must be between 1 and 4096, got 0",
    "quantization:\n  activations:\n    percentile: -50\n": "r.yaml:3: 'quantization.activations.percentile' must be > 50 and <= 100, got -50",
    "quantization:\n  activations:\n    percentile: .nan\n": "r.yaml:3: 'quantization.activations.percentile' must be a finite number, got nan",
    "quantization:\n  equalization:\n    alpha: .inf\n": "r.yaml:3: 'quantization.equalization.alpha' must be a finite number, got inf",
    "quantization:\n  equalization:\n    alpha: -3\n": "r.yaml:3: 'quantization.equalization.alpha' must be between 0 and 1, got -3",
    "quantization:\n  fallback:\n    target_agreement: 5.0\n": "r.yaml:3: 'quantization.fallback.target_agreement' must be between 0 and 1, got 5.0",
    "quantization:\n  calibration:\n    images: 0\n": "r.yaml:3: 'quantization.calibration.images' must be between 1 and 1000000, got 0",
    "quantization:\n  range_learning:\n    steps: 1000000000\n": "r.yaml:3: 'quantization.range_learning.steps' must be between 0 and 100000, got 1000000000",
    "verification:\n  int8:\n    min_cosine: 1.0e+999\n": "r.yaml:3: 'verification.int8.min_cosine' must be a finite number, got inf",
    "targets:\n  openvino:\n    method: nncf\n    smooth_quant_alpha: -0.5\n": "r.yaml:3: openvino smooth_quant_alpha must be in [0, 1] or -1",
    "quantization:\n  calibration:\n    images: 64\n   batch_size: [1, 2\n": "r.yaml:4: not valid YAML: expected <block end>, but found '<block mapping start>' (while parsing a block mapping at line 2)",
    "quantization:\n  calibration:\n    images: 64\n    images: 128\n": "r.yaml:4: key 'images' is given twice (first at line 3): keep one",
}


@pytest.mark.parametrize("text", RECIPE_CASES, ids=range(len(RECIPE_CASES)))
def test_recipe_numbers_syntax_and_duplicates_name_file_and_line(text: str):
    from mnv4_deploy.recipes import parse_recipe

    with pytest.raises(UserError) as err:
        parse_recipe(text, "r.yaml")
    assert str(err.value).startswith(RECIPE_CASES[text]), str(err.value)


def _numeric_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _numeric_fields(typ, f"{prefix}{f.name}.")
        elif typ in (int, float) and not f.metadata.get("choices"):
            yield prefix + f.name, f


def test_every_numeric_recipe_and_target_field_declares_its_range():
    from mnv4_deploy.options import numeric_range
    from mnv4_deploy.recipes import Recipe
    from mnv4_deploy.targets import get_target, target_names

    classes = [("", Recipe)] + [(f"targets.{n}.", get_target(n).Options) for n in target_names()]
    missing = [prefix + name for prefix, cls in classes for name, f in _numeric_fields(cls, "")
               if numeric_range(f) is None]
    assert missing == []


def test_a_bad_recipe_is_one_line_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "r.yaml"
    bad.write_text("quantization:\n  calibration:\n    batch_size: 0\n")
    assert main([*TINY, "--recipe", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert f"{bad}:3:" in one_line(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- command-line numbers, checked up front
@pytest.mark.parametrize("flags, says", [
    (["--input-size", "100000"], "larger than the largest supported, 1024"),
    (["--input-size", "4000"], "larger than the largest supported, 1024"),
    (["--latency-runs", "0"], "--latency-runs must be at least 1, got 0"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
    (["--val-limit", "0"], "--val-limit must be at least 1, got 0"),
])
def test_out_of_range_flags_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                                 says: str):
    assert main([*TINY, *flags, "--out", str(tmp_path / "out")]) == 2
    assert says in one_line(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- calibration sets
def _set_file(tmp_path: Path, **fields: Any) -> Path:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "images": [{"path": "a/x.jpg"}]} | fields))
    return path


@pytest.mark.parametrize("selection", ["random", 3, ["a", "b"]])
def test_a_set_whose_selection_is_not_a_mapping_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            selection: Any):
    assert main(["calib", "check", str(_set_file(tmp_path, selection=selection)), "--root", str(tmp_path)]) == 2
    assert "'selection' must be a mapping" in one_line(capsys)


def test_a_set_cannot_reach_files_outside_its_root_through_a_link(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/", root / "sys")
    hostname = Path("/etc/hostname")
    path = _set_file(tmp_path, images=[{"path": "sys/etc/hostname", "sha256": "0" * 64}])
    assert main(["calib", "check", str(path), "--root", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    if hostname.is_file():
        assert hashlib.sha256(hostname.read_bytes()).hexdigest()[:12] not in captured.out + captured.err
    err = [line for line in captured.err.splitlines() if line.startswith("mnv4-deploy:")]
    assert len(err) == 1 and "leads out of the root" in err[0], captured.err


def test_set_and_zoo_yaml_mistakes_name_their_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    s = tmp_path / "s.yaml"
    s.write_text("name: s\nimages:\n  - path: a.jpg\nname: t\n")
    assert main(["calib", "check", str(s), "--root", str(tmp_path)]) == 2
    assert f"{s}:4: key 'name' is given twice (first at line 1)" in one_line(capsys)
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - model: a\n    input_size: [32\n")
    assert main(["report", "--models", str(zoo), "--out", str(tmp_path / "out")]) == 2
    assert f"{zoo}:4: not valid YAML: expected ',' or ']'" in one_line(capsys)
    assert not (tmp_path / "out").exists()


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


# ---------------------------------------------------------------- report.json
PLAN = ["mobilenetv4_conv_small/onnx/fp32", "mobilenetv4_conv_small/onnx/fp16", "mobilenetv4_conv_small/onnx/int8"]


def _shards(tmp_path: Path, mutate: Callable[[dict], None] = lambda r: None) -> list[str]:
    from tests.test_report import fake_report

    r = fake_report()
    paths = []
    for i, (cells, models) in enumerate([(r["cells"][:2], r["models"]), (r["cells"][2:], [])], 1):
        shard = r | {"cells": cells, "models": models, "shard": {"index": i, "count": 2, "plan": PLAN}}
        if i == 2:
            shard = json.loads(json.dumps(shard))
            mutate(shard)
        paths.append(tmp_path / f"shard{i}.json")
        paths[-1].write_text(json.dumps(shard))
    return [str(p) for p in paths]


def _other_input_size(r: dict) -> None:
    for c in r["cells"]:
        if c.get("input_shape"):
            c["input_shape"] = [1, 3, 48, 48]


def _edited_top1(r: dict) -> None:
    r["cells"][0]["metrics"]["val.top1"]["value"] += 0.05  # the summary, not the per-image predictions


MERGE_CASES = {
    "shard {}": (lambda r: r.update(shard={}), "'shard.index' is missing"),
    "shard '2/2'": (lambda r: r.update(shard="2/2"), "'shard' must be an object, got a string '2/2'"),
    "model without key": (lambda r: r.update(models=[{"model": {}, "settings": {}}]), "'models[0].key' is missing"),
    "metrics []": (lambda r: r["cells"][0].update(metrics=[]), "'cells[0].metrics' must be an object, got a list"),
    "value string": (lambda r: r["cells"][0]["metrics"]["val.top1"].update(value="x"),
                     "'cells[0].metrics.val.top1.value' must be a number, got a string 'x'"),
    "value null": (lambda r: r["cells"][0]["metrics"]["size"].update(value=None),
                   "'cells[0].metrics.size.value' must be a number, got null"),
    "another run": (_other_input_size, "the shards come from different runs: model 'mobilenetv4_conv_small' has "
                                       "input dimensions [1, 3, 64, 64]"),
    "edited summary": (_edited_top1, "'val.top1' says 0.26 on 2000 images, but its per-image predictions give 0.21"),
}


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_refuses_a_tampered_or_foreign_shard_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               case: str):
    mutate, says = MERGE_CASES[case]
    out = tmp_path / "merged"
    assert main(["report", "--merge", *_shards(tmp_path), "--out", str(out)]) == 0  # untouched shards merge
    capsys.readouterr()
    assert main(["report", "--merge", *_shards(tmp_path, mutate), "--out", str(tmp_path / "out")]) == 2
    assert says in one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_shards_record_their_settings_and_other_settings_are_refused():
    from mnv4_deploy.report.runner import merge_reports
    from tests.test_report import fake_report

    r = fake_report()
    settings = {"mobilenetv4_conv_small": {"model": "mobilenetv4_conv_small", "preprocessing": {"input_size": [32]}}}
    other = {"mobilenetv4_conv_small": {"model": "mobilenetv4_conv_small", "preprocessing": {"input_size": [48]}}}
    a = r | {"cells": r["cells"][:2], "shard": {"index": 1, "count": 2, "plan": PLAN, "settings": settings}}
    b = r | {"cells": r["cells"][2:], "models": [], "shard": {"index": 2, "count": 2, "plan": PLAN, "settings": other}}
    with pytest.raises(UserError, match=r"differ in mobilenetv4_conv_small.preprocessing.input_size: \[32\] vs \[48\]"):
        merge_reports([a, b], ["a.json", "b.json"])


@pytest.mark.parametrize("which", ["baseline", "new"])
def test_compare_refuses_a_report_that_contradicts_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          which: str):
    from tests.test_report import fake_report

    good, edited = fake_report(), fake_report()
    edited["cells"][2]["metrics"]["val.top1"]["value"] += 0.05  # +5 points on the summary only
    paths = {}
    for name, r in (("good", good), ("edited", edited)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(r))
    new, base = (paths["good"], paths["edited"]) if which == "baseline" else (paths["edited"], paths["good"])
    assert main(["report", "--compare", str(new), "--baseline", str(base)]) == 2
    assert "the file contradicts itself" in one_line(capsys)
