"""PTQ algorithms (mnv4_deploy/ptq/, observers.KLObserver): each one does what it claims, on a small MNv4."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mnv4_deploy import load_model, prepare
from mnv4_deploy.errors import UserError
from mnv4_deploy.quantize import quantize
from mnv4_deploy.recipes import parse_recipe
from mnv4_deploy.sensitivity import SiteToggler

SMALL = "quantization:\n  calibration: {images: 32, batch_size: 16}\n"


@pytest.fixture(scope="module")
def small(reference_checkpoint, tiny_imagenet):
    """The reference checkpoint (trained: random MNv4 weights give degenerate activations) and 32 train images."""
    from mnv4_deploy.data import load_images, scan_folder

    loaded = load_model("mobilenetv4_conv_small", str(reference_checkpoint), 202,
                        {"input_size": [64, 64], "crop_pct": 1.0})
    prepare(loaded.model)
    cal, _ = scan_folder(tiny_imagenet / "train").split(32, 1, seed=0)
    return loaded, load_images(cal, loaded.preprocessing)


@pytest.fixture(scope="module")
def calibrated(small):
    loaded, images = small
    return quantize(loaded.model, images, parse_recipe(SMALL))


def _out(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(x))


# --- recipes ---------------------------------------------------------------------------------------------

def test_recipe_ptq_keys_are_typed():
    r = parse_recipe("quantization:\n  activations: {observer: kl}\n  equalization: {method: activation, alpha: 0.6}\n"
                     "  adaround: {enabled: true, iterations: 10}\n  range_learning: {steps: 5}\n"
                     "  bias_correction: {enabled: true, images: 64}\n")
    q = r.quantization
    assert (q.activations.observer, q.equalization.method, q.equalization.alpha) == ("kl", "activation", 0.6)
    assert q.adaround.enabled and q.adaround.iterations == 10 and q.range_learning.steps == 5
    assert q.bias_correction.enabled and q.bias_correction.images == 64


@pytest.mark.parametrize("text, message", [
    ("quantization:\n  equalization: {method: smoothquant}\n", "<t>:2: 'quantization.equalization.method' must be one of"),
    ("quantization:\n  adaround:\n    iteration: 5\n", "<t>:3: unknown key 'quantization.adaround.iteration'"),
    ("quantization:\n  bias_correction: {enabled: 3}\n", "<t>:2: 'quantization.bias_correction.enabled' must be bool"),
])
def test_recipe_ptq_mistakes_name_file_and_line(text, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("'", "'")):
        parse_recipe(text, "<t>")


# --- KL observer -----------------------------------------------------------------------------------------

def _observer(cls, **kw):
    return cls(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine, eps=2**-12, **kw)


def test_kl_observer_clips_a_heavy_tail_but_not_a_compact_tensor():
    from mnv4_deploy.observers import KLObserver

    g = torch.Generator().manual_seed(0)
    heavy = torch.relu(torch.randn(64, 64, 8, 8, generator=g))
    heavy.view(-1)[:20] = 200.0  # rare, extreme values
    obs = _observer(KLObserver)
    obs(heavy)
    scale, zp = obs.calculate_qparams()
    assert int(zp) == -128  # non-negative tensor: all 256 levels on [0, T]
    assert 2.0 < float(obs.max_val) < 50.0  # clipped far below the outliers, but keeps the bulk (max ~5)
    compact = torch.rand(64, 64, 8, 8, generator=g) * 2 - 1
    obs = _observer(KLObserver)
    obs(compact)
    obs.calculate_qparams()
    assert float(obs.max_val) > 0.9 and float(obs.min_val) < -0.9  # uniform data: nothing worth clipping


# --- equalization ----------------------------------------------------------------------------------------

def test_cle_keeps_float_outputs_and_equalizes_weight_ranges(small):
    from mnv4_deploy.ptq.equalize import _first_range, _second_range, equalize, find_pairs, fold_batchnorm

    loaded, images = small
    x = images.x[:8]
    ref = _out(loaded.model, x)
    folded = fold_batchnorm(copy.deepcopy(loaded.model))
    before = [float((_first_range(p) / _second_range(p)).log().abs().mean()) for p in find_pairs(folded)]
    eq, info = equalize(loaded.model, "cle", images.x, iterations=4)
    out = _out(eq, x)
    assert info["pairs"] >= 10
    assert float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    after = [float((_first_range(p) / _second_range(p)).log().abs().mean()) for p in find_pairs(eq)]
    assert np.mean(after) < 0.1 * np.mean(before)


def test_activation_equalization_keeps_float_outputs_and_flattens_channel_ranges(small):
    from mnv4_deploy.ptq.equalize import activation_ranges, equalize, find_pairs, fold_batchnorm

    loaded, images = small
    x = images.x[:8]
    ref = _out(loaded.model, x)
    eq, _ = equalize(loaded.model, "activation", images.x, alpha=0.5)
    out = _out(eq, x)
    assert float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))

    def spread(model):  # over depthwise pairs (fully equalized): max/median of per-channel ranges
        pairs = find_pairs(model)
        rs = activation_ranges(model, pairs, images.x)
        return np.median([float(r.max() / r.median().clamp_min(1e-6)) for p, r in zip(pairs, rs) if p.depthwise])

    assert spread(eq) < 0.5 * spread(fold_batchnorm(copy.deepcopy(loaded.model)))


def test_recipe_equalization_is_what_gets_quantized(small):
    loaded, images = small
    q = quantize(loaded.model, images, parse_recipe(SMALL + "  equalization: {method: cle}\n"))
    assert q.calibration["algorithms"]["equalization"]["pairs"] >= 10
    # the float model itself is not modified
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())


# --- bias correction -------------------------------------------------------------------------------------

def _mean_channel_shift(prepared, reference, x: np.ndarray) -> float:
    """Mean |per-channel output shift| of the quantized graph's convs against the float (reference) graph."""
    from mnv4_deploy.ptq.bias_correction import robust_shift
    from mnv4_deploy.ptq.graph import lockstep

    shifts = []
    lockstep(SiteToggler(prepared), torch.from_numpy(x),
             lambda layer, of, oq, args, ctx: shifts.append(float(robust_shift(oq, of).abs().mean())),
             SiteToggler(reference))
    return float(np.mean(shifts))


