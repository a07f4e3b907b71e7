"""ExecuTorch target (XNNPACK `.pte`): the lowering's rewrites and what the program file says about itself.

Numbers (float parity, int8 against the simulation tensor by tensor, every conv in int8, the gate, atomic
writes, CLI flags) are checked for this target by tests/test_target_conformance.py like for every other; here
are the ExecuTorch-specific parts: the rewrites that let XNNPACK take a whole MNv4 graph as one delegate, and
the constant folding that must not turn int8 weights into float ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch")

from mnv4_deploy.targets.executorch import lowering, program  # noqa: E402
from mnv4_deploy.targets.executorch.runtime import Program  # noqa: E402

HYBRID_REFERENCE = (Path(os.environ.get("MNV4_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
                    / "models" / "mnv4_hybrid_medium_tin202_e1.pth")


class Attention(nn.Module):
    """MobileMQA's shapes in miniature: 4-D matmuls and a softmax over a non-last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q = self.q(x).reshape(b, 1, 8, h * w)  # [b, heads, d, tokens]
        kv = self.kv(x).reshape(b, 1, 8, h * w)
        attn = torch.matmul(q.transpose(-1, -2), kv).softmax(dim=2)  # [b, heads, tokens, tokens], not last axis
        return torch.matmul(kv, attn).reshape(b, 8, h, w) + x


def test_softmax_is_moved_to_the_last_axis_with_the_same_numbers() -> None:
    model, x = Attention().eval(), torch.randn(1, 8, 4, 4)
    gm = torch.export.export(model, (x,), strict=False).module()
    assert lowering.softmax_last_dim(gm) == 1
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert lowering.softmax_last_dim(gm) == 0  # nothing left to move


def test_attention_is_one_xnnpack_delegate_without_portable_kernels(tmp_path: Path) -> None:
    model, x = Attention().eval(), torch.randn(1, 8, 4, 4)
    path = tmp_path / "attention.pte"
    path.write_bytes(lowering.to_pte(model, x))
    plan = program.plan(path)
    assert plan["delegate_calls"] == {"XnnpackBackend": 1} and plan["kernel_calls"] == {}
    out = Program(path).run(x.numpy())[0]
    assert torch.allclose(out, model(x), atol=1e-5)


def test_constant_folding_keeps_the_quantize_ops() -> None:
    """Folding the ATen quantize/dequantize forms would make every int8 weight a float constant."""
    kept = lowering._kept_quantization_ops()
    ops = torch.ops.quantized_decomposed
    assert ops.dequantize_per_channel.default in kept and ops.quantize_per_tensor.default in kept


@pytest.mark.slow
def test_hybrid_int8_is_one_delegate_and_names_its_float_compute(tmp_path: Path) -> None:
    """hybrid_medium (1-epoch checkpoint): MobileMQA lowered whole; attention matmuls fp32 inside XNNPACK."""
    if not HYBRID_REFERENCE.exists():
        pytest.skip(f"{HYBRID_REFERENCE} not found")
    from mnv4_deploy.load.images import default_calibration
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.config.recipes import parse_recipe

    from .conftest import prepared_model

    loaded = prepared_model("mobilenetv4_hybrid_medium", str(HYBRID_REFERENCE), 202, 64)
    images, _ = default_calibration(loaded.preprocessing, 32, seed=0)
    quantized = quantize(loaded.model, images, parse_recipe("quantization: {calibration: {images: 32}}\n"))
    path = tmp_path / "hybrid.pte"
    path.write_bytes(lowering.to_pte(quantized.converted(fold_weights=True), torch.zeros(1, 3, 64, 64)))
    assert program.plan(path)["delegate_calls"] == {"XnnpackBackend": 1}
    compute = program.int8_compute(path)
    convs = sum(n for kind, n in _compute_kinds(path).items() if "Conv" in kind and "qint8" in kind)
    assert convs >= 1 and compute["int8"] < compute["total"]
    assert all("BatchMatrixMultiply" in f for f in compute["float"]), compute["float"]
    logits = Program(path).run(images.x[:1])[0].numpy()
    assert np.isfinite(logits).all()


def _compute_kinds(path: Path) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for graph in program.xnnpack_graphs(path):
        for kind, n in program.summary(graph)["compute"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    return kinds
