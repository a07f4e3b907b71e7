"""Qualcomm QNN: the Hexagon NPU (HTP) through onnxruntime-qnn, emulated on x86 (target.py)."""
from .target import QnnOptions, QnnTarget

__all__ = ["QnnOptions", "QnnTarget"]
