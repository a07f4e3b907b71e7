"""Stage 3, quantize: one PT2E int8 model in PyTorch that every target deploys, and its PyTorch simulation.

| module | what it does |
|---|---|
| `pt2e` | the shared quantizer, `quantize()` (PTQ) and `QuantizedModel` (convert, simulate) |
| `passes/` | the graph rewrites and annotations the shared quantizer applies, one per module |
| `observers` | outlier-robust activation-range observers |
| `ptq/` | PTQ algorithms (equalization, AdaRound, range learning, bias correction), each with its recipe section |
| `quantizer_sites` | the quantizers of a calibrated graph: find, toggle, remove, widen to int16 |
| `sensitivity` | per-quantizer sensitivity and the float / int16 fallback under an accuracy budget |
| `qat` | quantization-aware training with distillation (`mnv4-deploy qat`) |
| `simulation_semantics` | which integer arithmetic a simulation computes (exact, or a runtime's own) |
| `fake_quant_fusion` | the simulation's quantize/dequantize pairs as one fused op, bit for bit |
| `litert_quantizer` | litert-torch's PT2E quantizer modules, imported without litert-torch's converter |

(Named `quantization`, not `quantize`: `mnv4_deploy.quantize` is the public function, pt2e.quantize.)
This package's __init__ imports nothing: config.recipes imports the PTQ algorithms' option classes, and
quantization.pt2e imports config.recipes.
"""
