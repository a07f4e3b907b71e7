"""The int8 tensors inside an XNNPACK delegate, for the tensor-by-tensor check.

ExecuTorch's devtools see a delegate as one op; its intermediate-output taps (`executorch.devtools.
intermediate_output_tap`) instead make every activation quantizer's int8 output an extra output of the program.
XNNPACK still takes the graph as one delegate and computes the same logits bit for bit, so the tapped program,
exported only for this check (the shipped `.pte` is untapped), shows what the shipped one computes inside.

Lowering the tapped program costs as much as the export itself, so an int8 export builds it at once
(`build_tapped`), beside the artifact in the staging folder (in the export worker when there is one, beside the
other targets' work), and the check reads and removes it before the folder is committed. An artifact without
it (an older folder, `mnv4-deploy debug`) gets one built in a temporary folder.
"""
from __future__ import annotations

import json
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


def tapped_files(artifact: Path) -> tuple[Path, Path]:
    """Where `build_tapped` writes the tapped program and its taps for `artifact` (beside it)."""
    artifact = Path(artifact)
    return artifact.with_name(f".{artifact.name}.tapped.pte"), artifact.with_name(f".{artifact.name}.taps.json")


def build_tapped(model: torch.fx.GraphModule, example: torch.Tensor, artifact: Path) -> None:
    """Lower `model` with every activation quantizer's output tapped; write the program and, per tap, its node's
    name, output index, scale and zero point beside `artifact`."""
    from executorch.devtools.intermediate_output_tap import (FULL_TENSOR, select_by_op_type, strip_taps_,
                                                             tap_intermediate_outputs_)

    ep = exported(model, example)
    nodes = {n.name: n for n in ep.graph_module.graph.nodes}
    ep, taps = tap_intermediate_outputs_(ep, (select_by_op_type(_QUANTIZE), FULL_TENSOR))
    edge = lower(ep)
    strip_taps_(edge)
    program, described = tapped_files(artifact)
    program.write_bytes(edge.to_executorch().buffer)
    described.write_text(json.dumps([
        {"node": t.node_name, "output": t.output_index, "scale": float(nodes[t.node_name].args[1]),
         "zero_point": int(nodes[t.node_name].args[2])} for t in taps]))


def quantized_tensors(model: torch.fx.GraphModule, example: torch.Tensor, x: np.ndarray, threads: int,
                      artifact: Path) -> tuple[list[QTensor], dict[str, Any]]:
    """Every activation quantizer's int8 output on `x`, named as in the PyTorch simulation's graph: from the
    tapped program built with `artifact` (then removed, so it is never committed with it), or built now."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            built = Path(artifact)
            if not all(f.exists() for f in tapped_files(built)):
                built = Path(tmp) / built.name
                build_tapped(model, example, built)
            program_file, taps_file = tapped_files(built)
            return _run(program_file, json.loads(taps_file.read_text()), x, threads)
    finally:
        for f in tapped_files(artifact):
            f.unlink(missing_ok=True)


def _run(program_file: Path, taps: list[dict[str, Any]], x: np.ndarray,
         threads: int) -> tuple[list[QTensor], dict[str, Any]]:
    program = Program(program_file, threads)
    runs = [program.run(x[i:i + 1]) for i in range(len(x))]
    tensors = []
    for order, tap in enumerate(taps):
        values = np.concatenate([out[tap["output"]].numpy() for out in runs]).astype(np.int32)
        tensors.append(QTensor(tap["node"], tap["scale"], tap["zero_point"], values, order, op="XNNPACK (tapped)"))
    return tensors, {"runtime": "executorch.runtime, the program re-exported with its quantizer outputs tapped "
                                "(one XNNPACK delegate; logits bit for bit those of the shipped program)"}
