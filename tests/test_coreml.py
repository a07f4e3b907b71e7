"""CoreML target: structure of the converted ML Programs (CoreML cannot run on Linux; numbers are simulated)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coremltools", reason="pip install 'mnv4-deploy[coreml]'")

from mnv4_deploy.data import LoadedImages  # noqa: E402
from mnv4_deploy.errors import UserError  # noqa: E402
from mnv4_deploy.pipeline import ConvertSettings, convert  # noqa: E402
from mnv4_deploy.quantize import quantize  # noqa: E402
from mnv4_deploy.recipes import load_recipe  # noqa: E402
from mnv4_deploy.targets import ExportRequest, get_target  # noqa: E402
from mnv4_deploy.targets.coreml import CoremlOptions  # noqa: E402

from .conftest import prepared_model  # noqa: E402

SIZE = 64
_MODELS: dict[str, Any] = {}


def _request(model: str, precision: str, **options: Any) -> ExportRequest:
    """A prepared random-weight model (and its PT2E int8 model), built once per variant."""
    if model not in _MODELS:
        loaded = prepared_model(model, "random", 10, SIZE)
        calib = LoadedImages(np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32), None)
        _MODELS[model] = (loaded, quantize(loaded.model, calib, load_recipe(None), "random"))
    loaded, quantized = _MODELS[model]
    return ExportRequest(loaded, precision, CoremlOptions(**options), quantized if precision == "int8" else None)


def _convert(tmp_path: Path, model: str, precision: str, **options: Any) -> dict[str, Any]:
    target = get_target("coreml")
    request = _request(model, precision, **options)
    path = tmp_path / "model.mlpackage"
    info = target.export(request, path)
    assert path.is_dir() and (path / "Manifest.json").is_file()
    return {"info": info, "structure": target.describe(path, request), "request": request, "path": path}


def _assert_w8a8(structure: dict[str, Any]) -> None:
    ops = structure["operators"]
    assert structure["quantize"] > 10 and structure["dequantize"] >= structure["quantize"], ops
    dtypes = structure["quantized_weight_dtypes"]
    # Every conv weight is int8 (per-channel symmetric) behind a constexpr dequantize; coremltools merges
    # identical constants (random-init BatchNorms rewritten as depthwise convs), so count float weights instead.
    assert structure["float_conv_weights"] == 0, ops
    assert dtypes.get("int8", 0) >= 0.9 * ops["conv"], dtypes
    # Other quantized constants (the hybrids' layer-scale vectors, quantized per-tensor affine like any mul
    # input) may come out as uint8: coremltools rewrites int8 with zero point -128 as uint8 with zero point 0.
    assert set(dtypes) <= {"int8", "uint8"}, dtypes


def _assert_float(structure: dict[str, Any]) -> None:
    assert structure["quantize_dequantize_total"] == 0, structure["operators"]
    assert structure["operators"]["conv"] > 10
    assert structure["float_conv_weights"] == structure["operators"]["conv"]  # the detector _assert_w8a8 relies on


@pytest.mark.parametrize("conversion", ["export", "trace"])
def test_conv_small_fp16_and_w8a8(tmp_path: Path, conversion: str) -> None:
    fp16 = _convert(tmp_path / "fp16", "mobilenetv4_conv_small", "fp16", conversion=conversion)
    _assert_float(fp16["structure"])
    assert fp16["info"]["compute_precision"] == "float16" and fp16["info"]["method"] == "float"
    w8a8 = _convert(tmp_path / "int8", "mobilenetv4_conv_small", "int8", conversion=conversion)
    _assert_w8a8(w8a8["structure"])
    assert w8a8["structure"]["operators"]["conv"] == fp16["structure"]["operators"]["conv"]
    assert w8a8["structure"]["inputs"] == [{"name": "input", "type": "multiArrayType", "shape": [1, 3, SIZE, SIZE],
                                            "dtype": "float32"}]
    assert w8a8["structure"]["outputs"][0]["name"] == "logits"


@pytest.mark.slow  # full hybrid_medium W8A8 CoreML, ~35 s
def test_hybrid_medium_w8a8_export(tmp_path: Path) -> None:
    """MobileMQA in the W8A8 program: matmuls and softmax between quantize/dequantize ops, no SDPA."""
    s = _convert(tmp_path, "mobilenetv4_hybrid_medium", "int8")["structure"]
    _assert_w8a8(s)
    assert s["operators"]["matmul"] == 16 and s["operators"]["softmax"] == 8
    assert not any("attention" in op or "einsum" in op for op in s["operators"])


@pytest.mark.slow
@pytest.mark.parametrize("precision,conversion", [("fp16", "export"), ("fp16", "trace"), ("int8", "trace")])
def test_hybrid_medium_other_paths(tmp_path: Path, precision: str, conversion: str) -> None:
    """jit tracing of the hybrid works now (timm's attention fails it), in fp16 and W8A8."""
    s = _convert(tmp_path, "mobilenetv4_hybrid_medium", precision, conversion=conversion)["structure"]
    (_assert_w8a8 if precision == "int8" else _assert_float)(s)
    assert s["operators"]["matmul"] == 16 and s["operators"]["softmax"] == 8


def test_int8_weights_only(tmp_path: Path) -> None:
    out = _convert(tmp_path, "mobilenetv4_conv_small", "int8", weights_only=True)
    s = out["structure"]
    assert s["quantize"] == 0 and s["dequantize"] == 0  # activations stay float16
    assert s["constexpr_dequantize"] >= s["operators"]["conv"] and set(s["quantized_weight_dtypes"]) == {"int8"}
    assert "linear_quantize_weights" in out["info"]["method"]
    # The simulation rounds the weights the same way; it stays close to the float model.
    runner = get_target("coreml").load(out["path"], out["request"])
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    assert runner.numbers == "simulated" and not runner.timed and runner(x).shape == (2, 10)


def test_image_input_and_options(tmp_path: Path) -> None:
    target = get_target("coreml")
    out = _convert(tmp_path, "mobilenetv4_conv_small", "fp16", image_input=True, minimum_deployment_target="iOS16",
                   compute_units="cpu_and_ne")
    [inp] = out["structure"]["inputs"]
    assert inp["type"] == "imageType" and (inp["width"], inp["height"]) == (SIZE, SIZE) and inp["color"] == "RGB"
    assert out["info"]["minimum_deployment_target"] == "iOS16" and out["info"]["compute_units"] == "cpu_and_ne"
    spec = target.input_spec(out["path"], out["request"])
    assert spec["dtype"] == "uint8" and spec["layout"] == "NHWC" and spec["normalization"]["inside_model"] is True
    # The normalisation baked in front of the model is exactly (x/255 - mean) / std.
    import torch

    from mnv4_deploy.input_adapter import DeployInput

    loaded = out["request"].loaded
    pixels = torch.randint(0, 256, (1, 3, SIZE, SIZE)).float()
    mean, std = torch.tensor(loaded.preprocessing.mean)[:, None, None], torch.tensor(loaded.preprocessing.std)[:, None, None]
    with torch.no_grad():
        wrapped = DeployInput(loaded.model, loaded.preprocessing, nhwc=False, raw_pixels=True)(pixels)
        direct = loaded.model((pixels / 255 - mean) / std)
    # Same values up to float32 rounding of the two algebraically equal forms (random logits can be large).
    assert (wrapped - direct).abs().max().item() <= 1e-4 * max(1.0, direct.abs().max().item())


@pytest.mark.parametrize("options,precision,match", [
    ({"minimum_deployment_target": "iOS99"}, "fp16", "unknown --minimum-deployment-target"),
    ({"minimum_deployment_target": "iOS16"}, "int8", "iOS17"),
    ({"weights_only": True}, "fp16", "--int8"),
])
def test_user_errors(tmp_path: Path, options: dict[str, Any], precision: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        get_target("coreml").export(_request("mobilenetv4_conv_small", precision, **options), tmp_path / "m.mlpackage")


def test_pipeline_w8a8_manifest_is_simulated(tmp_path: Path, image_folder: Path) -> None:
    """End to end through the pipeline: verified by simulation on Linux, and labelled so."""
    [r] = convert(ConvertSettings(model="mobilenetv4_conv_small_035", weights="random", out=tmp_path,
                                  targets="coreml", precision="int8", calib=image_folder, latency_runs=2,
                                  preprocessing={"input_size": [SIZE], "crop_pct": 1.0}, progress=False))
    m = json.loads(r.manifest_path.read_text())
    assert r.path == tmp_path / "coreml" / "model.mlpackage" and r.path.is_dir()
    assert m["verification"]["numbers"] == "simulated"
    # The simulation is not compared with itself: no "agreement with the simulation" number for CoreML on Linux.
    assert "vs_pytorch_simulation" not in m["verification"]["held_back"]
    assert m["verification"]["tensorwise"]["status"].startswith("not available: simulated")
    assert m["structure"]["quantize"] > 10 and m["artifact"]["size_bytes"] > 0
    assert "coremltools" in m["tool_versions"]
