"""targets/tflite/passes/softmax_composites.py: every softmax marked as litert's `odml.softmax` composite on the
last axis (transposed there and back for another axis), so LiteRT gets its fused SOFTMAX builtin; the graph
computes the same values."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("litert_torch", reason="pip install 'mnv4-deploy[tflite]'")

from mnv4_deploy.targets.tflite.passes.softmax_composites import softmax_composites  # noqa: E402


class TwoSoftmaxes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=2) + x.softmax(dim=-1)


def _marks(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "mark_tensor" in str(n.target))


def test_softmaxes_become_composites_on_the_last_axis() -> None:
    x = torch.randn(1, 2, 5, 7)
    gm = torch.export.export(TwoSoftmaxes().eval(), (x,)).module()
    assert softmax_composites(gm) == 2
    assert _marks(gm) == 4  # input and output of each composite
    transposes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.transpose.int]
    assert len(transposes) == 2  # the axis-2 softmax only: there and back
    with torch.no_grad():
        torch.testing.assert_close(gm(x), TwoSoftmaxes()(x))
    assert softmax_composites(gm) == 0  # already marked
