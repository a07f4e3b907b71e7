"""Per-layer sensitivity and float fallback on the shared PT2E model."""

import numpy as np
import pytest
import torch

from mnv4_deploy import load_model, prepare
from mnv4_deploy.config.recipes import parse_recipe
from mnv4_deploy.load.images import default_calibration
from mnv4_deploy.quantization.pt2e import quantize
from mnv4_deploy.quantization.quantizer_sites import SiteToggler, find_sites, remove_sites
from mnv4_deploy.quantization.sensitivity import analyse, choose_fallback
from mnv4_deploy.verify.fidelity import compare, torch_logits


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)  # the random weights: every test of this module sees the same draw, whatever runs first
    # 32x32: these tests check the site bookkeeping and the greedy search, not accuracy (random weights)
    loaded = load_model("mobilenetv4_conv_small_035", weights="random", preprocessing_overrides={"input_size": [32]})
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
                          "  fallback: {max_layers: 2, target_agreement: 1.0}\n")
    q = quantize(loaded.model, images, recipe)
    fallback = q.calibration["fallback"]
    assert fallback["precision"] == "float" and len(fallback["sites"]) == 2 and len(fallback["layers"]) == 2
    assert len(fallback["agreement_history"]) == 3 and q.int16_sites == ()
    assert q.for_target(int16=False) is q  # a float fallback is the same model everywhere


def test_fallback_stops_at_the_budget(calibrated):
    loaded, images, _ = calibrated
    recipe = parse_recipe("quantization:\n  calibration: {images: 32, batch_size: 16}\n"
                          "  fallback: {max_layers: 5, target_agreement: 0.0, precision: int16}\n")
    q = quantize(loaded.model, images, recipe)
    assert q.calibration["fallback"]["sites"] == [] and q.int16_sites == ()


def test_fallback_choice_meets_the_budget_it_reports(calibrated):
    """After the greedy pass and the pass that returns sites to int8, the kept set really has that agreement."""
    loaded, images, q = calibrated
    x = images.x[:16]
    reference = torch_logits(loaded.model, x)
    tog = SiteToggler(q.prepared)
    base = compare(tog.logits(x), reference).top1_agreement
    target = (base + 1.0) / 2
    chosen = choose_fallback(q.prepared, x, reference, target, max_sites=60)
    kept = chosen["float_sites"]
    tog.set_enabled(lambda n: n not in kept)
    reached = compare(tog.logits(x), reference).top1_agreement
    assert reached == chosen["agreement_history"][-1]
    if reached >= target:  # every site left is needed: returning any one to int8 breaks the budget
        for name in kept:
            tog.set_enabled(lambda n: n not in kept or n == name)
            assert compare(tog.logits(x), reference).top1_agreement < target, name


