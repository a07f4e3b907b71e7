"""The int8 tensors inside an XNNPACK delegate, for the tensor-by-tensor check.

ExecuTorch's devtools see a delegate as one op; its intermediate-output taps (`executorch.devtools.
intermediate_output_tap`) instead make every activation quantizer's int8 output an extra output of the program.
XNNPACK still takes the graph as one delegate and computes the same logits bit for bit, so the tapped program,
exported only for this check (the shipped `.pte` is untapped), shows what the shipped one computes inside.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...verify.tensorwise import QTensor
from .lowering import exported, lower
from .runtime import Program

# The fully qualified name: the short 'quantize_per_tensor.default' also matches dequantize_per_tensor, and a
# tapped dequantize breaks XNNPACK's lowering.
_QUANTIZE = "quantized_decomposed.quantize_per_tensor.default"


def quantized_tensors(model: torch.fx.GraphModule, example: torch.Tensor, x: np.ndarray,
                      threads: int) -> tuple[list[QTensor], dict[str, Any]]:
    """Every activation quantizer's int8 output on `x`, named as in the PyTorch simulation's graph."""
    from executorch.devtools.intermediate_output_tap import (FULL_TENSOR, select_by_op_type, strip_taps_,
                                                             tap_intermediate_outputs_)

    ep = exported(model, example)
    nodes = {n.name: n for n in ep.graph_module.graph.nodes}
    ep, taps = tap_intermediate_outputs_(ep, (select_by_op_type(_QUANTIZE), FULL_TENSOR))
    edge = lower(ep)
    strip_taps_(edge)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tapped.pte"
        path.write_bytes(edge.to_executorch().buffer)
        program = Program(path, threads)
        runs = [program.run(x[i:i + 1]) for i in range(len(x))]
    tensors = []
    for order, tap in enumerate(taps):
        q = nodes[tap.node_name]
        values = np.concatenate([out[tap.output_index].numpy() for out in runs]).astype(np.int32)
        tensors.append(QTensor(tap.node_name, float(q.args[1]), int(q.args[2]), values, order, op="XNNPACK (tapped)"))
    return tensors, {"runtime": "executorch.runtime, the program re-exported with its quantizer outputs tapped "
                                "(one XNNPACK delegate; logits bit for bit those of the shipped program)"}
