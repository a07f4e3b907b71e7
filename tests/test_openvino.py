"""OpenVINO target, checked in the real OpenVINO CPU runtime (no mocks).

Small models at 64x64 keep conversions to seconds; int8 accuracy is judged on the trained reference checkpoint
(random weights give degenerate logits), with a few hundred images so the file stays fast on 2 cores.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from mnv4_deploy.config.recipes import load_recipe, parse_recipe  # noqa: E402
from mnv4_deploy.errors import UserError  # noqa: E402
from mnv4_deploy.infra.fileio import atomic_path  # noqa: E402
from mnv4_deploy.targets import ExportRequest, check_recipe_targets, get_target  # noqa: E402
from mnv4_deploy.targets.openvino.target import OpenVinoOptions, OpenVinoRunner  # noqa: E402
from mnv4_deploy.verify.fidelity import compare, torch_logits  # noqa: E402

from .conftest import prepared_model  # noqa: E402


def _load(name: str, weights: str = "random", num_classes: int = 202):
    return prepared_model(name, weights, num_classes, 64)


def _export(request: ExportRequest, out: Path) -> tuple[Path, OpenVinoRunner, dict]:
    """Export through the same atomic path the pipeline uses; return the artifact, its runner and description."""
    target = get_target("openvino")
    final = out / target.artifact_name
    with atomic_path(final) as tmp:
        info = target.export(request, tmp)
    runner = target.load(final, request)
    return final, runner, {"export": info, **target.describe(final, request)}


@pytest.fixture(scope="module")
def small():
    return _load("mobilenetv4_conv_small_035")


@pytest.fixture(scope="module")
def reference(reference_checkpoint: Path, tiny_imagenet: Path):
    """The trained conv_small, 64 calibration images, 200 labelled val images, and its shared PT2E model."""
    from mnv4_deploy.load.images import load_images, scan_folder
    from mnv4_deploy.quantization.pt2e import quantize

    loaded = _load("mobilenetv4_conv_small", str(reference_checkpoint))
    pre = loaded.preprocessing
    cal = load_images(scan_folder(tiny_imagenet / "train").sample(64, seed=1), pre)
    val = load_images(scan_folder(tiny_imagenet / "val").sample(200, seed=0), pre)
    recipe = load_recipe(None)
    quantized = quantize(loaded.model, cal, recipe, "test")
    return loaded, cal, val, torch_logits(loaded.model, val.x), quantized


def test_options_from_recipe_and_mistakes():
    recipe = check_recipe_targets(parse_recipe("targets:\n  openvino:\n    method: nncf\n    preset: mixed\n"
                                               "    ignored_scopes: [a, b]\n    smooth_quant_alpha: 0.5\n"))
    opts = recipe.targets["openvino"]
    assert (opts.method, opts.preset, opts.ignored_scopes, opts.smooth_quant_alpha) == ("nncf", "mixed", ("a", "b"), 0.5)
    with pytest.raises(UserError, match="did you mean: performance"):
        check_recipe_targets(parse_recipe("targets:\n  openvino:\n    method: nncf\n    preset: performanc\n"))
    with pytest.raises(UserError, match="method: nncf"):
        OpenVinoOptions(preset="mixed")  # an NNCF option with the pt2e method does nothing: say so
    with pytest.raises(UserError, match="smooth_quant_alpha"):
        OpenVinoOptions(method="nncf", smooth_quant_alpha=1.5)
    assert OpenVinoOptions(threads=2, performance_hint="throughput").compile_config() == {
        "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_fp32_and_fp16_ir_structure(small, tmp_path: Path):
    """The IR's files, runtime precisions and fp16 weight compression (numbers: test_target_conformance.py)."""
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    path, runner, desc = _export(ExportRequest(small, "fp32", OpenVinoOptions()), tmp_path / "fp32")
    assert sorted(p.name for p in path.iterdir()) == ["model.bin", "model.xml"]
    assert runner(x).shape == (8, 202)  # a dynamic batch
    runtime = desc["runtime"]
    assert runtime["inference_precision"].endswith("float32'>") or "f32" in runtime["inference_precision"]
    assert set(runtime["layers_per_precision"]) == {"f32"}
    assert desc["fake_quantize"] == 0 and desc["inputs"][0]["shape"] == "[?,3,64,64]"

    path16, _, _ = _export(ExportRequest(small, "fp16", OpenVinoOptions()), tmp_path / "fp16")
    assert (path16 / "model.bin").stat().st_size < 0.6 * (path / "model.bin").stat().st_size


