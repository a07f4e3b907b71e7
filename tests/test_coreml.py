"""CoreML target: structure of the converted ML Programs, and the programs executed by the reference ML Program
executor (targets/coreml/mlprogram; Core ML itself runs only on macOS, where predict is compared with it)."""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coremltools", reason="pip install 'mnv4-deploy[coreml]'")

from mnv4_deploy.config.recipes import load_recipe  # noqa: E402
from mnv4_deploy.errors import UserError  # noqa: E402
from mnv4_deploy.load.images import LoadedImages  # noqa: E402
from mnv4_deploy.pipeline import ConvertSettings, convert  # noqa: E402
from mnv4_deploy.quantization.pt2e import quantize  # noqa: E402
from mnv4_deploy.targets import ExportRequest, get_target  # noqa: E402
from mnv4_deploy.targets.coreml.target import CoremlOptions  # noqa: E402

from .conftest import prepared_model  # noqa: E402

SIZE = 64
IS_MAC = platform.system() == "Darwin"
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


@pytest.mark.parametrize("conversion", ["export", pytest.param("trace", marks=pytest.mark.slow)])
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
    target = get_target("coreml")
    runner = target.load(out["path"], out["request"])
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    assert runner.numbers == ("measured" if IS_MAC else "executed") and runner(x).shape == (2, 10)
    assert runner.timed == IS_MAC
    assert "no activation quantizers" in target.quantized_tensors(out["path"], out["request"], x)


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

    from mnv4_deploy.targets.input_adapter import DeployInput

    loaded = out["request"].loaded
    pixels = torch.randint(0, 256, (1, 3, SIZE, SIZE)).float()
    mean, std = torch.tensor(loaded.preprocessing.mean)[:, None, None], torch.tensor(loaded.preprocessing.std)[:, None, None]
    with torch.no_grad():
        wrapped = DeployInput(loaded.model, loaded.preprocessing, nhwc=False, raw_pixels=True)(pixels)
        direct = loaded.model((pixels / 255 - mean) / std)
    # Same values up to float32 rounding of the two algebraically equal forms (random logits can be large).
    assert (wrapped - direct).abs().max().item() <= 1e-4 * max(1.0, direct.abs().max().item())
    # The program, fed the pixels Core ML would hand it, computes the same logits (float16 rounding aside).
    x = ((pixels / 255 - mean) / std).numpy()
    executed = target.load(out["path"], out["request"])(x)
    assert np.abs(executed - direct.numpy()).max() <= 2e-2 * max(1.0, direct.abs().max().item())


@pytest.mark.parametrize("options,precision,match", [
    ({"minimum_deployment_target": "iOS99"}, "fp16", "unknown --minimum-deployment-target"),
    ({"minimum_deployment_target": "iOS16"}, "int8", "iOS17"),
    ({"weights_only": True}, "fp16", "--int8"),
])
def test_user_errors(tmp_path: Path, options: dict[str, Any], precision: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        get_target("coreml").export(_request("mobilenetv4_conv_small", precision, **options), tmp_path / "m.mlpackage")


def test_pipeline_w8a8_manifest_is_executed(tmp_path: Path, image_folder: Path) -> None:
    """End to end through the pipeline: the program is executed (Linux) or predicted (macOS), labelled so, compared
    with the PyTorch simulation and checked tensor by tensor."""
    [r] = convert(ConvertSettings(model="mobilenetv4_conv_small_035", weights="random", out=tmp_path,
                                  targets="coreml", precision="int8", calib=image_folder, latency_runs=2,
                                  preprocessing={"input_size": [SIZE], "crop_pct": 1.0}, progress=False))
    m = json.loads(r.manifest_path.read_text())
    assert r.path == tmp_path / "coreml" / "model.mlpackage" and r.path.is_dir()
    v = m["verification"]
    assert v["numbers"] == ("measured" if IS_MAC else "executed")
    assert (v["latency"]["median_ms"] is None) != IS_MAC  # only Core ML itself is timed
    assert "vs_pytorch_simulation" in v["held_back"]
    assert v["tensorwise"]["status"] == "compared" and v["tensorwise"]["runtime"].startswith("reference ML Program")
    assert m["structure"]["execution"].startswith("measured (Core ML predict)" if IS_MAC else "executed (ML Program reference)")
    if IS_MAC:
        assert m["structure"]["predict_vs_executor"]["images"] > 0
    assert m["structure"]["quantize"] > 10 and m["artifact"]["size_bytes"] > 0
    assert "coremltools" in m["tool_versions"]


# ----------------------------------------------------------------------------- the reference ML Program executor
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, reference_checkpoint: Path, tiny_imagenet: Path) -> dict[str, Any]:
    """The reference checkpoint (conv_small, 202 classes, 64x64), int8 calibrated on 32 Tiny ImageNet train images;
    its fp32 and W8A8 programs written once, plus 8 val images."""
    from mnv4_deploy.load.images import load_images, scan_folder

    from .conftest import reference_model

    loaded = reference_model(reference_checkpoint)
    cal = load_images(scan_folder(tiny_imagenet / "train").sample(32, seed=0), loaded.preprocessing)
    val = load_images(scan_folder(tiny_imagenet / "val").sample(8, seed=1), loaded.preprocessing)
    recipe = load_recipe(None)
    quantized = quantize(loaded.model, cal, recipe, "tin202 train (32)")
    out = tmp_path_factory.mktemp("coreml_reference")
    target = get_target("coreml")
    built = {"loaded": loaded, "x": val.x, "target": target}
    for kind, precision in (("fp32", "fp32"), ("int8", "int8")):
        request = ExportRequest(loaded, precision, CoremlOptions(), quantized if precision == "int8" else None, cal)
        path = out / kind / "model.mlpackage"
        target.export(request, path)
        built[kind] = (request, path)
    return built


