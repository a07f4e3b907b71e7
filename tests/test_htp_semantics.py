"""Qualcomm HTP's requantization (mnv4_deploy/htp_semantics.py) against the HTP emulator itself: the rule on
every accumulator value, and convs with float biases made bit exact by the probed biases."""
from __future__ import annotations

from typing import Any

import numpy as np

from mnv4_deploy.htp_semantics import requantize
from tests.conftest import qnn_or_skip


def _run_conv(qnn: Any, w: np.ndarray, sw: np.ndarray, bias: np.ndarray, s_in: float, z_in: int, s_out: float,
              z_out: int, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 QDQ 1x1 conv on HTP: its outputs and the exact accumulators (without bias) for inputs `xq`."""
    got = qnn.run_qdq_conv("SM8550", w, sw, bias, s_in, z_in, s_out, z_out, xq)[None]
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
    qnn = qnn_or_skip()
    w = np.array([[[[1]], [[127]]]], np.int8)
    xq = np.zeros((1, 2, 256, 256), np.int64)
    xq[0, 0], xq[0, 1] = np.arange(256)[None, :], np.arange(256)[:, None]
    for s_out in (0.07, 0.013, 0.0035):  # shifts 4, 1 and -1
        got, acc = _run_conv(qnn, w, np.array([2 ** -7], np.float32), np.zeros(1, np.float32), 1 / 16, 128, s_out,
                             128, xq)
        multiplier = (1 / 16) * 2 ** -7 / np.float64(np.float32(s_out))
        exact = np.clip(np.floor(acc * multiplier + 128.5), 0, 255)
        assert (requantize(acc, multiplier, 128, 0, 255) == got).all(), s_out
        assert (exact != got).sum() >= 100, s_out  # the rule is what makes the difference


def test_probed_biases_make_a_conv_bit_exact() -> None:
    """Random weights, per-channel scales and float biases: round(bias / scale) leaves outputs off; the biases
    read from the emulator (htp_conv_biases) reproduce every output."""
    qnn = qnn_or_skip()
    rng = np.random.default_rng(0)
    k, c = 64, 64
    w = rng.integers(-127, 128, size=(k, c, 1, 1)).astype(np.int8)
    sw = (rng.uniform(0.5, 1.5, size=k) * 0.002).astype(np.float32)
    bias = rng.normal(0, 0.5, size=k).astype(np.float32)
    s_in, z_in, s_out, z_out = 0.0649, 6, 0.05, 0
    xq = rng.integers(0, 256, size=(1, c, 16, 16))
    got, acc = _run_conv(qnn, w, sw, bias, s_in, z_in, s_out, z_out, xq)
    scale = qnn.scale_of(s_in, sw)
    multiplier = (scale / np.float64(np.float32(s_out)))[None, :, None, None]
    nominal = np.round(bias.astype(np.float64) / scale)[None, :, None, None]
    probed = qnn.htp_conv_biases("SM8550", s_in, z_in, sw, bias)[None, :, None, None]
    assert (requantize(acc + nominal, multiplier, z_out, 0, 255) != got).sum() > 0
    assert (requantize(acc + probed, multiplier, z_out, 0, 255) == got).all()
