"""targets/qnn/passes/boundary_converts.py: where an int16 fallback site meets 8-bit tensors, QNN's convention of
one activation type per node unit is restored with exact DQ -> Q converts (u8 -> u16 on inputs; 8-bit outputs
computed on the 16-bit grid/256 and converted down), which keeps the values (checked on onnxruntime's CPU).
Placement on HTP itself is tested in tests/test_qnn.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install 'mnv4-deploy[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="pip install 'mnv4-deploy[onnx]'")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mnv4_deploy.targets.qnn.passes.boundary_converts import convert_boundaries  # noqa: E402


def w8a16_boundary_model(path: Path) -> Path:
    """uint8 input -> Conv (int8 per-channel weights) -> uint16 site -> Sigmoid -> uint8 output: both units mix
    8 and 16 bits."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s8"),
             numpy_helper.from_array(np.array(128, np.uint8), "z8"),
             numpy_helper.from_array(np.array(2e-4, np.float32), "s16"),
             numpy_helper.from_array(np.array(32768, np.uint16), "z16")]
    q = lambda x, s, z, y: [helper.make_node("QuantizeLinear", [x, s, z], [y + "q"], name=y + "_q"),  # noqa: E731
                            helper.make_node("DequantizeLinear", [y + "q", s, z], [y], name=y + "_dq")]
    w = np.random.default_rng(1).integers(-127, 128, size=(4, 4, 1, 1)).astype(np.int8)
    inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "sw"),
              numpy_helper.from_array(np.zeros(4, np.int8), "zw")]
    nodes = (q("input", "s8", "z8", "a") + [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="w_dq", axis=0),
        helper.make_node("Conv", ["a", "wd"], ["b0"], name="conv")]
             + q("b0", "s16", "z16", "b") + [helper.make_node("Sigmoid", ["b"], ["c0"], name="sig2")]
             + q("c0", "s8", "z8", "logits"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def _cpu(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_mixed_units_get_exact_converts(tmp_path: Path) -> None:
    path = w8a16_boundary_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    before = _cpu(path, x)
    assert convert_boundaries(path) == 2  # the conv's 8-bit input converted up; sig2's 8-bit output computed in 16
    after = _cpu(path, x)
    assert np.abs(after - before).max() <= 0.05 + 1e-6 and (after == before).mean() > 0.99
    model = onnx.load(str(path))
    produced = set()
    for node in model.graph.node:  # still topologically ordered
        assert all(i in produced or i in {t.name for t in model.graph.initializer} | {"input", ""} for i in node.input)
        produced.update(node.output)


def test_a_model_of_one_width_is_unchanged(tmp_path: Path) -> None:
    path = w8a16_boundary_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for t in model.graph.initializer:  # every activation 8-bit
        if t.name == "s16":
            t.CopyFrom(numpy_helper.from_array(np.array(0.05, np.float32), "s16"))
        if t.name == "z16":
            t.CopyFrom(numpy_helper.from_array(np.array(128, np.uint8), "z16"))
    onnx.save(model, str(path))
    data = path.read_bytes()
    assert convert_boundaries(path) == 0 and path.read_bytes() == data
