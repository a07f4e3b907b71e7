"""Per-layer sensitivity and float fallback on the shared PT2E model."""

import pytest
import torch

from mnv4_deploy import load_model, prepare
from mnv4_deploy.data import default_calibration
from mnv4_deploy.quantize import quantize
from mnv4_deploy.recipes import parse_recipe
from mnv4_deploy.sensitivity import analyse, find_sites, remove_sites
from mnv4_deploy.verify import torch_logits


@pytest.fixture(scope="module")
def calibrated():
    loaded = load_model("mobilenetv4_conv_small_035", weights="random", preprocessing_overrides={"input_size": [64]})
    prepare(loaded.model)
    images, _ = default_calibration(loaded.preprocessing, n=32)
    recipe = parse_recipe("quantization:\n  calibration: {images: 32, batch_size: 16}\n")
    return loaded, images, quantize(loaded.model, images, recipe)


def _count_quantize_ops(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "quantize_per" in str(n.target)
               and "dequantize" not in str(n.target))


def test_sites_cover_weights_and_activations(calibrated):
    _, _, q = calibrated
    kinds = {s.kind for s in find_sites(q.prepared)}
    assert kinds == {"weight", "activation"}


def test_analyse_ranks_every_site(calibrated):
    loaded, images, q = calibrated
    x = images.x[:8]
    result = analyse(q.prepared, x, torch_logits(loaded.model, x))
    sqnrs = [r["only_this_sqnr_db"] for r in result["sites"]]
    assert len(sqnrs) == len(find_sites(q.prepared)) and sqnrs == sorted(sqnrs)
    # One quantizer alone perturbs the logits less than all of them together.
    assert min(sqnrs) > result["all_quantized"]["sqnr_db"]


def test_removed_sites_stay_float_after_conversion(calibrated):
    _, _, q = calibrated
    acts = [s.name for s in find_sites(q.prepared) if s.kind == "activation"][:3]
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    import copy

    before = _count_quantize_ops(convert_pt2e(copy.deepcopy(q.prepared), fold_quantize=False))
    after = _count_quantize_ops(convert_pt2e(remove_sites(q.prepared, acts), fold_quantize=False))
    assert after < before


def test_recipe_fallback_records_float_layers(calibrated):
    loaded, images, _ = calibrated
    recipe = parse_recipe("quantization:\n  calibration: {images: 32, batch_size: 16}\n"
                          "  fallback: {max_layers: 2, target_agreement: 1.01}\n")
    q = quantize(loaded.model, images, recipe)
    assert len(q.calibration["fallback"]["float_sites"]) == 2
    assert len(q.calibration["fallback"]["float_layers"]) == 2
