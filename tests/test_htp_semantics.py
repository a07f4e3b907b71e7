"""Qualcomm HTP's requantization (mnv4_deploy/targets/qnn/htp_semantics.py) against the HTP emulator itself:
the rule on every accumulator value, convs with float biases made bit exact by the probed biases, and the
strided depthwise kernel's own rule."""
from __future__ import annotations

import numpy as np
import torch

from mnv4_deploy.targets.qnn.context import session
from mnv4_deploy.targets.qnn.htp_semantics import requantize, requantize_strided_depthwise
from mnv4_deploy.targets.qnn.probes import htp_conv_biases, run_qdq_conv, scale_of
from tests.conftest import qnn_or_skip


def _run_conv(w: np.ndarray, sw: np.ndarray, bias: np.ndarray, s_in: float, z_in: int, s_out: float,
              z_out: int, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 QDQ 1x1 conv on HTP: its outputs and the exact accumulators (without bias) for inputs `xq`."""
    got = run_qdq_conv("SM8550", w, sw, bias, s_in, z_in, s_out, z_out, xq)[None]
    acc = np.einsum("kc,nchw->nkhw", w[:, :, 0, 0].astype(np.int64), xq.astype(np.int64) - z_in)
    return got, acc


def test_rule_on_measured_values() -> None:
    """Anchors from the emulator (s_in 1/16, s_w 2^-7, s_out 0.07, zero point 120): accumulator -2944 gives 100
    where exact rounding gives 99 (99.464), -2945 gives 99 (99.457)."""
    multiplier = (1 / 16) * 2 ** -7 / np.float64(np.float32(0.07))
    acc = np.array([-2945.0, -2944.0])
    assert np.floor(acc * multiplier + 120 + 0.5).tolist() == [99, 99]
    assert requantize(acc, multiplier, 120, 0, 255).tolist() == [99, 100]


def test_rule_matches_htp_on_every_accumulator() -> None:
    """Two input channels weighted 1 and 127 over a 256x256 image: every accumulator value of the range once."""
    qnn_or_skip()
    w = np.array([[[[1]], [[127]]]], np.int8)
    xq = np.zeros((1, 2, 256, 256), np.int64)
    xq[0, 0], xq[0, 1] = np.arange(256)[None, :], np.arange(256)[:, None]
    for s_out in (0.07, 0.013, 0.0035):  # shifts 4, 1 and -1
        got, acc = _run_conv(w, np.array([2 ** -7], np.float32), np.zeros(1, np.float32), 1 / 16, 128, s_out,
                             128, xq)
        multiplier = (1 / 16) * 2 ** -7 / np.float64(np.float32(s_out))
        exact = np.clip(np.floor(acc * multiplier + 128.5), 0, 255)
        assert (requantize(acc, multiplier, 128, 0, 255) == got).all(), s_out
        assert (exact != got).sum() >= 100, s_out  # the rule is what makes the difference


def test_probed_biases_make_a_conv_bit_exact() -> None:
    """Random weights, per-channel scales and float biases: round(bias / scale) leaves outputs off; the biases
    read from the emulator (htp_conv_biases) reproduce every output."""
    qnn_or_skip()
    rng = np.random.default_rng(0)
    k, c = 64, 64
    w = rng.integers(-127, 128, size=(k, c, 1, 1)).astype(np.int8)
    sw = (rng.uniform(0.5, 1.5, size=k) * 0.002).astype(np.float32)
    bias = rng.normal(0, 0.5, size=k).astype(np.float32)
    s_in, z_in, s_out, z_out = 0.0649, 6, 0.05, 0
    xq = rng.integers(0, 256, size=(1, c, 16, 16))
    got, acc = _run_conv(w, sw, bias, s_in, z_in, s_out, z_out, xq)
    scale = scale_of(s_in, sw)
    multiplier = (scale / np.float64(np.float32(s_out)))[None, :, None, None]
    nominal = np.round(bias.astype(np.float64) / scale)[None, :, None, None]
    probed = htp_conv_biases("SM8550", s_in, z_in, sw, bias)[None, :, None, None]
    assert (requantize(acc + nominal, multiplier, z_out, 0, 255) != got).sum() > 0
    assert (requantize(acc + probed, multiplier, z_out, 0, 255) == got).all()


def test_strided_depthwise_rule_on_measured_values() -> None:
    """Anchors from the emulator (multiplier 0.005238676095580409, zero point 128): the folded zero point and
    the Q15 multiplier move these three accumulators one step above exact rounding; their neighbours agree."""
    multiplier = 0.005238676095580409
    acc = np.array([95.0, -478.0, 1240.0, 94.0, 96.0])
    assert np.floor(acc * multiplier + 128.5).tolist() == [128, 125, 134, 128, 129]
    assert requantize_strided_depthwise(acc, multiplier, 128, 0, 255).tolist() == [129, 126, 135, 128, 129]


def test_strided_depthwise_rule_matches_htp() -> None:
    """A 3x3 stride-2 depthwise conv with random weights, per-channel scales, float biases and an off-centre
    output zero point, on random inputs: the rule gives every output HTP gives; exact rounding does not."""
    qnn_or_skip()
    rng = np.random.default_rng(1)
    c = 32
    w = rng.integers(-40, 41, size=(c, 1, 3, 3)).astype(np.int8)
    sw = (rng.uniform(0.5, 1.5, size=c) * 0.004).astype(np.float32)
    bias = rng.normal(0, 0.3, size=c).astype(np.float32)
    s_in, z_in, s_out, z_out = 0.05, 128, 0.03, 200
    xq = rng.integers(0, 256, size=(1, c, 128, 128))
    got = run_qdq_conv("SM8550", w, sw, bias, s_in, z_in, s_out, z_out, xq, group=c, stride=2, pad=1)
    scale = scale_of(s_in, sw)
    acc = torch.nn.functional.conv2d(torch.from_numpy(xq.astype(np.float64) - z_in), torch.from_numpy(
        w.astype(np.float64)), None, 2, 1, 1, c).numpy()[0] + np.round(bias / scale)[:, None, None]
    multiplier = (scale / np.float64(np.float32(s_out)))[:, None, None]
    assert (requantize_strided_depthwise(acc, multiplier, z_out, 0, 255) == got).all()
    assert (np.clip(np.floor(acc * multiplier + z_out + 0.5), 0, 255) != got).sum() >= 50


def test_input_quantization_rule_matches_htp() -> None:
    """The float model input quantized on HTP (x / s to float16, then half away from zero) over a fine ramp:
    every value as HTP gives it; PyTorch's own quantizer (half to even, exact) differs."""
    qnn_or_skip()
    from onnx import TensorProto, helper, numpy_helper

    from mnv4_deploy.targets.qnn.htp_semantics import _htp_input

    s, z, n = 0.0187, 120, 65536
    consts = [numpy_helper.from_array(np.array(s, np.float32), "s"), numpy_helper.from_array(np.array(z, np.uint8), "z"),
              numpy_helper.from_array(np.array([1, 1, n, 1], np.int64), "shape")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Reshape", ["xd", "shape"], ["y"]), helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, n])],
                              [helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, 1, n, 1])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    x = np.linspace(-z * s - 1, (255 - z) * s + 1, n).astype(np.float32)
    got = session(model, "SM8550", False).run(None, {"x": x[None, None, None]})[0].reshape(-1)
    s32 = float(np.float32(s))
    modelled = np.round(_htp_input(torch.from_numpy(x), s32, z, 0, 255).numpy().astype(np.float64) / s32) + z
    assert (modelled == got).all()
    assert (np.clip(np.round(x.astype(np.float64) / s32) + z, 0, 255) != got).sum() > 100
