"""quantization/passes/attention_annotation.py: the Mobile MQA's activation-activation matmuls and softmax are
quantized by the shared quantizer (litert-torch's annotates neither): observers on both matmul inputs and on
their outputs, the inputs symmetric (what OpenVINO's CPU plugin needs to run such a MatMul in int8), and the
softmax output on TFLite's fixed int8 grid (scale 1/256, zero point -128)."""
from __future__ import annotations

import torch
from torch import nn

from mnv4_deploy.config.recipes import Quantization
from mnv4_deploy.quantization.pt2e import build_quantizer, export_program


class TinyAttention(nn.Module):
    """q k^T -> softmax over the keys (axis 2, as MobileMQA's) -> times v, between 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Conv2d(8, 8, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x).reshape(b, 1, c, h * w).transpose(2, 3)  # b 1 hw c
        k = self.k(x).reshape(b, 1, c, h * w)  # b 1 c hw
        v = self.v(x).reshape(b, 1, c, h * w).transpose(2, 3)  # b 1 hw c
        attn = torch.matmul(q, k).softmax(dim=2)
        return self.out(torch.matmul(attn, v).transpose(2, 3).reshape(b, c, h, w))


def _prepared() -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    x = torch.randn(2, 8, 4, 4)
    gm = prepare_pt2e(export_program(TinyAttention().eval(), x).module(), build_quantizer(Quantization()))
    gm(x)
    return gm


def _observer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> object:
    assert node.op == "call_module", f"{node.name} is not observed"
    return getattr(gm, node.target)


def test_attention_matmuls_and_softmax_are_observed() -> None:
    gm = _prepared()
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.matmul.default]
    softmaxes = [n for n in gm.graph.nodes if n.op == "call_function"
                 and n.target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)]
    assert len(matmuls) == 2 and len(softmaxes) == 1
    for mm in matmuls:
        for arg in mm.args[:2]:
            _observer(gm, arg)
        assert all(u.op == "call_module" for u in mm.users)
    [out] = softmaxes[0].users
    fixed = _observer(gm, out)
    assert float(fixed.scale) == 1 / 256 and int(fixed.zero_point) == -128


def test_matmul_inputs_are_symmetric_on_their_projections() -> None:
    """The q/k/v projections' outputs (shared through the reshapes) get zero point 0; softmax keeps its grid."""
    gm = _prepared()
    convert_in = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.matmul.default:
            for arg in node.args[:2]:
                convert_in[arg.name] = _observer(gm, arg)
    symmetric = {name: obs for name, obs in convert_in.items() if obs.qscheme == torch.per_tensor_symmetric}
    assert len(convert_in) == 4 and len(symmetric) == 3, {n: o.qscheme for n, o in convert_in.items()}
    for obs in symmetric.values():
        assert int(obs.calculate_qparams()[1]) == 0
    [fixed] = [obs for obs in convert_in.values() if obs.qscheme != torch.per_tensor_symmetric]
    assert float(fixed.scale) == 1 / 256 and int(fixed.zero_point) == -128
    # The projections' own observers are the symmetric ones (one quantizer through the reshapes).
    conv_outputs = {_observer(gm, next(iter(n.users))) for n in gm.graph.nodes
                    if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default and n.args[0].op != "placeholder"}
    assert set(map(id, symmetric.values())) <= set(map(id, conv_outputs))
