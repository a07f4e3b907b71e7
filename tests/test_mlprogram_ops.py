"""The CoreML executor's quantize/dequantize take float32 on float16 operands (mlprogram/ops.py `_exact_float`):
that must give the float64 definition's result bit for bit, checked on every finite float16 input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mnv4_deploy.mlprogram.ops import OPS


def _every_finite_float16() -> torch.Tensor:
    values = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    return torch.from_numpy(values[np.isfinite(values)].copy())


def _scales(n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    drawn = np.exp2(rng.uniform(-24, 15, n)).astype(np.float16)  # subnormal to near the float16 maximum
    edge = np.array([6e-8, 1e-4, 1 / 256, 0.0078125, 1.0, 3.0, 65504.0], np.float16)
    return [torch.tensor(s) for s in np.concatenate([drawn, edge]) if s > 0]


def _float64_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lo, hi = (-128, 127) if dtype == torch.int8 else (0, 255)
    q = torch.round(x.double() / scale.double()) + zero.double()
    return q.clamp(lo, hi).to(dtype)


@pytest.mark.parametrize("dtype,zero", [(torch.int8, 0), (torch.int8, -3), (torch.uint8, 128)])
def test_float16_quantize_is_the_float64_definition(dtype: torch.dtype, zero: int) -> None:
    x = _every_finite_float16()
    name = "int8" if dtype == torch.int8 else "uint8"
    z = torch.tensor(zero, dtype=dtype)
    for scale in _scales(48):
        got = OPS["quantize"]({"input": x, "scale": scale, "zero_point": z, "output_dtype": name})
        assert torch.equal(got, _float64_quantize(x, scale, z, dtype)), float(scale)


def test_float16_dequantize_is_the_float64_definition() -> None:
    q8 = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)
    for scale in _scales(200):
        for zero in (0, -5, 7):
            z = torch.tensor(zero, dtype=torch.int8)
            got = OPS["dequantize"]({"input": q8, "scale": scale, "zero_point": z}).to(torch.float16)
            want = ((q8.double() - zero) * scale.double()).to(torch.float16)
            assert torch.equal(got, want), (float(scale), zero)