def test_bias_correction_reduces_per_channel_mean_error(small, calibrated):
    from mnv4_deploy.ptq.bias_correction import bias_correct

    _, images = small
    prepared = copy.deepcopy(calibrated.prepared)
    before = _mean_channel_shift(prepared, calibrated.prepared, images.x)
    info = bias_correct(prepared, images.x)
    after = _mean_channel_shift(prepared, calibrated.prepared, images.x)
    assert info["layers"] > 10
    assert after < 0.5 * before


# --- AdaRound --------------------------------------------------------------------------------------------

def _exported_int8_weights(q) -> list[torch.Tensor]:
    """The int8 weight constants of the converted graph, in conv/linear order."""
    from mnv4_deploy.ptq.graph import LAYER_OPS, get_attr

    gm = q.converted(fold_weights=True)
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LAYER_OPS:
            w = node.args[1]
            while w.op == "call_function":  # dequantize <- int8 constant
                w = w.args[0]
            t = get_attr(gm, w.target)
            if t.dtype == torch.int8:
                out.append(t)
    return out


def test_adaround_exported_int8_weights_are_the_optimised_ones(small, calibrated):
    from mnv4_deploy.ptq.adaround import adaround, int8_weights
    from mnv4_deploy.quantize import QuantizedModel

    _, images = small
    nearest = list(int8_weights(calibrated.prepared).values())
    prepared = copy.deepcopy(calibrated.prepared)
    stats = adaround(prepared, images.x[:8], iterations=6, batch_size=4)
    chosen = list(int8_weights(prepared).values())
    assert stats["layers"] == len(chosen) and stats["flipped"] > 0
    assert sum(int((a != b).sum()) for a, b in zip(chosen, nearest)) == stats["flipped"]
    exported = _exported_int8_weights(QuantizedModel(prepared, calibrated.recipe))
    assert len(exported) == len(chosen)
    for e, c in zip(exported, chosen):
        assert torch.equal(e, c)


# --- range learning --------------------------------------------------------------------------------------

def test_range_learning_scales_reach_the_converted_graph(small, calibrated):
    from mnv4_deploy.ptq.range_learning import learn_ranges, set_observer_qparams
    from mnv4_deploy.sensitivity import find_sites
    from mnv4_deploy.verify import torch_logits

    loaded, images = small
    prepared = copy.deepcopy(calibrated.prepared)
    x = images.x[:16]
    before = {s.name: float(getattr(prepared, s.name).calculate_qparams()[0]) for s in find_sites(prepared)
              if s.kind == "activation"}
    info = learn_ranges(prepared, x, torch_logits(loaded.model, x), steps=3, lr=0.05, batch_size=8)
    after = {n: float(getattr(prepared, n).calculate_qparams()[0]) for n in before}
    assert info["activations"] == len(before)
    assert sum(abs(after[n] / before[n] - 1) > 1e-3 for n in before) > len(before) // 2
    obs = copy.deepcopy(getattr(prepared, next(iter(before))))
    set_observer_qparams(obs, 0.0123, -7)
    scale, zp = obs.calculate_qparams()
    assert abs(float(scale) - 0.0123) < 1e-7 and int(zp) == -7
