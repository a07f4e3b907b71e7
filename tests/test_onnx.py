"""ONNX target end to end, in the real onnxruntime."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="pip install 'mnv4-deploy[onnx]'")

from mnv4_deploy.cli import main  # noqa: E402
from mnv4_deploy.pipeline import ConvertSettings, convert  # noqa: E402

from .conftest import REFERENCE_ARGS  # noqa: E402

SMALL = dict(model="mobilenetv4_conv_small_035", weights="random", preprocessing={"input_size": [64], "crop_pct": 1.0},
             latency_runs=3, progress=False)


def test_fp32_export_matches_pytorch(tmp_path: Path, image_folder: Path):
    [r] = convert(ConvertSettings(out=tmp_path, targets="onnx", calib=image_folder, **SMALL))
    assert r.path == tmp_path / "onnx" / "model.onnx" and r.path.is_file()
    held = r.manifest["verification"]["held_back"]["vs_float"]
    assert held["max_abs_error"] < 1e-3 and held["top1_agreement"] == 1.0
    assert not any(p.name.startswith(".") for p in (tmp_path / "onnx").iterdir())  # no temp leftovers


def test_int8_manifest_is_complete(tmp_path: Path, image_folder: Path):
    [r] = convert(ConvertSettings(out=tmp_path, targets="onnx", precision="int8", calib=image_folder, **SMALL))
    m = json.loads(r.manifest_path.read_text())
    assert m["target"] == "onnx" and m["precision"] == "int8" and m["model"]["weights"] == "random"
    assert m["artifact"]["size_bytes"] == r.path.stat().st_size and len(m["artifact"]["sha256"]) == 64
    assert m["structure"]["quantize_linear"] > 10 and m["structure"]["initializer_dtypes"]["int8"] > 10
    assert m["structure"]["opset"] == 18 and m["export"]["opset"] == 18
    assert m["input"]["shape"] == [1, 3, 64, 64] and m["input"]["normalization"]["inside_model"] is False
    assert m["quantization"]["images"] > 0 and "torch" in m["tool_versions"] and "onnxruntime" in m["tool_versions"]
    assert m["recipe"]["name"] == "ptq-int8"
    assert m["verification"]["held_back"]["vs_pytorch_simulation"]["cosine"] > 0.5
    assert m["verification"]["latency"]["median_ms"] > 0


def test_int8_reference_checkpoint_keeps_accuracy(tmp_path: Path, reference_checkpoint: Path, tiny_imagenet: Path):
    """The issue's bar: int8 within 1.0 point of float top-1 and >= 90% top-1 agreement on val."""
    rc = main(["convert", *REFERENCE_ARGS, "--to", "onnx", "--int8", "--calib", str(tiny_imagenet / "train"),
               "--val", str(tiny_imagenet / "val"), "--out", str(tmp_path), "--latency-runs", "3", "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    val = m["verification"]["val"]["vs_float"]
    assert val["images"] == 5050
    assert val["top1_agreement"] >= 0.90
    assert abs(val["top1"] - val["reference_top1"]) <= 0.010
    assert m["input"]["normalization"]["mean"] == [0.485, 0.456, 0.406]
    # The runtime reproduces the PyTorch simulation of the same quantization.
    assert m["verification"]["held_back"]["vs_pytorch_simulation"]["top1_agreement"] >= 0.90


def test_onnxruntime_baseline_method(tmp_path: Path, image_folder: Path):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "ort-baseline.yaml"
    [r] = convert(ConvertSettings(out=tmp_path, targets="onnx", precision="int8", calib=image_folder,
                                  recipe=str(recipe), **SMALL))
    assert "quantize_static" in r.manifest["export"]["method"]
    assert r.manifest["structure"]["quantize_linear"] > 0


def test_runner_handles_dynamic_batch(tmp_path: Path, image_folder: Path):
    from mnv4_deploy.targets.onnx import OnnxRunner

    [r] = convert(ConvertSettings(out=tmp_path, targets="onnx", calib=image_folder, **SMALL))
    out = OnnxRunner(r.path)(np.zeros((3, 3, 64, 64), np.float32))
    assert out.shape == (3, 1000)
