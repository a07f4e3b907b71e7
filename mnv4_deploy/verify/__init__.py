"""Verification: every artifact run in its real runtime and compared with the float model and with the PyTorch
simulation of its int8 model, then described in its manifest.

| module | what it does |
|---|---|
| `fidelity` | cosine, SQNR, top-1 agreement of an artifact's logits against a reference |
| `artifact_gate` | the checks an artifact must pass to be written (the recipe's `verification:` thresholds) |
| `latency` | timed runs of the real runtime |
| `significance` | Wilson intervals, paired differences, exact McNemar, Holm (what both gates judge noise with) |
| `predictions` | per-image predictions and the image-set digest kept in manifests for later paired comparisons |
| `tensorwise` | every quantized tensor of an int8 artifact against the simulation's, layer by layer |
| `simulations` | the simulation's logits runtimes are compared with, computed while the targets export |
| `manifest` | the manifest.json written beside every artifact, and reading it back |

The export-and-verify step that ties them together is `mnv4_deploy.pipeline.export_and_verify`.
"""
