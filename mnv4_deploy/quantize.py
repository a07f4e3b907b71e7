"""Quantize once, in PyTorch (PT2E), so every target deploys the same int8 model.

The calibrated PT2E model is converted to a graph with explicit quantize/dequantize ops; ONNX exports it as
QDQ, OpenVINO as FakeQuantize, LiteRT as int8 kernels. Running that graph in PyTorch is the reference
simulation each target's runtime output is compared against.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .data import LoadedImages
from .recipes import ActivationQuant, Quantization, Recipe


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export the model; batch is dynamic so calibration can run in batches."""
    if dynamic_batch and example.shape[0] < 2:
        example = example.repeat(2, 1, 1, 1)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    return torch.export.export(model, (example,), dynamic_shapes=shapes)


def _activation_observer(spec: ActivationQuant) -> Any:
    from torchao.quantization.pt2e import observer as obs

    from . import observers

    return {
        "histogram": obs.HistogramObserver,
        "minmax": obs.MinMaxObserver,
        "moving_average": obs.MovingAverageMinMaxObserver,
        "mean_minmax": observers.MeanMinMaxObserver,
        "percentile": observers.PercentileObserver,
        "mse": observers.MSEObserver,
    }[spec.observer]


def _activation_observer_args(spec: ActivationQuant) -> dict[str, Any]:
    return {"percentile": spec.percentile} if spec.observer == "percentile" else {}


def build_quantizer(q: Quantization) -> Any:
    """A PT2E quantizer for int8 (weights symmetric, per-channel by default; activations affine per-tensor).

    Built on litert-torch's PT2E quantizer (XNNPACK-style patterns: conv+relu, add, pooling, linear) with
    the recipe's observers, so the graph it produces lowers to int8 kernels on every target.
    """
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.pt2e_quantizer_utils import QuantizationConfig
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    base = get_symmetric_quantization_config(is_per_channel=q.weights.granularity == "per_channel")
    act = QuantizationSpec(
        dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=_activation_observer(q.activations).with_args(
            eps=2**-12, **_activation_observer_args(q.activations)),
    )
    per_channel = q.weights.granularity == "per_channel"
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, ch_axis=0,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=(obs.PerChannelMinMaxObserver if per_channel else obs.MinMaxObserver)
        .with_args(eps=2**-12),
    )
    config = QuantizationConfig(act, act, weight, None, base.fixed_qparams, False, False)
    return PT2EQuantizer().set_global(config)


@dataclass
class QuantizedModel:
    """A calibrated PT2E model, plus what the manifest must say about how it was calibrated."""

    prepared: torch.fx.GraphModule
    recipe: Recipe
    calibration: dict[str, Any] = field(default_factory=dict)
    quantizer: Any = None

    def converted(self, fold_weights: bool = True) -> torch.fx.GraphModule:
        """The int8 graph (quantize/dequantize ops); `fold_weights` stores weights as int8 constants."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        return convert_pt2e(copy.deepcopy(self.prepared), fold_quantize=fold_weights)

    def simulate(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Logits of the fake-quantized model in PyTorch: what a faithful runtime should reproduce."""
        gm = self._sim_module()
        with torch.no_grad():
            return np.concatenate([gm(torch.from_numpy(x[i:i + batch_size])).numpy()
                                   for i in range(0, len(x), batch_size)])

    def _sim_module(self) -> torch.fx.GraphModule:
        if not hasattr(self, "_sim"):
            self._sim = self.converted(fold_weights=True)
        return self._sim


def _tag_adds(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Let the quantizer see tensor adds (the residual connections).

    Non-strict torch.export leaves no `source_fn_stack` on aten.add nodes, and litert-torch's add annotator
    finds adds only through it: residual adds then stay float (QUANTIZE/DEQUANTIZE around every skip
    connection), which breaks full-integer TFLite models and misstates the int8 model for every target.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.add.Tensor and "source_fn_stack" not in node.meta:
            node.meta["source_fn_stack"] = [(node.name, torch.add)]
    return gm


def quantize(
    model: nn.Module,
    calibration: LoadedImages,
    recipe: Recipe,
    calibration_source: str = "",
    progress: Optional[Callable] = None,
) -> QuantizedModel:
    """Post-training int8 quantization: export, insert observers, run the calibration images."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    q = recipe.quantization
    example = torch.from_numpy(calibration.x[:2])
    start = time.perf_counter()
    quantizer = build_quantizer(q)
    prepared = prepare_pt2e(_tag_adds(export_program(model, example).module()), quantizer)
    batches = list(calibration.batches(q.calibration.batch_size))
    it = progress(batches, desc="calibrating", unit="batch") if progress else batches
    with torch.no_grad():
        for batch in it:
            prepared(torch.from_numpy(batch))
    info = {
        "method": "pt2e",
        "source": calibration_source,
        "images": len(calibration),
        "weights": f"int{q.weights.bits} {q.weights.granularity} symmetric",
        "activations": f"int{q.activations.bits} per_tensor affine, {q.activations.observer} observer",
        "seconds": round(time.perf_counter() - start, 2),
    }
    if q.fallback.max_layers > 0:
        prepared, info["fallback"] = _apply_fallback(prepared, model, calibration, q)
    return QuantizedModel(prepared, recipe, info, quantizer)


def _apply_fallback(prepared: torch.fx.GraphModule, model: nn.Module, calibration: LoadedImages,
                    q: Quantization) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Leave the most sensitive activations float, judged on the calibration images (never the held-back ones)."""
    from . import sensitivity
    from .verify import torch_logits

    x = calibration.x[:256]
    chosen = sensitivity.choose_fallback(prepared, x, torch_logits(model, x), q.fallback.target_agreement,
                                         q.fallback.max_layers)
    return sensitivity.remove_sites(prepared, chosen["float_sites"]), chosen
