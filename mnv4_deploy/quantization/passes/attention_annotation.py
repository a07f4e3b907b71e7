"""Attention annotation: the Mobile MQA's activation-activation matmuls, softmax and the reshapes between them
annotated for int8, which litert-torch's PT2E quantizer leaves float (so no hybrid could be full-integer).

The shared quantizer (quantization/pt2e.py) runs this after litert-torch's own `annotate`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

_VIEW_OPS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.transpose.int,
             torch.ops.aten.permute.default)
_MATMUL_OPS = (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)
_SOFTMAX_OPS = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)


def annotate_attention(model: torch.fx.GraphModule, config: Any) -> None:
    """Quantize the Mobile MQA attention: activation-activation matmuls, softmax and the reshapes between.

    litert-torch's quantizer annotates neither (its softmax pattern only matches `aten._softmax`, which
    torch.export does not produce): they stayed float, so no hybrid could be full-integer. Here:
      - matmul: both inputs and the output int8 per-tensor (TFLite FULLY_CONNECTED/BATCH_MATMUL int8); the
        inputs symmetric (zero point 0), on the projection that produces them where it is quantized already:
        OpenVINO's CPU plugin runs an activation-activation MatMul in int8 only when its inputs have no zero
        point, and runs it in f32 otherwise (softmax's fixed grid, the one unsigned input, stays as it is),
      - softmax: int8 output with the fixed scale 1/256 and zero point -128 that TFLite's int8 SOFTMAX
        kernel requires (the range [0, 1) exactly),
      - reshape/transpose/view/permute after a quantized tensor share its quantizer (they move values, so a
        second, different scale on the same values would only add a requantization).
    Inputs of matmul/softmax that are already quantized share that quantizer instead of observing again.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    act = config.input_activation
    if act is None or config.fixed_qparams is None:  # dynamic quantization: nothing to do here
        return
    symmetric = _symmetric(act) or act

    def annotated(node: Any) -> bool:
        ann = node.meta.get("quantization_annotation") if isinstance(node, torch.fx.Node) else None
        return ann is not None and ann._annotated

    def quantized_output(node: Any) -> bool:
        return annotated(node) and node.meta["quantization_annotation"].output_qspec is not None

    def input_spec(node: torch.fx.Node) -> Any:
        return SharedQuantizationSpec(node) if quantized_output(node) else act

    for node in model.graph.nodes:
        if node.op != "call_function" or annotated(node):
            continue
        if node.target in _VIEW_OPS and quantized_output(node.args[0]):
            src = node.args[0]
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={src: SharedQuantizationSpec(src)}, output_qspec=SharedQuantizationSpec(src),
                _annotated=True)
        elif node.target in _MATMUL_OPS and all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            a, b = node.args[:2]
            for src in (a, b):
                if quantized_output(src):
                    _make_symmetric(_spec_owner(src))
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={src: SharedQuantizationSpec(src) if quantized_output(src) else symmetric
                                 for src in (a, b)}, output_qspec=act, _annotated=True)
        elif node.target in _SOFTMAX_OPS and isinstance(node.args[0], torch.fx.Node):
            src = node.args[0]
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={src: input_spec(src)}, output_qspec=config.fixed_qparams, _annotated=True)


def _spec_owner(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose own output spec `node`'s quantized output shares (itself, or the producer before a chain
    of reshapes/transposes that share their input's quantizer)."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    spec = node.meta["quantization_annotation"].output_qspec
    while isinstance(spec, SharedQuantizationSpec) and isinstance(spec.edge_or_node, torch.fx.Node):
        node = spec.edge_or_node
        spec = node.meta["quantization_annotation"].output_qspec
    return node


def _make_symmetric(node: torch.fx.Node) -> None:
    """Give `node`'s affine per-tensor output spec zero point 0 (fixed grids and shared specs are left alone)."""
    annotation = node.meta["quantization_annotation"]
    symmetric = _symmetric(annotation.output_qspec)
    if symmetric is not None:
        annotation.output_qspec = symmetric


def _symmetric(spec: Any) -> Optional[Any]:
    """The same int8 spec with zero point 0, or None when `spec` is not an observed per-tensor spec (a fixed
    grid such as softmax's keeps its zero point)."""
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    if type(spec) is not QuantizationSpec or spec.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return None
    return dataclasses.replace(spec, qscheme=torch.per_tensor_symmetric)