def test_bad_ignored_scope_lists_near_matches(small, tmp_path: Path):
    from mnv4_deploy.load.images import LoadedImages

    calib = LoadedImages(np.zeros((2, 3, 64, 64), np.float32), None)
    opts = OpenVinoOptions(method="nncf", ignored_scopes=("blocks.1.0.conv", "blocks.2.0.pw_exp.cnv"))
    with pytest.raises(UserError) as err:
        _export(ExportRequest(small, "int8", opts, calibration=calib), tmp_path)
    msg = str(err.value)
    assert "'blocks.2.0.pw_exp.cnv'" in msg and "did you mean: blocks.2.0.pw_exp.conv" in msg
    assert "\n" not in msg and not (tmp_path / "model").exists()  # nothing half-written


def test_int8_pt2e_on_reference(reference, tmp_path: Path):
    loaded, cal, val, float_logits, quantized = reference
    _, runner, desc = _export(ExportRequest(loaded, "int8", OpenVinoOptions(), quantized, cal), tmp_path)
    out = runner(val.x)
    vs_float = compare(out, float_logits, val.labels)
    vs_sim = compare(out, quantized.simulate(val.x))
    assert desc["fake_quantize"] > 50
    runtime = desc["runtime"]
    assert runtime["compute_layers"] >= 40 and runtime["compute_layers_not_int8"] == []
    assert vs_float.cosine > 0.97 and vs_float.top1_agreement > 0.7, vs_float
    assert vs_sim.cosine > 0.95, vs_sim
    assert abs(vs_float.top1 - vs_float.reference_top1) < 0.06, vs_float


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_int8_nncf_on_reference_keeps_ignored_layer_in_float(reference, tmp_path: Path):
    loaded, cal, val, float_logits, _ = reference
    keep = "blocks.1.0.conv"  # a PyTorch module path: its convolution stays in float
    # Fast bias correction keeps the test quick; the recipe default (full BiasCorrection) is exercised by the bench.
    opts = OpenVinoOptions(method="nncf", ignored_scopes=(keep,), fast_bias_correction=True)
    _, runner, desc = _export(ExportRequest(loaded, "int8", opts, None, cal), tmp_path)
    assert desc["export"]["method"] == "nncf.quantize"
    vs_float = compare(runner(val.x), float_logits, val.labels)
    assert vs_float.cosine > 0.97 and vs_float.top1_agreement > 0.7, vs_float
    assert abs(vs_float.top1 - vs_float.reference_top1) < 0.06, vs_float
    left = desc["runtime"]["compute_layers_not_int8"]
    assert [layer["precision"] for layer in left] == ["f32"] and left[0]["name"].startswith("blocks.1.0.conv/")


@pytest.mark.slow
def test_hybrid_medium_fp32_converts_and_runs(tmp_path: Path):
    loaded = _load("mobilenetv4_hybrid_medium", num_classes=10)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    _, runner, desc = _export(ExportRequest(loaded, "fp32", OpenVinoOptions()), tmp_path)
    out = runner(x)
    assert out.shape == (2, 10) and np.isfinite(out).all()
    assert desc["operators"].get("MatMul", 0) >= 2  # Mobile MQA attention survived conversion
    ref = torch_logits(loaded.model, x)
    np.testing.assert_allclose(out, ref, atol=1e-3 * max(np.abs(ref).max(), 1e-6))


@pytest.mark.slow
@pytest.mark.parametrize("method,smooth_quant_alpha", [("pt2e", -1.0), ("nncf", -1.0), ("nncf", 0.5)])
def test_hybrid_medium_int8_converts_and_runs(method: str, smooth_quant_alpha: float, tmp_path: Path):
    from mnv4_deploy.load.images import default_calibration
    from mnv4_deploy.quantization.pt2e import quantize

    loaded = _load("mobilenetv4_hybrid_medium", num_classes=10)
    cal, _ = default_calibration(loaded.preprocessing, 16)
    quantized = quantize(loaded.model, cal, load_recipe(None)) if method == "pt2e" else None
    opts = OpenVinoOptions(method=method, smooth_quant_alpha=smooth_quant_alpha)
    _, runner, desc = _export(ExportRequest(loaded, "int8", opts, quantized, cal), tmp_path)
    out = runner(cal.x[:4])
    assert out.shape == (4, 10) and np.isfinite(out).all()
    if smooth_quant_alpha >= 0:
        assert desc["export"]["nncf"]["smooth_quant_alpha"] == smooth_quant_alpha
    assert desc["fake_quantize"] > 0 and desc["runtime"]["layers_per_precision"].get("u8", 0) + \
        desc["runtime"]["layers_per_precision"].get("i8", 0) > 0


