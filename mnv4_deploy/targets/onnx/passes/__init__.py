"""Rewrites of the exported QDQ ONNX file, one per module, each with its own test (tests/test_pass_onnx_*.py):

- `unsigned_activations`: int8 (int16) activation zero points as uint8 (uint16), the same values (qnn runs it too).
"""