def test_int16_fallback_widens_the_chosen_sites(calibrated):
    loaded, images, _ = calibrated
    recipe = parse_recipe("quantization:\n  calibration: {images: 32, batch_size: 16}\n"
                          "  fallback: {max_layers: 3, target_agreement: 1.0, precision: int16}\n")
    q = quantize(loaded.model, images, recipe)
    assert len(q.int16_sites) == 3 and q.calibration["fallback"]["precision_here"] == "int16"
    dtypes = [n.args[-1] for n in q.converted().graph.nodes
              if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target)]
    widened = dtypes.count(torch.int16)  # a site read by two ops converts to two quantize nodes
    assert widened >= 3 and dtypes.count(torch.int8) > 20
    # Targets without int16 activations get the same model with those tensors float.
    as_float = q.for_target(int16=False)
    assert as_float is not q and as_float.calibration["fallback"]["precision_here"].startswith("float")
    float_dtypes = [n.args[-1] for n in as_float.converted().graph.nodes if n.op == "call_function"
                    and "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target)]
    assert torch.int16 not in float_dtypes and len(float_dtypes) < len(dtypes)
    x = images.x[:8]
    int16_logits, float_logits = q.simulate(x), as_float.simulate(x)
    cosine = (int16_logits * float_logits).sum(1) / np.linalg.norm(int16_logits, axis=1) / np.linalg.norm(float_logits, axis=1)
    # int16 is near float: what differs is the int8 sites' rounding, flipped downstream (random weights amplify it)
    assert cosine.mean() > 0.99 and cosine.min() > 0.97


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_int16_fallback_deploys_per_target(tmp_path, image_folder):
    """ONNX carries the int16 sites as int16 QDQ (opset 21); OpenVINO gets them float; both match their simulation."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    import json

    from mnv4_deploy.pipeline import ConvertSettings, convert

    recipe = tmp_path / "mixed.yaml"
    # The gate judges top-1 agreement on the 2 held-back images, which random weights make near-ties; this test
    # checks the stronger things itself (cosine and every tensor against the simulation).
    recipe.write_text("quantization:\n  calibration: {images: 16, batch_size: 8}\n"
                      "  fallback: {max_layers: 3, target_agreement: 1.0, precision: int16}\n"
                      "verification: {gate: false}\n")
    # Random weights from a fixed seed: on some draws OpenVINO mis-computes a residual add that has one float
    # and one int8 input (flagged by the tensor-by-tensor check; README, known limits), so the draw is pinned.
    torch.manual_seed(0)
    results = convert(ConvertSettings(
        model="mobilenetv4_conv_small_035", weights="random", preprocessing={"input_size": [32], "crop_pct": 1.0},
        out=tmp_path / "out", targets="onnx,openvino", precision="int8", calib=image_folder, recipe=str(recipe),
        latency_runs=2, progress=False))
    manifests = {r.target: json.loads(r.manifest_path.read_text()) for r in results}
    onnx, ov = manifests["onnx"], manifests["openvino"]
    assert onnx["quantization"]["fallback"]["precision_here"] == "int16"
    assert onnx["export"]["opset"] == 21 and onnx["structure"]["opset"] == 21
    import onnx as onnx_lib

    model = onnx_lib.load(str(tmp_path / "out" / "onnx" / "model.onnx"))
    zero_points = {i.name: i.data_type for i in model.graph.initializer}
    int16_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
               and zero_points.get(n.input[2]) == onnx_lib.TensorProto.INT16]
    assert len(int16_q) >= 3
    assert ov["quantization"]["fallback"]["precision_here"].startswith("float")
    for m in (onnx, ov):
        assert m["verification"]["held_back"]["vs_pytorch_simulation"]["cosine"] > 0.99, m["target"]
        tw = m["verification"]["tensorwise"]
        assert tw["status"] == "compared" and tw["flagged"] == 0 and tw["unmatched_pytorch"] == [], (m["target"], tw)


def test_full_integer_tflite_refuses_a_fallback(calibrated, tmp_path):
    """A fallback's float tensors cannot live in a full-integer model: one clear error before any conversion."""
    pytest.importorskip("litert_torch")
    from mnv4_deploy.errors import UserError
    from mnv4_deploy.targets import get_target
    from mnv4_deploy.targets.base import ExportRequest
    from mnv4_deploy.targets.tflite.target import TfliteOptions

    loaded, images, _ = calibrated
    recipe = parse_recipe("quantization:\n  calibration: {images: 32, batch_size: 16}\n"
                          "  fallback: {max_layers: 1, target_agreement: 1.0}\n")
    q = quantize(loaded.model, images, recipe)
    request = ExportRequest(loaded, "int8", TfliteOptions(io_dtype="int8"), q, images)
    with pytest.raises(UserError, match="keeps 1 activations float.*--io-dtype float"):
        get_target("tflite").export(request, tmp_path / "model.tflite")
    assert not (tmp_path / "model.tflite").exists()


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_inspect_sensitivity_with_a_budget(tmp_path, capsys):
    """The CLI prints the table and, for a budget, the activations a fallback needs; JSON carries both."""
    import json

    from mnv4_deploy.cli import main

    out = tmp_path / "sens.json"
    rc = main(["inspect", "--sensitivity", "--model", "mobilenetv4_conv_small_035", "--weights", "random",
               "--input-size", "32", "--images", "16", "--budget", "100%", "--json-out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "all quantizers on" in text and "budget 100.0% top-1 agreement" in text and "in a recipe:" in text
    result = json.loads(out.read_text())
    fallback = result["fallback"]
    assert fallback["budget_agreement"] == 1.0 and len(fallback["float_sites"]) <= fallback["activation_sites"]
    assert fallback["reached"] == (fallback["agreement_history"][-1] >= 1.0)
    assert len(result["sites"]) > 40
    assert main(["inspect", "--budget", "0.97"]) == 2  # a budget needs --sensitivity
    with pytest.raises(SystemExit):
        main(["inspect", "--sensitivity", "--model", "mobilenetv4_conv_small_035", "--budget", "1.5"])
