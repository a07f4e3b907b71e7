"""Rewrites of the PyTorch graph litert-torch converts, one per module, each with its own test
(tests/test_pass_tflite_*.py):

- `softmax_composites`: softmax marked as litert's `odml.softmax` composite (the fused SOFTMAX builtin).
"""
