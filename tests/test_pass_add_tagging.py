"""quantization/passes/add_tagging.py: tensor adds that non-strict torch.export leaves without `source_fn_stack`
get one naming torch.add, which is how litert-torch's quantizer finds adds (residual connections)."""
from __future__ import annotations

import torch
from torch import nn

from mnv4_deploy.quantization.passes.add_tagging import tag_adds
from mnv4_deploy.quantization.pt2e import export_program


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def _adds(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.add.Tensor]


def test_every_add_names_torch_add() -> None:
    gm = export_program(Residual().eval(), torch.zeros(2, 3, 4, 4)).module()
    adds = _adds(gm)
    assert adds
    for node in adds:
        node.meta.pop("source_fn_stack", None)  # as non-strict export leaves them
    assert tag_adds(gm) is gm
    assert all(n.meta["source_fn_stack"] == [(n.name, torch.add)] for n in _adds(gm))


def test_an_existing_source_is_kept() -> None:
    gm = export_program(Residual().eval(), torch.zeros(2, 3, 4, 4)).module()
    node = _adds(gm)[0]
    node.meta["source_fn_stack"] = [("mine", "operator.add")]
    tag_adds(gm)
    assert node.meta["source_fn_stack"] == [("mine", "operator.add")]
