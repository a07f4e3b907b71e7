"""PTQ algorithms (mnv4_deploy/quantization/ptq/, observers.KLObserver): each one does what it claims, on a small MNv4."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from mnv4_deploy import load_model, prepare
from mnv4_deploy.config.recipes import parse_recipe
from mnv4_deploy.errors import UserError
from mnv4_deploy.quantization.pt2e import quantize
from mnv4_deploy.quantization.quantizer_sites import SiteToggler

SMALL = "quantization:\n  calibration: {images: 32, batch_size: 16}\n"


@pytest.fixture(scope="module")
def train_split(tiny_imagenet):
    """32 train images to calibrate and fit on, and 32 others to judge on (held out from every algorithm)."""
    from mnv4_deploy.load.images import scan_folder

    return scan_folder(tiny_imagenet / "train").split(32, 32, seed=0)


@pytest.fixture(scope="module")
def small(reference_checkpoint, train_split):
    """The reference checkpoint (trained: random MNv4 weights give degenerate activations) and 32 train images."""
    from mnv4_deploy.load.images import load_images

    loaded = load_model("mobilenetv4_conv_small", str(reference_checkpoint), 202,
                        {"input_size": [64, 64], "crop_pct": 1.0})
    prepare(loaded.model)
    return loaded, load_images(train_split[0], loaded.preprocessing)


@pytest.fixture(scope="module")
def held_out(small, train_split) -> np.ndarray:
    from mnv4_deploy.load.images import load_images

    return load_images(train_split[1], small[0].preprocessing).x


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
    from mnv4_deploy.quantization.observers import KLObserver

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
    from mnv4_deploy.quantization.ptq.equalize import _first_range, _second_range, equalize, find_pairs, fold_batchnorm

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
    from mnv4_deploy.quantization.ptq.equalize import activation_ranges, equalize, find_pairs, fold_batchnorm

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


# --- layer output error on held-out images ---------------------------------------------------------------

def _layer_errors(prepared, float_graph, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per conv/linear of the fake-quantized graph, against the float graph on the same images:
    (output MSE relative to the float output's power, mean |per-channel mean error|)."""
    from mnv4_deploy.quantization.ptq.lockstep import lockstep

    errors = {}

    def measure(layer, out_f, out_q, args, ctx):
        diff = out_q - out_f
        channel_mean = diff.flatten(2).mean(2).mean(0) if diff.dim() > 2 else diff.mean(0)
        errors[layer.name] = (float(diff.pow(2).mean() / out_f.pow(2).mean()), float(channel_mean.abs().mean()))

    lockstep(SiteToggler(prepared), torch.from_numpy(x), measure, SiteToggler(float_graph))
    return errors


# --- bias correction -------------------------------------------------------------------------------------

def test_bias_correction_lowers_per_channel_mean_error_on_held_out_images(small, calibrated, held_out):
    """Corrected on 32 images, judged on 32 others: the convs' mean output shift per channel drops."""
    from mnv4_deploy.quantization.ptq.bias_correction import bias_correct

    _, images = small
    prepared = copy.deepcopy(calibrated.prepared)
    info = bias_correct(prepared, images.x)
    before = _layer_errors(calibrated.prepared, calibrated.prepared, held_out)
    after = _layer_errors(prepared, calibrated.prepared, held_out)
    shift_before = np.mean([e[1] for e in before.values()])
    shift_after = np.mean([e[1] for e in after.values()])
    assert info["layers"] == len(after) > 40
    # measured: 0.0145 -> 0.0111 (46 of 47 convs lower)
    assert shift_after < 0.85 * shift_before
    assert sum(after[n][1] < before[n][1] for n in before) >= 0.8 * len(before)


# --- AdaRound --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adarounded(small, calibrated):
    """The calibrated graph after AdaRound on the 32 calibration images (30 iterations a layer), and its report."""
    from mnv4_deploy.quantization.ptq.adaround import adaround

    _, images = small
    prepared = copy.deepcopy(calibrated.prepared)
    stats = adaround(prepared, images.x, iterations=30, batch_size=8)
    return prepared, stats


