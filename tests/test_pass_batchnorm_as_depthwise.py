"""quantization/passes/batchnorm_as_depthwise.py: an eval BatchNorm that no conv absorbs becomes the 1x1 depthwise
conv it is (same outputs), so the quantizer treats it as a conv; a training-mode BatchNorm (QAT) is left alone."""
from __future__ import annotations

import torch
from torch import nn

from mnv4_deploy.quantization.passes.batchnorm_as_depthwise import batchnorm_as_depthwise
from mnv4_deploy.quantization.pt2e import export_program


class ResidualThenNorm(nn.Module):
    """A BatchNorm on a residual sum, as in the hybrids' Mobile MQA blocks: no conv before it to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x + self.conv(x))


def _ops(gm: torch.fx.GraphModule, op: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = ResidualThenNorm()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
        m.bn.bias.uniform_(-1, 1)
    return m.eval()


def test_standalone_batchnorm_becomes_a_depthwise_conv_with_the_same_outputs() -> None:
    m = _model()
    x = torch.randn(2, 4, 8, 8)
    gm = export_program(m, x).module()
    assert _ops(gm, torch.ops.aten.batch_norm.default) == 1
    convs = _ops(gm, torch.ops.aten.conv2d.default)
    out = batchnorm_as_depthwise(gm)
    assert out is gm and _ops(gm, torch.ops.aten.batch_norm.default) == 0
    assert _ops(gm, torch.ops.aten.conv2d.default) == convs + 1
    depthwise = [n for n in gm.graph.nodes
                 if n.target == torch.ops.aten.conv2d.default and len(n.args) > 6 and n.args[6] == 4]
    assert len(depthwise) == 1 and tuple(getattr(gm, depthwise[0].args[1].target).shape) == (4, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


def test_training_mode_batchnorm_is_left_alone() -> None:
    m = _model().train()
    gm = torch.export.export(m, (torch.randn(2, 4, 8, 8),)).module()
    before = _ops(gm, torch.ops.aten.batch_norm.default)
    batchnorm_as_depthwise(gm)
    assert before == _ops(gm, torch.ops.aten.batch_norm.default)
