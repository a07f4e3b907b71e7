"""The shared ONNX export: a PyTorch module (the prepared float model, or the converted PT2E int8 graph, whose
quantize/dequantize ops become QuantizeLinear/DequantizeLinear) written as one .onnx file by the dynamo exporter.

The onnx target writes its artifact with it, and the qnn target the QDQ model it compiles for HTP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...infra.converter_output import captured
from ...quantization.pt2e import export_program

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 18
INT16_OPSET = 21  # first opset whose QuantizeLinear/DequantizeLinear take int16


def export_onnx(model: Any, example: Any, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """torch.export `model` (batch dynamic) and write it to `path` as ONNX at `opset`, input 'input', output
    'logits', weights inside the file."""
    import torch

    program = export_program(model, example)
    with captured("torch.onnx.export"):
        torch.onnx.export(
            program, (example,), str(path), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
        )
