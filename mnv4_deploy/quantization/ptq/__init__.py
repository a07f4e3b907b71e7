"""Post-training quantization algorithms, each selected by a recipe key under `quantization:`.

Each module holds its algorithm and the frozen dataclass of its recipe section (config/recipes.py assembles them
into `Quantization`):

| module (section class) | recipe key | what it fixes |
|---|---|---|
| `equalize` (`Equalization`) | `equalization: {method: cle / activation, alpha}` | channel ranges across conv pairs (float model, before export) |
| `adaround` (`AdaRound`) | `adaround: {enabled: true, iterations, images}` | weight rounding, layer by layer |
| `range_learning` (`RangeLearning`) | `range_learning: {steps, lr, batch_size}` | activation scales, against the float logits |
| `bias_correction` (`BiasCorrection`) | `bias_correction: {enabled: true, images, pixels}` | per-channel mean output shift of each conv |

(`observer: kl`, the entropy activation observer, lives with the other observers in quantization/observers.py.)
`quantize()` runs them in the order of that table, around calibration; each returns a small dict for the manifest.
All of them use calibration images only.
"""
from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from torch import fx, nn

from ...infra.stages import stage

if TYPE_CHECKING:  # annotations only: config.recipes imports this package's section classes
    from ...config.recipes import Quantization


def transform_float_model(model: nn.Module, x: np.ndarray, q: Quantization) -> tuple[nn.Module, dict[str, Any]]:
    """The float model the quantizer should see (a copy with layer scales folded and channels equalized, or the
    model itself) and what was done."""
    from ...preparation.layer_scale import fold_layer_scales

    model, folded = fold_layer_scales(model)
    done: dict[str, Any] = {"layer_scale_folding": {"folded": folded}} if folded else {}
    if q.equalization.method == "none":
        return model, done
    from .equalize import equalize

    with stage("equalization", f"equalizing ({q.equalization.method})"):
        start = time.perf_counter()
        out, info = equalize(model, q.equalization.method, x, q.equalization.alpha, q.equalization.iterations)
    return out, done | {"equalization": info | {"seconds": round(time.perf_counter() - start, 2)}}


def float_model_structure(model: nn.Module, q: Quantization) -> nn.Module:
    """A model with the structure `transform_float_model` gives (layer scales folded; BatchNorm folded where it
    equalizes), without computing anything from images: what `pt2e.restore` exports before loading the
    calibrated state."""
    from ...preparation.layer_scale import fold_layer_scales

    model, _ = fold_layer_scales(model)
    if q.equalization.method == "none":
        return model
    from .equalize import fold_batchnorm

    return fold_batchnorm(copy.deepcopy(model))


def refine(prepared: fx.GraphModule, float_model: nn.Module, x: np.ndarray, q: Quantization) -> dict[str, Any]:
    """Run the enabled graph-level algorithms on the calibrated graph, in place; their reports by name."""
    info: dict[str, Any] = {}
    # The float reference for layer-wise algorithms: AdaRound and bias correction edit weights and biases in
    # place, after which the graph with its quantizers off is no longer the float model.
    reference = copy.deepcopy(prepared) if q.adaround.enabled or q.bias_correction.enabled else None
    if q.adaround.enabled:
        from .adaround import adaround

        info["adaround"] = _timed("adaround", lambda: adaround(prepared, x[:q.adaround.images], q.adaround.iterations,
                                                   q.adaround.batch_size, reference=reference))
    if q.range_learning.steps > 0:
        from ...verify.fidelity import torch_logits
        from .range_learning import learn_ranges

        info["range_learning"] = _timed("range learning", lambda: learn_ranges(
            prepared, x, torch_logits(float_model, x), q.range_learning.steps, q.range_learning.lr,
            q.range_learning.batch_size))
    if q.bias_correction.enabled:
        from .bias_correction import bias_correct

        images = q.bias_correction.images_for(*x.shape[-2:])
        info["bias_correction"] = _timed("bias correction", lambda: bias_correct(prepared, x[:images], reference))
    return info


def _timed(name: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one algorithm as a stage; its report with the seconds it took (the manifest shows what each costs)."""
    start = time.perf_counter()
    with stage(name.replace(" ", "_"), name):
        report = step()
    return report | {"seconds": round(time.perf_counter() - start, 2)}


__all__ = ["transform_float_model", "float_model_structure", "refine"]