@pytest.mark.slow
def test_nncf_accuracy_control_on_labelled_calibration(reference, tmp_path: Path):
    loaded, cal, val, float_logits, _ = reference
    opts = OpenVinoOptions(method="nncf", max_drop=0.0)  # no drop allowed: NNCF must put layers back in float
    _, runner, desc = _export(ExportRequest(loaded, "int8", opts, None, cal), tmp_path)
    assert desc["export"]["method"] == "nncf.quantize_with_accuracy_control"
    assert compare(runner(val.x), float_logits).cosine > 0.97
    unlabelled = dataclasses.replace(cal, labels=None)
    with pytest.raises(UserError, match="labelled calibration images"):
        _export(ExportRequest(loaded, "int8", opts, None, unlabelled), tmp_path / "x")


OWN_PROCESS = "MNV4_TEST_OWN_PROCESS"
# bf16 compilation on this AMX CPU leaves the pytest process in a state where it is later killed by SIGSEGV while
# a later test waits on a child process (no faulthandler output; seen twice at tests/test_output.py, never with
# these two tests deselected). Until that is understood they run in a child pytest of their own.
own_process = pytest.mark.skipif(os.environ.get(OWN_PROCESS) != "1",
                                 reason="runs in its own process: test_bf16_and_speed_tests_in_their_own_process")


def test_bf16_and_speed_tests_in_their_own_process(tmp_path: Path):
    import subprocess
    import sys

    names = ["test_bf16_is_the_float_ir_computed_in_bf16", "test_int8_is_timed_against_the_default_float_and_strict_f32"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           "--basetemp", str(tmp_path / "child"), *[f"{__file__}::{n}" for n in names]],
                          capture_output=True, text=True, env={**os.environ, OWN_PROCESS: "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]


@own_process
def test_bf16_is_the_float_ir_computed_in_bf16(reference, tmp_path: Path):
    """Precision bf16: the float IR as the CPU plugin runs it by default on bf16 CPUs, verified against float
    with its own gate thresholds; the executed graph proves which layers ran in bf16."""
    from mnv4_deploy.targets.openvino.target import host_default_precision

    loaded, _, val, float_logits, _ = reference
    target = get_target("openvino")
    path, runner, desc = _export(ExportRequest(loaded, "bf16", OpenVinoOptions()), tmp_path)
    assert "bf16" in desc["export"]["weights"] and desc["fake_quantize"] == 0
    vs_float = compare(runner(val.x), float_logits, val.labels)
    limits = load_recipe(None).verification.bf16
    assert vs_float.cosine >= limits.min_cosine and vs_float.top1_agreement >= limits.min_agreement, vs_float
    executed = desc["runtime"]["layers_per_precision"]
    if host_default_precision() != "bf16":
        pytest.skip(f"this CPU computes float in {host_default_precision()}: no bf16 to check")
    per_type = desc["runtime"]["layers_per_type"]
    compute = {t: per_type[t] for t in ("Convolution", "GroupConvolution", "FullyConnected") if t in per_type}
    assert compute and all(set(c) == {"bf16"} for c in compute.values()), compute
    assert executed.get("bf16", 0) > 0, executed
    # the runtime's default float is bf16 here: it is what int8 is compared with, beside strict f32
    assert target.default_float() == "bf16"
    assert target.default_options(OpenVinoOptions()).compile_config().get("INFERENCE_PRECISION_HINT") is None
    assert vs_float.sqnr_db < 80, vs_float  # bf16, not a silent f32 run (f32 gives > 100 dB)


@own_process
def test_int8_is_timed_against_the_default_float_and_strict_f32(reference, tmp_path: Path):
    """verify/speed.py on OpenVINO: int8 as shipped against strict f32 and against the plugin's own default
    float (bf16 on bf16 CPUs), plus int8 under the plugin's defaults; the manifest says how int8 is meant to run."""
    from mnv4_deploy.verify.speed import compare_int8_speed

    loaded, cal, _, _, quantized = reference
    target = get_target("openvino")
    fp32 = ExportRequest(loaded, "fp32", OpenVinoOptions())
    int8 = ExportRequest(loaded, "int8", OpenVinoOptions(), quantized, cal)
    fp32_path, _, _ = _export(fp32, tmp_path / "fp32")
    int8_path, _, desc = _export(int8, tmp_path / "int8")
    assert desc["export"]["runtime_settings"]["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    row = compare_int8_speed(target, (fp32_path, fp32), (int8_path, int8), runs=6)
    strict, default = row["strict_f32"], row["runtime_default"]
    assert strict["fp32"]["runs"] >= 6 and strict["int8"]["computes_in"] == "fp32"
    assert default["int8"] == strict["int8"]  # int8 as shipped, against the other float
    assert default["float_is"].startswith(target.default_float())
    if target.default_float() == "fp32":
        assert "int8_runtime_defaults" not in row
    else:
        assert default["float"]["computes_in"] == target.default_float()
        assert row["int8_runtime_defaults"]["int8_over_float"] > 0
