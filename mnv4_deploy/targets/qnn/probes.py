"""The HTP emulator asked directly, one op at a time on synthetic inputs (never the model's images): what it
computes where no formula of ours reproduces it (8-bit Adds, conv biases), for the QNN simulation
(`htp_semantics.HtpProbes`), and single QDQ convs for the HTP benchmark (bench/bench_htp_requant.py)."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .context import session

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def htp_add_table(soc: str, s_a: float, z_a: int, s_b: float, z_b: int, s_out: float, z_out: int) -> np.ndarray:
    """HTP's output for every pair of inputs of one uint8 QDQ Add (its requantization has no formula we could
    fit): a 256x256 table, indexed [b, a], from the emulator itself. The QNN simulation reads adds from it."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in (
        ("sa", s_a, np.float32), ("za", z_a, np.uint8), ("sb", s_b, np.float32), ("zb", z_b, np.uint8),
        ("so", s_out, np.float32), ("zo", z_out, np.uint8))]
    nodes = [helper.make_node("QuantizeLinear", ["a", "sa", "za"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "sb", "zb"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"]),
             helper.make_node("Add", ["ad", "bd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["yq"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 256, 256]) for n in ("a", "b")]
    out = [helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, 1, 256, 256])]
    model = helper.make_model(helper.make_graph(nodes, "htp_add", io, out, consts),
                              opset_imports=[helper.make_opsetid("", 21)])
    grid = np.arange(256, dtype=np.float32)
    a = np.broadcast_to(((grid - z_a) * np.float32(s_a))[None, :], (256, 256))
    b = np.broadcast_to(((grid - z_b) * np.float32(s_b))[:, None], (256, 256))
    compiled = session(model.SerializeToString(), soc, False)
    feed = {"a": np.ascontiguousarray(a[None, None]), "b": np.ascontiguousarray(b[None, None])}
    return compiled.run(None, feed)[0][0, 0]


def htp_conv_biases(soc: str, s_in: float, z_in: int, w_scales: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The int32 bias HTP compiles for each output channel of a QDQ conv (uint8 input with scale s_in and zero
    point z_in, int8 weights with per-channel `w_scales`, float `bias`), read from the emulator.

    HTP's bias is not round(bias / (s_in * w_scale)): it is off by up to about 1.5 accumulator units, whatever
    the weights and the output scale (measured), and no rounding formula we tried reproduces it. So probe convs
    with the layer's own input scale, weight scales and bias run once: input channels 0 and 1 a ramp over 4,096
    consecutive accumulator values (weights 1 and 16), the other channels constant, weighted to cancel most of
    each bias so outputs stay off the rails. Under the requantization rule of htp_semantics.py the
    outputs pin each channel's bias; an output scale is tried per group of channels until each is pinned, and a
    channel no probe pins keeps round(bias / scale) (logged)."""
    w_scales, bias = np.asarray(w_scales, np.float32), np.asarray(bias, np.float32)
    nominal = np.round(bias.astype(np.float64) / scale_of(s_in, w_scales))
    offsets = np.arange(-4, 5)
    possible = np.ones((len(w_scales), len(offsets)), bool)
    probed = np.zeros(len(w_scales), bool)  # probed at a scale fine enough to pin it (multiplier >= 1/128)
    while True:
        todo = (possible.sum(axis=1) != 1) & ~probed
        if not todo.any():
            break
        largest = w_scales[todo].max()
        fits = _bias_probe(soc, s_in, z_in, w_scales, bias, nominal, offsets, float(8 * s_in * largest))
        on_scale = w_scales <= largest  # a channel with a larger scale saturates here: its outputs tell nothing
        possible[on_scale] &= fits[on_scale]
        probed |= w_scales >= largest / 16
    pinned = possible.sum(axis=1) == 1
    out = nominal.copy()
    out[pinned] = nominal[pinned] + offsets[possible[pinned].argmax(axis=1)]
    if not pinned.all():
        logger.warning(f"[qnn] HTP bias probe: {int((~pinned).sum())} of {len(out)} channels not pinned; "
                       "kept round(bias / scale) there")
    return out


def _bias_probe(soc: str, s_in: float, z_in: int, w_scales: np.ndarray, bias: np.ndarray, nominal: np.ndarray,
                offsets: np.ndarray, s_out: float) -> np.ndarray:
    """One probe conv (see htp_conv_biases) at output scale `s_out`: which bias offsets fit each channel."""
    from .htp_semantics import ambiguous_multipliers, exact_units, multiplier_units, requantize

    k = len(w_scales)
    level = 0 if z_in > 127 else 255  # constant inputs as far from the zero point as the grid allows
    step = level - z_in
    cancelling = max(1, int(np.ceil(np.abs(nominal).max() / (127 * abs(step) * 0.9))))
    weights = np.zeros((k, 2 + cancelling, 1, 1), np.int8)
    weights[:, 0], weights[:, 1] = 1, 16
    remaining = -nominal.copy()
    for j in range(2, 2 + cancelling):
        w = np.clip(np.round(remaining / step), -127, 127)
        weights[:, j, 0, 0] = w
        remaining -= w * step
    cancel = -nominal - remaining  # what the constant channels add to each accumulator
    z_out = 128
    i = np.arange(4096)
    low, high = i % 16, i // 16  # acc = low + 16 * high - 17 * z_in: every value of a 4,096-long range once
    xq = np.empty((1, weights.shape[1], 64, 64), np.int64)
    xq[0, 0], xq[0, 1], xq[0, 2:] = low.reshape(64, 64), high.reshape(64, 64), level
    got = run_qdq_conv(soc, weights, w_scales, bias, s_in, z_in, s_out, z_out, xq).reshape(k, -1)
    multiplier = (scale_of(s_in, w_scales) / np.float64(np.float32(s_out)))[:, None]
    acc = ((low - z_in) + 16 * (high - z_in))[None, :] + cancel[:, None]
    # a multiplier within a hair of a tie may be rounded either way: either fits
    units = multiplier_units(multiplier)
    tie = ambiguous_multipliers(multiplier[:, 0])
    lower = np.floor(exact_units(multiplier))
    allowed = [(u == units)[:, 0] | tie for u in (lower, lower + 1)]
    # Each (offset, multiplier) candidate is tried on a sample of the ramp first: nearly all fail there, and only
    # the channels where one survives are checked on the whole ramp (the same answer as checking every one).
    sample = np.arange(0, acc.shape[1], 16)

    def fitting(rows: np.ndarray, offset: int, u: np.ndarray, columns: Any) -> np.ndarray:
        """The channels among `rows` whose outputs at `columns` the candidate (offset, units u) reproduces."""
        out = requantize(acc[rows][:, columns] + (nominal[rows] + offset)[:, None], multiplier[rows], z_out, 0, 255,
                         u[rows])
        return rows[(out == got[rows][:, columns]).all(axis=1)]

    fits = np.zeros((k, len(offsets)), bool)
    for j, o in enumerate(offsets):
        for u, ok in zip((lower, lower + 1), allowed):
            rows = np.flatnonzero(ok & ~fits[:, j])
            rows = fitting(rows, o, u, sample) if len(rows) else rows
            if len(rows):
                fits[fitting(rows, o, u, slice(None)), j] = True
    return fits


def run_qdq_conv(soc: str, weights: np.ndarray, w_scales: np.ndarray, bias: np.ndarray, s_in: float, z_in: int,
                 s_out: float, z_out: int, xq: np.ndarray, group: int = 1, stride: int = 1, pad: int = 0) -> np.ndarray:
    """One uint8 QDQ conv (int8 per-channel weights, float bias) compiled for HTP on `soc`, run on the integer
    inputs `xq` (NCHW, batch 1): its uint8 outputs. The probes' and the HTP benchmark's building block."""
    from onnx import TensorProto, helper, numpy_helper

    k = weights.shape[0]
    _, c, h, w = xq.shape
    out_h, out_w = (h + 2 * pad - weights.shape[2]) // stride + 1, (w + 2 * pad - weights.shape[3]) // stride + 1
    consts = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in (
        ("s_in", s_in, np.float32), ("z_in", z_in, np.uint8), ("s_out", s_out, np.float32), ("z_out", z_out, np.uint8))]
    consts += [numpy_helper.from_array(weights.astype(np.int8), "w"),
               numpy_helper.from_array(np.asarray(w_scales, np.float32), "sw"),
               numpy_helper.from_array(np.zeros(k, np.int8), "zw"), numpy_helper.from_array(np.asarray(bias, np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], group=group, strides=[stride] * 2, pads=[pad] * 4),
             helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["yq"])]
    graph = helper.make_graph(nodes, "htp_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
                              [helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, k, out_h, out_w])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = ((xq - z_in) * np.float32(s_in)).astype(np.float32)
    return session(model.SerializeToString(), soc, False).run(None, {"x": x})[0][0].astype(np.int64)


def scale_of(s_in: float, w_scales: np.ndarray) -> np.ndarray:
    """A conv's accumulator scale per output channel, as QNN computes it (float32 operands)."""
    return np.float64(np.float32(s_in)) * np.asarray(w_scales, np.float32).astype(np.float64)


@dataclass(frozen=True)
class EmulatorProbes:
    """htp_semantics.HtpProbes answered by the HTP emulator for one SoC (ops probed alone, on
    synthetic inputs: never on the model's images)."""

    soc: str

    def add_table(self, s_a: float, z_a: int, s_b: float, z_b: int, s_out: float, z_out: int) -> np.ndarray:
        return htp_add_table(self.soc, s_a, z_a, s_b, z_b, s_out, z_out)

    def conv_biases(self, s_in: float, z_in: int, w_scales: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return htp_conv_biases(self.soc, s_in, z_in, w_scales, bias)
