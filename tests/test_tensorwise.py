"""Tensor-by-tensor check (mnv4_deploy/verify/tensorwise.py): a faithful export matches the PyTorch simulation layer by
layer, and a defect injected into one layer of the artifact is flagged at that layer.

Small random-weight model at 32x32, quantized and exported once per module (about 40 s on 2 cores); the
reference-checkpoint run is marked slow.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from mnv4_deploy.config.recipes import load_recipe  # noqa: E402
from mnv4_deploy.load.images import default_calibration  # noqa: E402
from mnv4_deploy.quantization.pt2e import quantize  # noqa: E402
from mnv4_deploy.targets import ExportRequest, get_target, options_for  # noqa: E402
from mnv4_deploy.verify import tensorwise  # noqa: E402

from .conftest import REFERENCE_ARGS, prepared_model  # noqa: E402


# ----------------------------------------------------------------------------- defect injection
def onnx_scale_defect(src: Path, dst: Path, index: int, factor: float = 1.5, consistent: bool = True) -> str:
    """Multiply the scale of the `index`-th activation QuantizeLinear by `factor`.

    consistent: its DequantizeLinear(s) get the same scale (a converter that re-quantized the tensor);
    otherwise only the QuantizeLinear changes (a wrong scale: the values come out scaled). Returns the
    QuantizeLinear output's name.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    q = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits][index]
    scale = numpy_helper.to_array(inits[q.input[1]]) * np.float32(factor)
    new = numpy_helper.from_array(scale.astype(np.float32), q.input[1] + "_defect")
    g.initializer.append(new)
    q.input[1] = new.name
    if consistent:
        for n in g.node:
            if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]:
                n.input[1] = new.name
    onnx.save(model, str(dst))
    return q.output[0]


def onnx_drop_qdq(src: Path, dst: Path, index: int) -> str:
    """Remove the `index`-th activation QuantizeLinear and its DequantizeLinear(s): the tensor stays float."""
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name for t in g.initializer}
    q = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits][index]
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
    for dq in dqs:
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == dq.output[0]:
                    n.input[k] = q.input[0]
        for o in g.output:
            if o.name == dq.output[0]:
                raise ValueError("cannot drop the quantizer of a graph output")
    for n in [q, *dqs]:
        g.node.remove(n)
    onnx.save(model, str(dst))
    return q.output[0]


def tflite_scale_defect(src: Path, dst: Path, op_name: str, index: int, factor: float = 1.5) -> str:
    """Multiply the output scale of the `index`-th `op_name` operator (e.g. CONV_2D) by `factor` (counting those
    whose readers all requantize).

    The kernel then requantizes into the new scale and its consumers read it with that scale: a converter
    that re-quantized one tensor. Returns the tensor's name.
    """
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(src.read_bytes()))
    sg = model.subgraphs[0]
    code = getattr(fb.BuiltinOperator, op_name)
    code_of = lambda op: fbu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
    # Only tensors whose readers all requantize (a PAD or reshape must keep its input's parameters, and
    # XNNPACK refuses one that does not).
    requantizing = {fb.BuiltinOperator.CONV_2D, fb.BuiltinOperator.DEPTHWISE_CONV_2D, fb.BuiltinOperator.ADD,
                    fb.BuiltinOperator.FULLY_CONNECTED, fb.BuiltinOperator.MEAN}
    ops = [op for op in sg.operators if code_of(op) == code
           and all(code_of(r) in requantizing for r in sg.operators if op.outputs[0] in r.inputs)]
    tensor = sg.tensors[ops[index].outputs[0]]
    tensor.quantization.scale = [float(s) * factor for s in tensor.quantization.scale]
    dst.write_bytes(bytes(fbu.convert_object_to_bytearray(model)))
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else str(name)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """conv_small_035 with random weights at 32x32, int8 with the default recipe, exported to ONNX once."""
    loaded = prepared_model(size=32)
    recipe = load_recipe(None)
    cal, _ = default_calibration(loaded.preprocessing, 32, seed=0)
    held, _ = default_calibration(loaded.preprocessing, 8, seed=1)
    q = quantize(loaded.model, cal, recipe)
    out = tmp_path_factory.mktemp("tensorwise")
    return loaded, recipe, q, cal, held.x, out


