"""Neural Engine fit check (targets/coreml/mlprogram/ane.py) on real MIL programs built with coremltools' Builder:
one program per rule that breaks it, and a clean W8A8 program with no findings."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

ct = pytest.importorskip("coremltools", reason="pip install 'mnv4-deploy[coreml]'")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from mnv4_deploy.targets.coreml.mlprogram.ane import (INT8_OPS, RULES, calibration_warning, check_path, check_program,
                                                      manifest_entry)

SHAPE = (1, 4, 8, 8)


def _spec(body: Callable[[Any], Any], dtype: Any = types.fp16, precision: Any = None,
          target: Any = None) -> Any:
    """Convert a Builder program (one input of SHAPE) to an ML Program and return its spec proto."""
    target = target or ct.target.iOS17

    @mb.program(input_specs=[mb.TensorSpec(shape=SHAPE, dtype=dtype)], opset_version=target)
    def prog(x: Any) -> Any:
        return body(x)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target, skip_model_load=True,
                       compute_precision=precision or ct.precision.FLOAT16)
    return model.get_spec()


def _qdq(x: Any, scale: Any = 0.05, axis: Any = None) -> Any:
    """Activation quantize -> dequantize, int8 symmetric (scale a scalar, or a vector with `axis`)."""
    s = np.asarray(scale, dtype=np.float16)
    kw = {"axis": axis} if axis is not None else {}
    q = mb.quantize(input=x, scale=s, output_dtype="int8", **kw)
    return mb.dequantize(input=q, scale=s, **kw)


def _int8_weight(cout: int = 4, cin: int = 4, k: int = 1) -> Any:
    return mb.constexpr_affine_dequantize(quantized_data=np.ones((cout, cin, k, k), np.int8),
                                          scale=np.full(cout, 0.01, np.float16),
                                          zero_point=np.zeros(cout, np.int8), axis=0)


def _w8a8_conv(x: Any) -> Any:
    return mb.relu(x=mb.conv(x=_qdq(x), weight=_int8_weight()))


def _rules(result: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in result["findings"]:
        out.setdefault(f["rule"], []).append(f["op_type"])
    return out


def test_clean_w8a8_program_has_no_findings() -> None:
    """int8 per-tensor activations into conv and add, int8 per-channel weights, fp16 compute, iOS17."""
    def body(x: Any) -> Any:
        a = _w8a8_conv(x)
        b = _w8a8_conv(a)
        return mb.add(x=_qdq(a), y=_qdq(b))

    result = check_program(_spec(body))
    assert result["findings"] == []
    s = result["summary"]
    assert s["neural_engine"] == "expected" and s["int8_activations"] == "throughout"
    assert s["wholly_on_neural_engine_int8"] and s["compute_precision"] == "float16"
    # coremltools merges the two identical quantizations of `a` (common subexpression elimination)
    assert s["activation_dtypes"] == {"int8": 3} and s["int8_compute_ops"] == 3 and s["deployment_target"] == "iOS17"


def test_activation_dtypes_and_zero_points_are_summarised() -> None:
    """int8 with zero point 10 is asymmetric (PT2E's form); uint8 with zero point 128 (Apple's PyTorch-side
    symmetric form) comes out of coremltools as int8 with zero point 0."""
    def body(x: Any) -> Any:
        s = np.float16(0.05)
        u = mb.dequantize(input=mb.quantize(input=x, scale=s, zero_point=np.uint8(128), output_dtype="uint8"),
                          scale=s, zero_point=np.uint8(128))
        a = mb.conv(x=u, weight=_int8_weight())
        i = mb.dequantize(input=mb.quantize(input=a, scale=s, zero_point=np.int8(10), output_dtype="int8"),
                          scale=s, zero_point=np.int8(10))
        return mb.conv(x=i, weight=_int8_weight())

    result = check_program(_spec(body))
    assert result["findings"] == []
    assert result["summary"]["activation_dtypes"] == {"int8": 2}
    assert result["summary"]["asymmetric_activations"] == 1


def test_quantization_grid_beyond_float16() -> None:
    """scale 1000 on int8 reaches 128000, past float16's 65504: dequantized values overflow to inf."""
    def body(x: Any) -> Any:
        return mb.conv(x=_qdq(x, 1000.0), weight=_int8_weight())

    result = check_program(_spec(body))
    assert _rules(result) == {"ane.fp16_range": ["quantize"]}
    assert result["summary"]["max_dequantized_abs"] == 128000.0


def test_float32_program_runs_off_the_neural_engine() -> None:
    def body(x: Any) -> Any:
        return mb.relu(x=mb.conv(x=x, weight=np.ones((4, 4, 1, 1), np.float32)))

    result = check_program(_spec(body, types.fp32, ct.precision.FLOAT32))
    assert set(_rules(result)["ane.fp32_compute"]) == {"conv", "relu"}
    assert result["summary"]["neural_engine"] == "no" and result["summary"]["compute_precision"] == "float32"


def test_per_channel_activation_scale() -> None:
    def body(x: Any) -> Any:
        return mb.conv(x=_qdq(x, [0.1, 0.2, 0.3, 0.4], axis=1), weight=_int8_weight())

    result = check_program(_spec(body))
    assert _rules(result) == {"ane.per_channel_activation": ["quantize"]}
    assert result["summary"]["int8_activations"] == "partial"


