"""targets/onnx/passes/unsigned_activations.py: activation QuantizeLinear/DequantizeLinear zero points move from
int8 (int16) to uint8 (uint16), zero point + 128 (+ 32768), same scale: the same real values, in the type
onnxruntime's x86 integer kernels (and QNN's HTP) take. Weights keep their signed type."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install 'mnv4-deploy[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="pip install 'mnv4-deploy[onnx]'")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mnv4_deploy.targets.onnx.passes.unsigned_activations import activations_to_unsigned  # noqa: E402


def _conv_model(path: Path, dtype: type, zero: int, scale: float) -> Path:
    """input -> Q/DQ (activation, `dtype`) -> Conv (int8 per-channel weights) -> Q/DQ -> output."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zero, dtype), "z"),
             numpy_helper.from_array(rng.integers(-127, 128, size=(4, 4, 1, 1)).astype(np.int8), "w"),
             numpy_helper.from_array(np.full(4, 0.02, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(4, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["aq"], name="a_q"),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["a"], name="a_dq"),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="w_dq", axis=0),
             helper.make_node("Conv", ["a", "wd"], ["y"], name="conv"),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"], name="y_q"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["logits"], name="y_dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _zero_points(path: Path) -> dict[str, np.dtype]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[2]] for n in model.graph.node if n.op_type.endswith("Linear")}


@pytest.mark.parametrize("signed,zero,unsigned,shift",
                         [(np.int8, -3, np.uint8, 128), (np.int16, -300, np.uint16, 32768)])
def test_activation_zero_points_become_unsigned_with_the_same_values(tmp_path: Path, signed: type, zero: int,
                                                                     unsigned: type, shift: int) -> None:
    path = _conv_model(tmp_path / "m.onnx", signed, zero, 0.05 if signed is np.int8 else 2e-4)
    x = np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32)
    before = _run(path, x)
    assert activations_to_unsigned(path, signed) == 1  # one shared zero-point initializer
    zeros = _zero_points(path)
    assert all(zeros[n].dtype == unsigned and int(zeros[n]) == zero + shift for n in ("a_q", "a_dq", "y_q", "y_dq"))
    assert zeros["w_dq"].dtype == np.int8  # weights stay signed
    np.testing.assert_array_equal(_run(path, x), before)


def test_other_activation_types_are_left_alone(tmp_path: Path) -> None:
    path = _conv_model(tmp_path / "m.onnx", np.int8, 0, 0.05)
    assert activations_to_unsigned(path, np.int16) == 0
    assert _zero_points(path)["a_q"].dtype == np.int8