def _artifact(small, name: str):
    loaded, recipe, q, cal, x, out = small
    target = get_target(name)
    request = ExportRequest(loaded, "int8", options_for(recipe, name), q, cal)
    path = out / target.artifact_name
    if not path.exists():
        target.export(request, path)
    return target, request, path, x


def _by_runtime_tensor(result, name: str):
    return [r for r in result["table"] if r["runtime_tensor"] == name]


def _pytorch_quantizer(small, index: int) -> str:
    """The name of the `index`-th activation quantizer of the PyTorch int8 graph (the artifact's order too)."""
    loaded, recipe, q, cal, x, out = small
    return tensorwise.torch_quantized(q.simulation_module(), x[:1])[index].name


# ----------------------------------------------------------------------------- matching
def test_a_runtime_tensor_with_the_quantizers_name_is_paired_by_name():
    """Two tensors on the same grid and of the same size (the hybrids' softmaxes) cannot be swapped when the
    runtime keeps the quantizers' names (ExecuTorch's taps); without names the closest values still win."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(-128, 128, (2, 16)), rng.integers(-128, 128, (2, 16))
    torch_side = [tensorwise.QTensor("softmax_1", 1 / 256, -128, a, 0), tensorwise.QTensor("softmax_2", 1 / 256, -128, b, 1)]
    near_a = a.copy()
    near_a[0, 0] = a[0, 0] + 3 if a[0, 0] < 120 else a[0, 0] - 3
    named = [tensorwise.QTensor("softmax_2", 1 / 256, -128, b, 0), tensorwise.QTensor("softmax_1", 1 / 256, -128, near_a, 1)]
    pairs, lost, extra = tensorwise.match(torch_side, named)
    assert [(p.torch.name, p.runtime.name, p.how) for p in pairs] == [("softmax_1", "softmax_1", "name"),
                                                                     ("softmax_2", "softmax_2", "name")]
    assert not lost and not extra
    anonymous = [dataclasses.replace(t, name=f"t{i}") for i, t in enumerate(named)]
    pairs, _, _ = tensorwise.match(torch_side, anonymous)
    assert [(p.torch.name, p.runtime.name, p.how) for p in pairs] == [("softmax_1", "t1", "qparams"),
                                                                     ("softmax_2", "t0", "qparams")]



def test_identical_tensors_on_the_same_grid_are_paired_in_graph_order():
    """Two blocks' saturated softmaxes can be identical: without names, equally close candidates go to the
    tensor at the same place in the runtime's execution order, not to whichever is listed first."""
    rng = np.random.default_rng(1)
    same = rng.integers(-128, 128, (2, 16))
    other = rng.integers(-128, 128, (2, 16))
    torch_side = [tensorwise.QTensor(f"q{i}", 1 / 256, -128, v, i) for i, v in enumerate((other, same, same))]
    runtime = [tensorwise.QTensor(f"r{i}", 1 / 256, -128, v, i) for i, v in enumerate((other, same, same))]
    pairs, lost, extra = tensorwise.match(torch_side, list(reversed(runtime)))
    assert [(p.torch.name, p.runtime.name) for p in pairs] == [("q0", "r0"), ("q1", "r1"), ("q2", "r2")]
    assert not lost and not extra

# ----------------------------------------------------------------------------- ONNX
@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_onnx_faithful_export_matches_layer_by_layer(small):
    target, request, path, x = _artifact(small, "onnx")
    result = tensorwise.check(target, path, request, x)
    s = result["summary"]
    assert s["status"] == "compared" and s["matched"] == s["pytorch_quantizers"] > 40, s
    assert s["unmatched_pytorch"] == [] and s["flagged"] == 0, s
    assert s["max_local_lsb"] <= 1.0, s
    assert tensorwise.warning_line("onnx", s) is None


