"""Graph passes of the shared PT2E quantization, one per module, each with its own test (tests/test_pass_*.py):

| module | when | what |
|---|---|---|
| `add_tagging` | on the exported graph, before prepare_pt2e | residual adds made visible to litert-torch's add annotator |
| `batchnorm_as_depthwise` | `transform_for_annotation`, after conv-BN folding | a BatchNorm no conv absorbs becomes a 1x1 depthwise conv |
| `attention_annotation` | after litert-torch's `annotate` | the Mobile MQA's matmuls, softmax and reshapes annotated for int8 |

The shared quantizer that runs them is `quantization/pt2e.py`; each target's own passes live in its package
(`targets/<name>/passes/`).
"""
