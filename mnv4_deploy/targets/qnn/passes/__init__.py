"""Rewrites of the QDQ ONNX model compiled for HTP, one per module, each with its own test
(tests/test_pass_qnn_*.py):

- `boundary_converts`: exact DQ -> Q converts where an int16 fallback site meets 8-bit tensors.
"""