def test_onnx_rescaled_quantizer_is_flagged_at_that_layer(small, tmp_path):
    target, request, path, x = _artifact(small, "onnx")
    for consistent in (True, False):
        bad = tmp_path / f"bad-{consistent}.onnx"
        onnx_scale_defect(path, bad, index=10, consistent=consistent)
        s = (result := tensorwise.check(target, bad, request, x))["summary"]
        expected = _pytorch_quantizer(small, 10)
        assert s["flagged"] >= 1 and s["first_flagged"]["quantizer"] == expected, (consistent, s)
        [row] = [r for r in result["table"] if r["quantizer"] == expected]
        assert row["flagged"] and row["order"] == 10
        if consistent:  # same values on a coarser grid: caught by the scale, matched on values
            assert row["matched_on"].startswith("values") and "re-quantized" in row["reasons"][0]
        else:  # written with one scale, read with another: wrong values, and onnxruntime's own graph disagrees
            assert "inconsistent in the runtime" in row["reasons"][0] and s["flagged"] == 1, s
            assert row["local"]["frac_over_1lsb"] > 0.1
        assert expected in tensorwise.warning_line("onnx", s)


def test_onnx_dropped_quantizer_is_reported(small, tmp_path):
    target, request, path, x = _artifact(small, "onnx")
    bad = tmp_path / "dropped.onnx"
    onnx_drop_qdq(path, bad, index=20)
    s = tensorwise.check(target, bad, request, x)["summary"]
    assert [t["quantizer"] for t in s["unmatched_pytorch"]] == [_pytorch_quantizer(small, 20)], s
    assert s["matched"] == s["pytorch_quantizers"] - 1
    assert "without a runtime counterpart" in tensorwise.warning_line("onnx", s)


# ----------------------------------------------------------------------------- TFLite
@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_tflite_faithful_and_requantized_layer(small, tmp_path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    target, request, path, x = _artifact(small, "tflite")
    s = tensorwise.check(target, path, request, x)["summary"]
    assert s["status"] == "compared" and s["matched"] == s["pytorch_quantizers"], s
    assert s["unmatched_pytorch"] == [] and s["flagged"] == 0 and s["unmatched_runtime_new_qparams"] == [], s

    bad = tmp_path / "bad.tflite"
    name = tflite_scale_defect(path, bad, "CONV_2D", index=5)
    result = tensorwise.check(target, bad, request, x)
    s = result["summary"]
    assert s["first_flagged"]["runtime_tensor"] == name, s
    [row] = _by_runtime_tensor(result, name)
    assert "re-quantized" in row["reasons"][0]


# ----------------------------------------------------------------------------- other targets
@pytest.mark.slow
def test_openvino_faithful_export(small):
    pytest.importorskip("openvino")
    target, request, path, x = _artifact(small, "openvino")
    s = tensorwise.check(target, path, request, x)["summary"]
    assert s["status"] == "compared" and s["matched"] == s["pytorch_quantizers"] and s["flagged"] == 0, s


@pytest.mark.slow
def test_reference_checkpoint_pipeline(tmp_path, reference_checkpoint, tiny_imagenet):
    """The whole convert on the trained checkpoint: every target's manifest carries the comparison."""
    from mnv4_deploy.cli import main

    rc = main(["convert", *REFERENCE_ARGS, "--to", "onnx,tflite,openvino", "--int8", "--calib",
               str(tiny_imagenet / "train"), "--out", str(tmp_path), "--latency-runs", "3", "--no-progress"])
    assert rc == 0
    for name in ("onnx", "tflite", "openvino"):
        s = json.loads((tmp_path / name / "manifest.json").read_text())["verification"]["tensorwise"]
        assert s["status"] == "compared" and s["unmatched_pytorch"] == [] and s["flagged"] == 0, (name, s)
        table = json.loads((tmp_path / name / "tensorwise.json").read_text())
        assert len(table["tensors"]) == s["matched"]