def test_quantize_dequantize_around_a_float_op_is_overhead() -> None:
    """sigmoid takes no int8 input in Apple's activation quantization: the pair before it only costs."""
    def body(x: Any) -> Any:
        return mb.conv(x=_qdq(mb.sigmoid(x=_qdq(x))), weight=_int8_weight())

    rules = _rules(check_program(_spec(body)))
    assert rules == {"ane.qdq_overhead": ["dequantize"]}


def test_quantized_input_of_mul_is_uncertain() -> None:
    def body(x: Any) -> Any:
        return mb.mul(x=_qdq(x), y=_qdq(mb.relu(x=x)))

    result = check_program(_spec(body))
    assert _rules(result) == {"ane.qdq_uncertain_consumer": ["dequantize", "dequantize"]}
    assert {f["certainty"] for f in result["findings"]} == {"uncertain"}


def test_float_weight_and_unquantized_input_in_a_w8a8_program() -> None:
    def body(x: Any) -> Any:
        a = mb.conv(x=_qdq(x), weight=np.ones((4, 4, 1, 1), np.float16))  # float weight
        return mb.conv(x=mb.sigmoid(x=a), weight=_int8_weight())  # float input

    rules = _rules(check_program(_spec(body)))
    assert rules == {"ane.float_weight": ["conv"], "ane.unquantized_input": ["conv"]}


def test_weight_only_program() -> None:
    result = check_program(_spec(lambda x: mb.conv(x=x, weight=_int8_weight())))
    assert _rules(result) == {"ane.weight_only": ["conv"]}
    assert result["summary"]["activation_quantization"] is False
    assert result["summary"]["neural_engine"] == "expected" and result["summary"]["int8_activations"] == "none"


def test_ops_reported_off_the_neural_engine() -> None:
    def body(x: Any) -> Any:
        y = mb.conv(x=x, weight=np.ones((4, 4, 3, 3), np.float16), dilations=[2, 2], pad_type="same")
        return mb.gather(x=y, indices=np.array([0, 2], np.int32), axis=1)

    result = check_program(_spec(body))
    assert sorted(_rules(result)["ane.op_unsupported"]) == ["conv", "gather"]
    assert result["summary"]["neural_engine"] == "uncertain"  # third-party evidence only


def test_opset_older_than_the_quantize_op() -> None:
    """A program that claims iOS16 (CoreML6) but holds iOS17 quantize ops: Core ML would refuse it."""
    spec = _spec(_w8a8_conv)
    fn = spec.mlProgram.functions["main"]
    fn.block_specializations["CoreML6"].CopyFrom(fn.block_specializations[fn.opset])
    del fn.block_specializations[fn.opset]
    fn.opset = "CoreML6"
    result = check_program(spec)
    assert sorted(_rules(result)["ane.deployment_target"]) == ["dequantize", "quantize"]
    assert result["summary"]["neural_engine"] == "no"


def test_every_finding_names_its_source(tmp_path: Path) -> None:
    model = ct.convert(mb.program(input_specs=[mb.TensorSpec(shape=SHAPE, dtype=types.fp16)],
                                  opset_version=ct.target.iOS17)(lambda x: mb.sigmoid(x=_qdq(x))),
                       convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    model.save(str(tmp_path / "m.mlpackage"))
    result = check_path(tmp_path / "m.mlpackage")
    assert result["findings"] and all(f["source"] and f["what_happens"] for f in result["findings"])
    entry = json.loads(json.dumps(manifest_entry(ct.utils.load_spec(str(tmp_path / "m.mlpackage")))))
    assert entry["rules"]["ane.qdq_overhead"]["examples"][0]["op_type"] == "dequantize"
    assert all(r.source and r.certainty in ("documented", "tool-source", "uncertain", "third-party")
               for r in RULES.values())


def test_int8_op_list_matches_installed_coremltools() -> None:
    """The rule copies coremltools' activation-quantization op list; fail loudly when coremltools changes it."""
    from coremltools.optimize.coreml._quantization_passes import insert_prefix_quantize_dequantize_pair

    assert set(INT8_OPS) == set(insert_prefix_quantize_dequantize_pair.SUPPORTED_OP_TYPES)


def test_calibration_warning() -> None:
    assert "scikit-image" in calibration_warning("skimage-photos")
    assert "no calibration set" in calibration_warning(None)
    assert calibration_warning("reference-tin202") is None


@pytest.mark.slow  # a W8A8 CoreML conversion of a random conv_small_035 through the project's target, ~25 s
def test_project_w8a8_program(tmp_path: Path) -> None:
    from mnv4_deploy.config.recipes import load_recipe
    from mnv4_deploy.load.images import LoadedImages
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.targets import ExportRequest, get_target
    from mnv4_deploy.targets.coreml.target import CoremlOptions

    from .conftest import prepared_model

    loaded = prepared_model("mobilenetv4_conv_small_035", "random", 10, 64)
    calib = LoadedImages(np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32), None)
    request = ExportRequest(loaded, "int8", CoremlOptions(), quantize(loaded.model, calib, load_recipe(None), "random"))
    get_target("coreml").export(request, tmp_path / "model.mlpackage")
    summary = check_path(tmp_path / "model.mlpackage")["summary"]
    assert summary["neural_engine"] == "expected" and summary["int8_activations"] == "throughout", summary
    assert "ane.float_weight" not in summary["counts"] and summary["int8_compute_ops"] > 20
