"""Add tagging: tensor adds (the residual connections) made visible to litert-torch's PT2E quantizer.

Non-strict torch.export leaves no `source_fn_stack` on aten.add nodes, and litert-torch's add annotator finds adds
only through it: residual adds then stay float (QUANTIZE/DEQUANTIZE around every skip connection), which breaks
full-integer TFLite models and misstates the int8 model for every target. Run on the exported graph before
prepare_pt2e (quantize, QAT).
"""
from __future__ import annotations

import torch


def tag_adds(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give every aten.add node without a `source_fn_stack` one naming torch.add; returns `gm` (changed in place)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.add.Tensor and "source_fn_stack" not in node.meta:
            node.meta["source_fn_stack"] = [(node.name, torch.add)]
    return gm
