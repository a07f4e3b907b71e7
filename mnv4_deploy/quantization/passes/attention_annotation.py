"""Attention annotation: the Mobile MQA's activation-activation matmuls, softmax and the reshapes between them
annotated for int8, which litert-torch's PT2E quantizer leaves float (so no hybrid could be full-integer).

The shared quantizer (quantization/pt2e.py) runs this after litert-torch's own `annotate`.
"""
from __future__ import annotations

from typing import Any

import torch

_VIEW_OPS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.transpose.int,
             torch.ops.aten.permute.default)
_MATMUL_OPS = (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)
_SOFTMAX_OPS = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)


def annotate_attention(model: torch.fx.GraphModule, config: Any) -> None:
    """Quantize the Mobile MQA attention: activation-activation matmuls, softmax and the reshapes between.

    litert-torch's quantizer annotates neither (its softmax pattern only matches `aten._softmax`, which
    torch.export does not produce): they stayed float, so no hybrid could be full-integer. Here:
      - matmul: both inputs and the output int8 per-tensor (TFLite FULLY_CONNECTED/BATCH_MATMUL int8),
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
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={a: input_spec(a), b: input_spec(b)}, output_qspec=act, _annotated=True)
        elif node.target in _SOFTMAX_OPS and isinstance(node.args[0], torch.fx.Node):
            src = node.args[0]
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={src: input_spec(src)}, output_qspec=config.fixed_qparams, _annotated=True)