def test_fp32_program_executes_like_pytorch(reference: dict[str, Any]) -> None:
    import torch

    from mnv4_deploy.targets.coreml import mlprogram

    _, path = reference["fp32"]
    executor = mlprogram.load(path)
    x = reference["x"]
    logits = executor.run({"input": x})["logits"]
    with torch.no_grad():
        expected = reference["loaded"].model(torch.from_numpy(x)).numpy()
    assert logits.shape == expected.shape == (len(x), 202)
    assert np.abs(logits - expected).max() < 1e-4
    # Any named intermediate comes back, batch first, in the program's layout (NCHW).
    first_conv = next(o for o in executor.ops if o.type == "conv").name
    assert executor.run({"input": x[:2]}, outputs=[first_conv])[first_conv].shape == (2, 32, SIZE // 2, SIZE // 2)


def test_w8a8_program_matches_simulation_tensor_by_tensor(reference: dict[str, Any]) -> None:
    from mnv4_deploy.verify import tensorwise

    request, path = reference["int8"]
    result = tensorwise.check(reference["target"], path, request, reference["x"])
    s = result["summary"]
    assert s["status"] == "compared" and s["runtime"].startswith("reference ML Program executor"), s
    assert s["matched"] == s["pytorch_quantizers"] and not s["unmatched_pytorch"], s
    assert s["flagged"] == 0 and s["matched_by_values_requantized"] == 0, s
    # The executor runs what the program says: float16 between quantizers, the program's float16 scales.
    assert s["max_local_lsb"] <= 1.5, s
    runner = reference["target"].load(path, request)
    sim = request.quantized.simulate(reference["x"])
    assert (runner(reference["x"]).argmax(1) == sim.argmax(1)).mean() >= 0.75


def _corrupt_quantize_scale(src: Path, dst: Path, index: int, factor: float = 1.5) -> str:
    """Multiply the scale of the `index`-th activation `quantize` op of a saved program by `factor` (its readers
    keep the old scale: a converter that wrote a wrong scale). Edits the saved proto; returns the op's output."""
    import coremltools as ct
    from coremltools.libmodelpackage import ModelPackage

    shutil.copytree(src, dst)
    spec = ct.utils.load_spec(str(dst))
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    op = [o for o in block.operations if o.type == "quantize"][index]
    value = consts[op.inputs["scale"].arguments[0].name].attributes["val"].immediateValue.tensor
    scale = np.frombuffer(value.bytes.values, np.float16) * np.float16(factor)
    value.bytes.values = scale.astype(np.float16).tobytes()
    Path(ModelPackage(str(dst)).getRootModel().path()).write_bytes(spec.SerializeToString())
    return op.outputs[0].name


def test_corrupted_scale_is_flagged_at_that_layer(reference: dict[str, Any], tmp_path: Path) -> None:
    from mnv4_deploy.verify import tensorwise

    request, path = reference["int8"]
    name = _corrupt_quantize_scale(path, tmp_path / "bad.mlpackage", index=5)
    result = tensorwise.check(reference["target"], tmp_path / "bad.mlpackage", request, reference["x"])
    s = result["summary"]
    assert s["flagged"] >= 1 and s["first_flagged"]["runtime_tensor"] == name, s
    [row] = [r for r in result["table"] if r["runtime_tensor"] == name]
    assert any("re-quantized" in r for r in row["reasons"]) and any("inconsistent" in r for r in row["reasons"]), row
    assert row["order"] == 5  # the PyTorch quantizer in the same place of the graph
    assert name in tensorwise.warning_line("coreml", s) or row["module"] in tensorwise.warning_line("coreml", s)


def test_unknown_op_is_refused_by_name(reference: dict[str, Any]) -> None:
    import coremltools as ct

    from mnv4_deploy.targets.coreml.mlprogram import Executor, UnsupportedOpError
    from mnv4_deploy.targets.coreml.mlprogram.reader import from_spec, weights_dir

    _, path = reference["fp32"]
    spec = ct.utils.load_spec(str(path))
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    relu = next(o for o in block.operations if o.type == "relu")
    relu.type = "hard_swish_v2"
    with pytest.raises(UnsupportedOpError, match=r"'hard_swish_v2' \(output '" + relu.outputs[0].name):
        Executor(from_spec(spec, weights_dir(path), str(path)))


@pytest.mark.slow  # a W8 conversion, ~15 s
def test_ios18_weights_only_program_executes(tmp_path: Path) -> None:
    """iOS18 compresses weights as constexpr_blockwise_shift_scale (iOS16/17: constexpr_affine_dequantize)."""
    out = _convert(tmp_path, "mobilenetv4_conv_small", "int8", weights_only=True, minimum_deployment_target="iOS18")
    assert out["structure"]["operators"].get("constexpr_blockwise_shift_scale", 0) >= out["structure"]["operators"]["conv"]
    runner = get_target("coreml").load(out["path"], out["request"])
    x = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    import torch

    with torch.no_grad():
        expected = out["request"].loaded.model(torch.from_numpy(x)).numpy()
    assert np.abs(runner(x) - expected).max() <= 0.1 * max(1.0, np.abs(expected).max())


@pytest.mark.skipif(not IS_MAC, reason="Core ML predict runs only on macOS")
def test_predict_matches_executor(reference: dict[str, Any]) -> None:
    """macOS: Core ML's own predict and the reference executor agree on the same programs and images."""
    from mnv4_deploy.verify.fidelity import compare

    x = reference["x"]
    for kind, min_cosine, min_agreement in (("fp32", 0.999, 1.0), ("int8", 0.99, 0.75)):
        request, path = reference[kind]
        runner = reference["target"].load(path, request)
        assert runner.numbers == "measured"
        fid = compare(runner(x), runner.executed(x)).to_dict()
        assert fid["cosine"] >= min_cosine and fid["top1_agreement"] >= min_agreement, (kind, fid)
        recorded = reference["target"].describe(path, request)["predict_vs_executor"]
        assert recorded["images"] == len(x) and recorded["top1_agreement"] == fid["top1_agreement"]


@pytest.mark.slow  # hybrid_medium fp16 + W8 conversions, ~60 s
@pytest.mark.parametrize("precision,weights_only", [("fp16", False), ("int8", True)])
def test_hybrid_medium_programs_execute(tmp_path: Path, precision: str, weights_only: bool) -> None:
    """MobileMQA programs (matmul, softmax, batch_norm, reshape) run; random weights: shape and finiteness only."""
    out = _convert(tmp_path, "mobilenetv4_hybrid_medium", precision, weights_only=weights_only)
    runner = get_target("coreml").load(out["path"], out["request"])
    x = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    logits = runner(x)
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    assert {"matmul", "softmax"} <= set(runner.executor.op_types)


def test_coremltools_is_imported_without_executorch() -> None:
    """coremltools imports executorch.exir (seconds) when it is installed; our first import hides it, and
    executorch stays importable afterwards."""
    import subprocess
    import sys

    code = ("import sys; from mnv4_deploy.targets.coreml.mlprogram.toolchain import import_coremltools; "
            "import_coremltools(); print('executorch' in sys.modules); import importlib.util; "
            "print(importlib.util.find_spec('executorch') is not None)")
    code += "; __import__('executorch') if importlib.util.find_spec('executorch') else None"  # importable afterwards
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


def test_conversion_validates_each_program_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside validated_once, coremltools' per-pass Program.validate calls are deferred: each program is validated
    once, for real, when the conversion ends (with the scope check that dead code elimination asks for), an
    invalid program still raises there, and outside it validate runs as usual."""
    import torch

    from mnv4_deploy.targets.coreml.mlprogram.toolchain import import_coremltools, validated_once

    ct = import_coremltools()
    from coremltools.converters.mil.mil.program import Program

    with validated_once():
        pass  # installs the deferring Program.validate
    checks: list[tuple[int, bool]] = []
    real = Program.validate._real

    def counted(program: Any, check_essential_scope: bool = False) -> None:
        checks.append((id(program), check_essential_scope))
        real(program, check_essential_scope=check_essential_scope)

    monkeypatch.setattr(Program.validate, "_real", counted)
    model = torch.export.export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval(),
                                (torch.zeros(1, 3, 8, 8),)).run_decompositions({})
    with validated_once() as programs:
        mlmodel = ct.convert(model, inputs=[ct.TensorType(name="x", shape=(1, 3, 8, 8))], convert_to="mlprogram",
                             skip_model_load=True)
    assert programs and len(checks) == len(programs) == len({i for i, _ in checks})  # once per program
    assert any(scope for _, scope in checks)
    assert any(p is mlmodel._mil_program for p, _ in programs)

    def broken(program: Any, check_essential_scope: bool = False) -> None:
        raise ValueError("invalid program")

    monkeypatch.setattr(Program.validate, "_real", broken)
    with pytest.raises(ValueError, match="invalid program"):
        with validated_once():
            mlmodel._mil_program.validate()
    checks.clear()
    monkeypatch.setattr(Program.validate, "_real", counted)
    mlmodel._mil_program.validate()  # outside: validated at once
    assert len(checks) == 1
