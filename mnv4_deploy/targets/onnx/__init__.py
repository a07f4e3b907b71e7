"""ONNX: dynamo export, int8 as QDQ from the shared PT2E model, verified in onnxruntime CPU (target.py)."""
from .target import OnnxOptions, OnnxTarget

__all__ = ["OnnxOptions", "OnnxTarget"]