def test_adaround_lowers_layer_reconstruction_error_on_held_out_images(calibrated, adarounded, held_out):
    """Against round-to-nearest on the same layers, on images AdaRound never saw: lower output MSE vs float."""
    prepared, stats = adarounded
    nearest = _layer_errors(calibrated.prepared, calibrated.prepared, held_out)
    rounded = _layer_errors(prepared, calibrated.prepared, held_out)
    first = next(iter(nearest))  # the stem conv: the same (image) input either way, only the rounding differs
    mse_nearest = np.mean([e[0] for e in nearest.values()])
    mse_rounded = np.mean([e[0] for e in rounded.values()])
    assert stats["layers"] == len(rounded) > 40 and stats["flipped"] > 0
    # measured: relative MSE 0.0108 -> 0.0097 over 47 layers (all lower); stem conv 3.3e-5 -> 2.7e-5
    assert mse_rounded < 0.95 * mse_nearest
    assert rounded[first][0] < 0.9 * nearest[first][0]
    assert sum(rounded[n][0] < nearest[n][0] for n in nearest) >= 0.9 * len(nearest)


def _exported_int8_weights(q) -> list[torch.Tensor]:
    """The int8 weight constants of the converted graph, in conv/linear order."""
    from mnv4_deploy.quantization.ptq.lockstep import LAYER_OPS, get_attr

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


def test_adaround_exported_int8_weights_are_the_optimised_ones(calibrated, adarounded):
    from mnv4_deploy.quantization.pt2e import QuantizedModel
    from mnv4_deploy.quantization.ptq.adaround import int8_weights

    prepared, stats = adarounded
    nearest = list(int8_weights(calibrated.prepared).values())
    chosen = list(int8_weights(prepared).values())
    assert sum(int((a != b).sum()) for a, b in zip(chosen, nearest)) == stats["flipped"]
    exported = _exported_int8_weights(QuantizedModel(prepared, calibrated.recipe))
    assert len(exported) == len(chosen)
    for e, c in zip(exported, chosen):
        assert torch.equal(e, c)


# --- range learning --------------------------------------------------------------------------------------

def test_range_learning_scales_reach_the_converted_graph(small, calibrated):
    from mnv4_deploy.quantization.ptq.range_learning import learn_ranges, set_observer_qparams
    from mnv4_deploy.quantization.quantizer_sites import find_sites
    from mnv4_deploy.verify.fidelity import torch_logits

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


def test_fused_simulation_is_bit_exact(calibrated, held_out):
    """QuantizedModel.simulate runs the quantize/dequantize pairs fused (one kernel each); its logits must equal
    the decomposed graph's bit for bit (the pooled (N, C, 1, 1) tensor before the head included, whose memory
    layout once made the head conv round differently)."""
    from mnv4_deploy.quantization.fake_quant_fusion import fake_quantize

    fast = calibrated.simulate(held_out, batch_size=16)
    gm = calibrated.simulation_module()
    with torch.no_grad():
        exact = np.concatenate([gm(torch.from_numpy(held_out[i:i + 16])).numpy() for i in range(0, len(held_out), 16)])
    assert np.array_equal(fast, exact)
    fused = [n for n in calibrated._fused["exact"].graph.nodes if n.target is fake_quantize]
    assert len(fused) >= 50


def test_fusion_leaves_scales_whose_reciprocal_rounds_twice():
    from mnv4_deploy.quantization.fake_quant_fusion import same_reciprocal

    assert same_reciprocal(float(np.float32(0.02)))
    assert not same_reciprocal(0.013)  # not a float32 scale: the decomposed op would see another number
    # scales where float32(1/s in double) and 1/s in float32 differ exist; they are rare
    rng = np.random.default_rng(0)
    scales = rng.uniform(1e-4, 1.0, 200_000).astype(np.float32)
    differ = sum(not same_reciprocal(float(s)) for s in scales)
    assert differ < 200


