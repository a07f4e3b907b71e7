"""From a PyTorch model to an XNNPACK-delegated ExecuTorch program (`.pte`).

`torch.export` (static batch 1) -> three rewrites XNNPACK needs to take MNv4 whole -> `to_edge_transform_and_lower`
with the XNNPACK partitioner -> `to_executorch`. The rewrites change no number:
- constants folded (`constant_prop_pass`), so weights that MobileMQA computes in `forward` (its reordered query and
  output projections) are constants XNNPACK can take as conv filters; the int8 weights' dequantize ops are kept
  (folding them would silently make an int8 program float);
- softmax moved to the last axis (`softmax_last_dim`): XNNPACK's softmax takes no other axis;
- no-op `expand_copy` removed (`remove_noop_expand`): `aten.matmul` of 4-D attention tensors decomposes into copies
  XNNPACK has no kernel for, which split the delegate.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch


def exported(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The model (float nn.Module, or the converted PT2E GraphModule) exported at batch 1, ready to lower."""
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    from torchao.quantization.pt2e import move_exported_model_to_eval

    if isinstance(model, torch.fx.GraphModule):
        gm = move_exported_model_to_eval(copy.deepcopy(model))
    else:
        gm = torch.export.export(model, (example,), strict=False).module()
    softmax_last_dim(gm)
    ep = torch.export.export(gm, (example,), strict=False)
    return constant_prop_pass(ep, custom_skip_targets=_kept_quantization_ops())


def lower(ep: torch.export.ExportedProgram) -> Any:
    """The edge program, its XNNPACK partitions delegated (an EdgeProgramManager)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(ep, transform_passes=[remove_noop_expand], partitioner=[XnnpackPartitioner()])


def to_pte(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    return lower(exported(model, example)).to_executorch().buffer


def softmax_last_dim(gm: torch.fx.GraphModule) -> int:
    """Softmax over a non-last axis as transpose -> softmax(last) -> transpose (in place); how many were moved."""
    moved = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default):
            continue
        val = node.meta.get("val")
        if val is None:
            continue
        rank = len(val.shape)
        dim = int(node.args[1]) % rank
        if dim == rank - 1:
            continue
        with gm.graph.inserting_before(node):
            t = gm.graph.call_function(torch.ops.aten.transpose.int, (node.args[0], dim, rank - 1))
            sm = gm.graph.call_function(torch.ops.aten.softmax.int, (t, rank - 1))
            back = gm.graph.call_function(torch.ops.aten.transpose.int, (sm, dim, rank - 1))
        node.replace_all_uses_with(back)
        gm.graph.erase_node(node)
        moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved


def remove_noop_expand(gm: torch.fx.GraphModule) -> Any:
    """Edge-dialect pass: drop each expand_copy whose output has its input's shape."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import PassResult

    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == exir_ops.edge.aten.expand_copy.default:
            src = node.args[0]
            if tuple(src.meta["val"].shape) == tuple(node.meta["val"].shape):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                changed = True
    if changed:
        gm.recompile()
    return PassResult(gm, changed)


def _kept_quantization_ops() -> set:
    """What constant folding must leave alone: its default list names the edge forms of quantize/dequantize
    only, and folding the ATen forms turns every int8 weight into a float constant (an int8 program that runs
    float convolutions between converts)."""
    from executorch.exir.passes import constant_prop_pass as cpp

    kept = set(cpp._DEFAULT_SKIP_TARGETS)
    ops = torch.ops.quantized_decomposed
    for name in ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel",
                 "choose_qparams"):
        packet: Optional[Any] = getattr(ops, name, None)
        if packet is not None:
            kept |= {getattr(packet, overload) for overload in packet.overloads()}
    return kept
