"""Quantize once, in PyTorch (PT2E), so every target deploys the same int8 model.

The calibrated PT2E model is converted to a graph with explicit quantize/dequantize ops; ONNX exports it as
QDQ, OpenVINO as FakeQuantize, LiteRT as int8 kernels. Running that graph in PyTorch is the reference
simulation each target's runtime output is compared against.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..config.recipes import ActivationQuant, Quantization, Recipe
from ..infra.stages import stage
from ..load.images import LoadedImages, model_input
from .litert_quantizer import quantizer_modules
from .passes.add_tagging import tag_adds
from .passes.attention_annotation import annotate_attention
from .passes.batchnorm_as_depthwise import batchnorm_as_depthwise
from .simulation_semantics import EXACT, Semantics


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
        "kl": observers.KLObserver,
    }[spec.observer]


def _activation_observer_args(spec: ActivationQuant) -> dict[str, Any]:
    return {"percentile": spec.percentile} if spec.observer == "percentile" else {}


def build_quantizer(q: Quantization, qat: str = "") -> Any:
    """A PT2E quantizer for int8 (weights symmetric, per-channel by default; activations affine per-tensor).

    `qat`: '' for PTQ (observers); 'fixed' for QAT with fake-quantizers whose ranges come from the observers;
    'learned' for QAT whose activation ranges are then learned by gradient (LSQ).

    Built on litert-torch's PT2E quantizer (XNNPACK-style patterns: conv+relu, add, pooling, linear) with
    the recipe's observers, so the graph it produces lowers to int8 kernels on every target.
    """
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    utils, litert = quantizer_modules()
    base = litert.get_symmetric_quantization_config(is_per_channel=q.weights.granularity == "per_channel")
    per_channel = q.weights.granularity == "per_channel"
    act_ctr = _activation_observer(q.activations).with_args(eps=2**-12, **_activation_observer_args(q.activations))
    weight_ctr = (obs.PerChannelMinMaxObserver if per_channel else obs.MinMaxObserver).with_args(eps=2**-12)
    if qat:
        act_ctr, weight_ctr = _fake_quantizers(q, qat)
    act = QuantizationSpec(
        dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=act_ctr,
    )
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, ch_axis=0,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=weight_ctr,
    )
    config = utils.QuantizationConfig(act, act, weight, None, base.fixed_qparams, bool(qat), False)
    return _attention_quantizer_class()().set_global(config)


def _fake_quantizers(q: Quantization, qat: str) -> tuple[Any, Any]:
    """Fake-quantizer constructors for QAT: the recipe's activation observer inside each, so training starts
    from the same ranges PTQ would pick; 'learned' makes activation scales trainable parameters (LSQ)."""
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    _allow_litert_qat_patterns()
    per_channel = q.weights.granularity == "per_channel"
    observer = _activation_observer(q.activations)
    extra = _activation_observer_args(q.activations)
    if qat == "learned":
        act = LearnableFakeQuantize.with_args(observer=observer, eps=2**-12, use_grad_scaling=True, **extra)
    else:
        act = FakeQuantize.with_args(observer=observer, eps=2**-12, **extra)
    weight = FakeQuantize.with_args(
        observer=obs.PerChannelMinMaxObserver if per_channel else obs.MinMaxObserver, eps=2**-12)
    return act, weight


def _allow_litert_qat_patterns() -> None:
    """litert-torch 0.10's conv+BN QAT annotator hands torch.export a plain function, which current torchao
    refuses ("Expected `mod` to be an instance of `torch.nn.Module`"); wrap such patterns in a module."""
    from torchao.quantization.pt2e.export_utils import WrapperModule

    utils, _ = quantizer_modules()
    original = utils._get_aten_graph_module_for_pattern
    if getattr(original, "_wraps_functions", False):
        return

    def wrapped(pattern: Any, *args: Any, **kwargs: Any) -> Any:
        return original(pattern if isinstance(pattern, nn.Module) else WrapperModule(pattern), *args, **kwargs)

    wrapped._wraps_functions = True  # type: ignore[attr-defined]
    utils._get_aten_graph_module_for_pattern = wrapped


@functools.cache
def _attention_quantizer_class() -> type:
    """litert-torch's PT2EQuantizer, plus what it leaves float in the hybrids' Mobile MQA blocks: the
    standalone BatchNorm before the attention (`batchnorm_as_depthwise`) and the attention matmuls and
    softmax (`annotate_attention`)."""
    _, litert = quantizer_modules()

    class AttentionPT2EQuantizer(litert.PT2EQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return batchnorm_as_depthwise(super().transform_for_annotation(model))

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            annotate_attention(model, self.global_config)
            return model

    return AttentionPT2EQuantizer


@dataclass
class QuantizedModel:
    """A calibrated PT2E model, plus what the manifest must say about how it was calibrated."""

    prepared: torch.fx.GraphModule
    recipe: Recipe
    calibration: dict[str, Any] = field(default_factory=dict)
    quantizer: Any = None
    @property
    def int16_sites(self) -> tuple[str, ...]:
        """Observers an int16 fallback widened; targets that cannot run int16 activations export
        `for_target(int16=False)`, the same model with those tensors left float."""
        fallback = self.calibration.get("fallback") or {}
        return tuple(fallback["sites"]) if fallback.get("precision_here") == "int16" else ()

    def for_target(self, int16: bool) -> "QuantizedModel":
        """The model a target deploys: this one, or (no int16 activations there) the int16 sites kept float."""
        if not self.int16_sites or int16:
            return self
        if not hasattr(self, "_float_variant"):
            from .quantizer_sites import remove_sites

            fallback = dict(self.calibration["fallback"], precision_here="float (this target has no int16 activations)")
            self._float_variant = QuantizedModel(remove_sites(self.prepared, self.int16_sites), self.recipe,
                                                 self.calibration | {"fallback": fallback}, self.quantizer)
        return self._float_variant

    def converted(self, fold_weights: bool = True) -> torch.fx.GraphModule:
        """The int8 graph (quantize/dequantize ops); `fold_weights` stores weights as int8 constants.

        convert_pt2e runs once per model and flavour (it takes tens of seconds on a QAT graph, whose conv-BN
        patterns it rewrites); every caller, the simulation and each target's exporter, gets its own copy."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        cache = self.__dict__.setdefault("_converted", {})
        if fold_weights not in cache:
            cache[fold_weights] = convert_pt2e(copy.deepcopy(self.prepared), fold_quantize=fold_weights)
        return copy.deepcopy(cache[fold_weights])

    def simulate(self, x: np.ndarray, batch_size: int = 64, semantics: Optional[Semantics] = None) -> np.ndarray:
        """Logits of the fake-quantized model in PyTorch: what a faithful runtime should reproduce (with
        `semantics`, what a runtime with that arithmetic should reproduce). Computed on the graph with its
        quantize/dequantize pairs fused (`fake_quant_fusion`): the same numbers, bit for bit, three times faster."""
        return self.simulator(semantics, batch_size)(x)

    def simulator(self, semantics: Optional[Semantics] = None,
                  batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
        """`simulate` as a function of the images, its graph built now, in the calling thread: the function only
        runs the graph (eager tensor ops), so it may run in another thread while this one exports."""
        gm = self._fused_simulation(semantics or EXACT)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return np.concatenate([gm(model_input(x[i:i + batch_size])).numpy()
                                       for i in range(0, len(x), batch_size)])

        return run

    def _fused_simulation(self, semantics: Semantics) -> torch.fx.GraphModule:
        from .fake_quant_fusion import fuse_fake_quantize

        fused = self.__dict__.setdefault("_fused", {})
        if semantics.key not in fused:
            fused[semantics.key] = fuse_fake_quantize(copy.deepcopy(self.simulation_module(semantics)))
        return fused[semantics.key]

    def simulation_module(self, semantics: Optional[Semantics] = None) -> torch.fx.GraphModule:
        """The converted graph the simulation runs: PyTorch's exact quantize/dequantize arithmetic, or that graph
        rewritten to a runtime's own arithmetic (`Semantics.rewrite`); built once per semantics."""
        semantics = semantics or EXACT
        sims = self.__dict__.setdefault("_simulations", {})
        if semantics.key not in sims:
            gm = self.converted(fold_weights=True)
            sims[semantics.key] = semantics.rewrite(gm) if semantics.rewrite is not None else gm
        return sims[semantics.key]


@contextlib.contextmanager
def _weight_observers_paused(prepared: torch.fx.GraphModule, paused: bool) -> Iterator[None]:
    """Weights do not change while calibrating: their observers see them on the first batch only (on the
    others they would find the same min and max again, after copying every weight tensor)."""
    if not paused:
        yield
        return
    from .quantizer_sites import find_sites

    observers = [getattr(prepared, s.name) for s in find_sites(prepared) if s.kind == "weight"]
    for obs in observers:
        obs.forward = _unchanged  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        for obs in observers:
            del obs.forward


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def quantize(
    model: nn.Module,
    calibration: LoadedImages,
    recipe: Recipe,
    calibration_source: str = "",
    quantizer: Any = None,
) -> QuantizedModel:
    """Post-training int8 quantization: export, insert observers, run the calibration images.

    `quantizer`: a PT2E quantizer a target brings (`Target.build_quantizer`); default: the shared one."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from . import ptq

    q = recipe.quantization
    example = torch.from_numpy(calibration.x[:2])
    start = time.perf_counter()
    # PTQ algorithms (mnv4_deploy/quantization/ptq/): an equalized float copy is what gets exported and quantized.
    float_model, algorithms = ptq.transform_float_model(model, calibration.x, q)
    quantizer = quantizer if quantizer is not None else build_quantizer(q)
    with stage("insert_observers", "inserting observers (torch.export + prepare_pt2e)"):
        prepared = prepare_pt2e(tag_adds(export_program(float_model, example).module()), quantizer)
    batches = list(calibration.batches(q.calibration.batch_size))
    with stage("calibrate", f"calibrating on {len(calibration)} images", total=len(batches), unit="batch") as bar, \
            torch.no_grad():
        for i, batch in enumerate(batches):
            with _weight_observers_paused(prepared, paused=i > 0):
                prepared(model_input(batch))
            bar.advance()
    info = {
        "method": "pt2e",
        "source": calibration_source,
        "images": len(calibration),
        "weights": f"int{q.weights.bits} {q.weights.granularity} symmetric",
        "activations": f"int{q.activations.bits} per_tensor affine, {q.activations.observer} observer",
        "seconds": round(time.perf_counter() - start, 2),
    }
    algorithms |= ptq.refine(prepared, model, calibration.x, q)
    if algorithms:
        info["algorithms"] = algorithms
        info["seconds"] = round(time.perf_counter() - start, 2)
    if q.fallback.max_layers > 0 or q.fallback.layers.strip():
        with stage("fallback", "choosing fallback sites"):
            prepared, info["fallback"] = _apply_fallback(prepared, model, calibration, q)
        info["seconds"] = round(time.perf_counter() - start, 2)
    return QuantizedModel(prepared, recipe, info, quantizer)


_SCALARS = (bool, int, float, str, torch.dtype)


def saved_state(quantized: QuantizedModel) -> dict[str, Any]:
    """What `restore` needs to give the same calibrated model again without calibrating: every parameter and
    buffer of the calibrated graph (equalized weights, corrected biases, observer statistics), the observers'
    plain attributes (an int16-widened range, a fitted KL threshold) and the calibration record."""
    attrs = {name: {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _SCALARS)}
             for name, m in quantized.prepared.named_modules()}
    state = quantized.prepared.state_dict()
    # the per-module versions: without them observers load as version 1 and reset their eps
    meta = {k: dict(v) for k, v in getattr(state, "_metadata", {}).items()}
    return {"state": {k: v.detach().clone() for k, v in state.items()}, "metadata": meta,
            "attributes": attrs, "calibration": copy.deepcopy(quantized.calibration)}


def restore(model: nn.Module, calibration: LoadedImages, recipe: Recipe, saved: dict[str, Any],
            quantizer: Any = None) -> QuantizedModel:
    """The calibrated model `saved_state` recorded, rebuilt in seconds: the same export and observer insertion
    as `quantize` (the graph, its node names and module paths), the recorded fallback sites applied, then the
    recorded state loaded (strict: any difference in structure raises)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from . import ptq
    from .quantizer_sites import remove_sites, widen_sites

    q = recipe.quantization
    example = torch.from_numpy(calibration.x[:2])
    float_model = ptq.float_model_structure(model, q)
    quantizer = quantizer if quantizer is not None else build_quantizer(q)
    with stage("insert_observers", "inserting observers (torch.export + prepare_pt2e)"):
        prepared = prepare_pt2e(tag_adds(export_program(float_model, example).module()), quantizer)
    info = copy.deepcopy(saved["calibration"])
    fallback = info.get("fallback")
    if fallback:
        widen = fallback["precision"] == "int16"
        prepared = widen_sites(prepared, fallback["sites"]) if widen else remove_sites(prepared, fallback["sites"])
    modules = dict(prepared.named_modules())
    if set(modules) != set(saved["attributes"]):
        raise ValueError("the calibrated graph's modules differ from the recorded ones")
    state = collections.OrderedDict(saved["state"])
    state._metadata = collections.OrderedDict(saved["metadata"])  # type: ignore[attr-defined]
    prepared.load_state_dict(state, strict=True)
    for name, attrs in saved["attributes"].items():
        for k, v in attrs.items():
            setattr(modules[name], k, v)
    return QuantizedModel(prepared, recipe, info, quantizer)


def _apply_fallback(prepared: torch.fx.GraphModule, model: nn.Module, calibration: LoadedImages,
                    q: Quantization) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Keep the most sensitive activations in float or int16, judged on the calibration images (never the
    held-back ones): the greedy choice stops at the recipe's agreement budget."""
    from ..verify.fidelity import torch_logits
    from . import sensitivity
    from .quantizer_sites import remove_sites, widen_sites

    x = calibration.x[:q.fallback.images]
    if q.fallback.layers.strip():
        chosen = sensitivity.given_fallback(prepared, x, torch_logits(model, x), q.fallback.layers)
    else:
        chosen = sensitivity.choose_fallback(prepared, x, torch_logits(model, x), q.fallback.target_agreement,
                                             q.fallback.max_layers)
    sites = chosen["float_sites"]
    precision = q.fallback.precision
    info = sensitivity.fallback_record(chosen, q.fallback.target_agreement, len(x), precision, precision)
    if precision == "int16":
        return widen_sites(prepared, sites), info
    return remove_sites(prepared, sites), info