# --- the fused quantize-dequantize: FBGEMM's kernels where they give the fake-quantize kernel's numbers ----------

_FAKE_QUANT_RANGES = [(-128, 127), (0, 255)]


@given(scale=st.floats(2.0 ** -14, 64.0, allow_nan=False, allow_infinity=False).map(lambda s: float(np.float32(s))),
       zero=st.integers(-128, 255), span=st.sampled_from(_FAKE_QUANT_RANGES), seed=st.integers(0, 2 ** 31 - 1),
       magnitude=st.floats(0.5, 1e12), specials=st.lists(st.sampled_from(
           [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 3.4e38]), max_size=3))
@hyp_settings(max_examples=120, deadline=None)
def test_quantize_dequantize_is_the_fake_quantize_kernel_bit_for_bit(scale, zero, span, seed, magnitude, specials):
    """quantize_dequantize (FBGEMM's quantize/dequantize when every value is in range) must equal
    torch.fake_quantize_per_tensor_affine exactly: on random values, exact half-way points (round half to even),
    values far outside the int8 range, and inf/NaN (which take the fake-quantize kernel)."""
    from mnv4_deploy.quantization.fake_quant_fusion import quantize_dequantize

    lo, hi = span
    zero = min(max(zero, lo), hi)
    g = torch.Generator().manual_seed(seed)
    ties = (torch.randint(-400, 400, (2000,), generator=g).float() + 0.5) * scale
    x = torch.cat([torch.randn(3000, generator=g) * scale * magnitude ** 0.5, ties, torch.tensor(specials)])
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)
    got = quantize_dequantize(x, scale, zero, lo, hi)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])


def test_quantize_dequantize_keeps_the_gradient_path():
    """With a gradient wanted (QAT), the fake-quantize kernel runs (FBGEMM's quantized tensors have no autograd)."""
    from mnv4_deploy.quantization.fake_quant_fusion import quantize_dequantize

    x = torch.randn(64, requires_grad=True)
    quantize_dequantize(x, 0.05, 0, -128, 127).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_background_simulation_equals_the_simulation(calibrated, held_out):
    """The pipeline's simulation, computed in a background thread while a target exports, gives the logits
    QuantizedModel.simulate gives, bit for bit; a subset of the images (an emulator) is computed on request."""
    from mnv4_deploy.quantization.simulation_semantics import EXACT
    from mnv4_deploy.verify.simulations import Simulations

    sims = Simulations(batch=16)
    try:
        sims.start(calibrated, EXACT, held_out)
        reference = sims.reference(calibrated, EXACT)
        assert np.array_equal(reference(held_out), calibrated.simulate(held_out, 16))
        assert np.array_equal(reference(held_out[:5]), calibrated.simulate(held_out[:5], 16))
    finally:
        sims.close()


def test_closing_stops_a_background_simulation_at_its_next_batch(calibrated, held_out):
    """An interrupted convert closes its simulations: the background computation stops after the batch it is
    running instead of simulating every remaining image."""
    import concurrent.futures
    import threading

    from mnv4_deploy.quantization.simulation_semantics import EXACT
    from mnv4_deploy.verify.simulations import Simulations

    batches: list[int] = []
    started, release = threading.Event(), threading.Event()

    class Counting:
        def simulator(self, semantics, batch_size):
            run = calibrated.simulator(semantics, batch_size)

            def counted(x):
                batches.append(len(x))
                started.set()
                release.wait(10)
                return run(x)
            return counted

    sims = Simulations(batch=4)
    model = Counting()
    sims.start(model, EXACT, held_out)
    assert started.wait(10)
    sims.close()
    release.set()
    future = sims._results[sims._key(model, EXACT, held_out)]
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=10)
    assert len(batches) == 1 and len(held_out) > 4
