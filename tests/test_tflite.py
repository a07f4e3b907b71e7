"""TFLite / LiteRT target, checked in ai_edge_litert's real interpreter (XNNPACK).

Default suite (about 2-3 minutes on 2 cores): fp32 vs PyTorch, NHWC + baked normalisation (float and
full-integer uint8), int8 full-integer on the reference checkpoint through the whole pipeline, a float
hybrid (Mobile MQA) at a reduced input, and full-integer int8 of the trained hybrid's Mobile MQA blocks
(BatchNorm, attention matmuls, int8 SOFTMAX) in a small model. Whole-hybrid int8 conversions take minutes,
so they are marked slow.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from mnv4_deploy.config.recipes import load_recipe, parse_recipe  # noqa: E402
from mnv4_deploy.errors import UserError, VerificationError  # noqa: E402
from mnv4_deploy.load.images import default_calibration  # noqa: E402
from mnv4_deploy.targets import ExportRequest, check_recipe_targets, get_target  # noqa: E402
from mnv4_deploy.targets.tflite.target import TfliteOptions, artifact_input  # noqa: E402
from mnv4_deploy.verify.fidelity import compare, torch_logits  # noqa: E402

from .conftest import prepared_model  # noqa: E402

# The 1-epoch hybrid checkpoint (same place conftest looks for the reference checkpoint).
HYBRID_REFERENCE = (Path(os.environ.get("MNV4_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
                    / "models" / "mnv4_hybrid_medium_tin202_e1.pth")


def _small(name: str = "mobilenetv4_conv_small_035", size: int = 64, weights: str = "random"):
    return prepared_model(name, weights, 202 if weights != "random" else None, size)


def _export(tmp_path: Path, loaded, precision: str, opts: TfliteOptions, quantized=None, calibration=None):
    target = get_target("tflite")
    request = ExportRequest(loaded, precision, opts, quantized, calibration)
    path = tmp_path / f"{precision}-{opts.io_dtype}-{opts.layout}-{int(opts.bake_normalization)}.tflite"
    info = target.export(request, path)
    return target, request, path, info


@pytest.fixture(scope="module")
def small():
    """conv_small_035 (random weights, 64x64) with real photos: enough for plumbing and float equality."""
    loaded = _small()
    images, _ = default_calibration(loaded.preprocessing, 16, seed=1)
    return loaded, images, torch_logits(loaded.model, images.x)


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_fp32_structure_and_input_spec(small, tmp_path):
    """Ops, MACs and the input an app feeds (numbers vs PyTorch: test_target_conformance.py)."""
    loaded, images, reference = small
    target, request, path, info = _export(tmp_path, loaded, "fp32", TfliteOptions())
    described = target.describe(path, request)
    assert described["operators"]["CONV_2D"] > 10 and described["operators"]["DEPTHWISE_CONV_2D"] > 5
    assert not described["full_integer"] and described["ops_int8"] == 0
    # conv_small_035 at 64x64: about 5.5 M MACs (the converter's own estimate is 5.509 M).
    assert 4e6 < described["estimated_macs"] < 7e6
    spec = target.input_spec(path, request)
    assert spec["shape"] == [1, 3, 64, 64] and spec["dtype"] == "float32" and spec["layout"] == "NCHW"
    assert spec["quantization"] is None and not spec["normalization"]["inside_model"]


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_fp16_weights(small, tmp_path):
    """float16 weights (half the size), dequantized at load: same answers as float."""
    loaded, images, reference = small
    target, request, path, info = _export(tmp_path, loaded, "fp16", TfliteOptions())
    described = target.describe(path, request)
    assert described["operators"]["DEQUANTIZE"] >= described["operators"]["CONV_2D"]  # one per weight tensor
    fid = compare(target.load(path, request)(images.x), reference)
    assert fid.cosine > 0.999 and fid.top1_agreement == 1.0, fid


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_nhwc_baked_normalization_float(small, tmp_path):
    loaded, images, reference = small
    opts = TfliteOptions(layout="nhwc", bake_normalization=True)
    target, request, path, _ = _export(tmp_path, loaded, "fp32", opts)
    described = target.describe(path, request)
    assert "TRANSPOSE" not in described["operators"], "the NHWC input should need no transpose"
    spec = target.input_spec(path, request)
    assert spec["shape"] == [1, 64, 64, 3] and spec["layout"] == "NHWC"
    assert spec["normalization"]["inside_model"] is True
    runner = target.load(path, request)
    # The runner feeds raw 0..255 pixels in NHWC: what an app does with a camera frame.
    raw = artifact_input(images.x[:1], loaded.preprocessing, opts, runner.input)
    assert raw.shape == (1, 64, 64, 3) and raw.min() >= 0 and raw.max() <= 255
    np.testing.assert_array_equal(raw[0], images.uint8[0].astype(np.float32))
    fid = compare(runner(images.x), reference)
    assert fid.cosine > 0.9999 and fid.top1_agreement == 1.0, fid


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_int8_nhwc_baked_uint8_is_full_integer(small, tmp_path):
    """EdgeTPU-style: uint8 raw pixels in NHWC, uint8 logits out, no float op anywhere."""
    from mnv4_deploy.quantization.pt2e import quantize

    loaded, images, reference = small
    calibration, _ = default_calibration(loaded.preprocessing, 32, seed=0)
    quantized = quantize(loaded.model, calibration, load_recipe(None))
    opts = TfliteOptions(io_dtype="uint8", layout="nhwc", bake_normalization=True)
    target, request, path, info = _export(tmp_path, loaded, "int8", opts, quantized, calibration)
    assert "requantized" in info
    runner = target.load(path, request)  # raises VerificationError if any float op is left
    described = target.describe(path, request)
    assert described["full_integer"] and described["ops_float"] == 0
    spec = target.input_spec(path, request)
    assert spec["dtype"] == "uint8" and spec["layout"] == "NHWC" and spec["normalization"]["inside_model"]
    # Raw pixels need no rescaling: the calibrated input range is about 0..255.
    assert abs(spec["quantization"]["scale"] - 1.0) < 0.1 and abs(spec["quantization"]["zero_point"]) <= 8
    assert described["outputs"][0]["dtype"] == "uint8"
    fid = compare(runner(images.x), reference)
    assert fid.cosine > 0.95, fid


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_full_integer_refuses_float_ops(small, tmp_path):
    """An artifact asked to be full-integer that still computes in float is refused, naming the ops."""
    loaded, _, _ = small
    target, _, path, _ = _export(tmp_path, loaded, "fp32", TfliteOptions())
    request = ExportRequest(loaded, "int8", TfliteOptions(io_dtype="int8"))
    with pytest.raises(VerificationError, match=r"still run in float: CONV_2D x\d+"):
        target.load(path, request)


def test_io_dtype_needs_int8(small, tmp_path):
    loaded, _, _ = small
    with pytest.raises(UserError, match="needs --int8"):
        _export(tmp_path, loaded, "fp32", TfliteOptions(io_dtype="int8"))


def test_recipe_validates_tflite_options():
    text = "targets:\n  tflite:\n    io_dtype: uint8\n    layout: nhwc\n    threads: 1\n"
    opts = check_recipe_targets(parse_recipe(text)).targets["tflite"]
    assert (opts.io_dtype, opts.layout, opts.threads) == ("uint8", "nhwc", 1)
    with pytest.raises(UserError, match="io_dtype"):
        check_recipe_targets(parse_recipe("targets:\n  tflite:\n    io_dtype: int4\n"))


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_int8_reference_checkpoint_full_integer(reference_checkpoint, tiny_imagenet, tmp_path):
    """The whole pipeline on the trained checkpoint: full-integer int8 agrees with float on real val images."""
    from mnv4_deploy.pipeline import ConvertSettings, convert

    recipe = tmp_path / "recipe.yaml"
    # Per-batch percentile ranges: the observer that keeps the reference checkpoint within a point of float
    # (histogram ranges lose about 2 points and a third of the top-1 agreement; see quantization/observers.py).
    recipe.write_text("name: test\nquantization:\n  activations:\n    observer: percentile\n"
                      "  calibration:\n    images: 256\nverification:\n  images: 128\n")
    settings = ConvertSettings(
        model="mobilenetv4_conv_small", out=tmp_path / "out", targets="tflite", precision="int8",
        weights=str(reference_checkpoint), num_classes=202,
        preprocessing={"input_size": [64, 64], "crop_pct": 1.0}, calib=tiny_imagenet / "train",
        val=tiny_imagenet / "val", val_limit=300, recipe=str(recipe), target_options={"io_dtype": "int8"},
        latency_runs=5, progress=False,
    )
    (result,) = convert(settings)
    m = result.manifest
    assert result.path.is_file() and result.manifest_path.is_file()
    assert m["structure"]["full_integer"] and m["structure"]["ops_float"] == 0
    assert m["input"]["dtype"] == "int8" and m["input"]["quantization"]["scale"] > 0
    val = m["verification"]["val"]
    assert val["vs_float"]["top1_agreement"] >= 0.85, val
    assert abs(val["vs_float"]["top1"] - val["vs_float"]["reference_top1"]) <= 0.03, val
    # The runtime reproduces the PyTorch simulation of the same int8 graph closely (XNNPACK's requantization
    # rounds differently, so a few near-tie images flip: measured 94-95% agreement, cosine 0.9994).
    sim = m["verification"]["held_back"]["vs_pytorch_simulation"]
    assert sim["cosine"] >= 0.998 and sim["top1_agreement"] >= 0.85, sim


@pytest.fixture(scope="module")
def hybrid():
    """hybrid_medium at 64x64: the 1-epoch checkpoint when present (random weights give ~1e-22 logits)."""
    weights = str(HYBRID_REFERENCE) if HYBRID_REFERENCE.is_file() else "random"
    loaded = _small("mobilenetv4_hybrid_medium", 64, weights)
    images, _ = default_calibration(loaded.preprocessing, 8, seed=1)
    return loaded, images


@pytest.mark.slow  # float hybrid TFLite, ~27 s; int8 attention stays in the default suite
def test_hybrid_float_small(hybrid, tmp_path):
    loaded, images = hybrid
    target, request, path, _ = _export(tmp_path, loaded, "fp32", TfliteOptions())
    fid = compare(target.load(path, request)(images.x), torch_logits(loaded.model, images.x))
    assert fid.cosine > 0.999, fid
    described = target.describe(path, request)
    # The 8 Mobile MQA blocks made it through: two attention matmuls (BATCH_MATMUL, or FULLY_CONNECTED where
    # the converter sees a batch of one) and one fused SOFTMAX each; plus the classifier's FULLY_CONNECTED.
    ops = described["operators"]
    assert ops.get("BATCH_MATMUL", 0) + ops.get("FULLY_CONNECTED", 0) == 17, ops
    assert ops.get("SOFTMAX", 0) == 8 and "EXP" not in ops and "REDUCE_MAX" not in ops, ops


class _AttentionModel(nn.Module):
    """Two Mobile MQA blocks of the trained hybrid (kv stride 2 at 160 channels, kv stride 1 at 256) behind a
    patchify stem: every int8 question a hybrid asks of TFLite (the blocks' own BatchNorm, both attention
    matmuls, softmax over the keys), in a graph small enough to convert in seconds."""

    def __init__(self, hybrid: nn.Module, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 160, 16, stride=16)  # 64x64 -> 4x4 tokens
        self.attn_kv2 = hybrid.blocks[2][4]
        self.proj = nn.Conv2d(160, 256, 1)
        self.attn_kv1 = hybrid.blocks[3][8]
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLUs keep PT2E from folding the blocks' BatchNorm into stem/proj (in the hybrid it follows an add).
        x = self.attn_kv1(torch.relu(self.proj(self.attn_kv2(torch.relu(self.stem(x))))))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_hybrid_attention_full_integer(hybrid, tmp_path):
    """Mobile MQA blocks convert to a full-integer model (int8 I/O, no float op) that matches PyTorch's
    simulation of the same int8 graph; about 15-40 s here (15 s measured on 2 busy cores)."""
    from mnv4_deploy.preparation.mqa import MobileMQA
    from mnv4_deploy.quantization.pt2e import quantize

    loaded, images = hybrid
    model = _AttentionModel(loaded.model).eval()
    assert sum(isinstance(m, MobileMQA) for m in model.modules()) == 2
    small = dataclasses.replace(loaded, model=model, num_classes=10)
    calibration, _ = default_calibration(loaded.preprocessing, 32, seed=0)
    quantized = quantize(model, calibration, load_recipe(None))
    target, request, path, _ = _export(tmp_path, small, "int8", TfliteOptions(io_dtype="int8"), quantized)
    described = target.describe(path, request)
    assert described["full_integer"] and described["ops_float"] == 0, described["float_ops"]
    ops = described["operators"]
    assert ops.get("SOFTMAX") == 2, ops  # the fused int8 kernel, not REDUCE_MAX/EXP/SUM/DIV
    assert ops.get("FULLY_CONNECTED", 0) + ops.get("BATCH_MATMUL", 0) == 5, ops  # 2 x 2 attention + head
    assert ops.get("DEPTHWISE_CONV_2D", 0) >= 4, ops  # 2 K/V downsampling + the 2 blocks' BatchNorm
    assert described["inputs"][0]["dtype"] == "int8" and described["outputs"][0]["dtype"] == "int8"
    runner = target.load(path, request)  # refuses any float op left
    fid = compare(runner(images.x), quantized.simulate(images.x))
    assert fid.cosine > 0.99, fid
    fid = compare(runner(images.x), torch_logits(model, images.x))
    assert fid.cosine > 0.95, fid
    # Every attention quantizer has its runtime tensor, including the ones TFLite keeps transposed (softmax over
    # its last axis) or as 2-D FULLY_CONNECTED operands without a batch axis.
    from mnv4_deploy.verify import tensorwise

    summary = tensorwise.check(target, path, request, images.x[:4])["summary"]
    assert summary["unmatched_pytorch"] == [] and summary["flagged"] == 0, summary


@pytest.mark.slow
def test_hybrid_int8_small(hybrid, tmp_path):
    """About 3-6 minutes here: litert's int8 lowering of the attention blocks is slow."""
    from mnv4_deploy.quantization.pt2e import quantize
    from mnv4_deploy.targets.tflite.io_dtype import set_io_dtype

    loaded, images = hybrid
    calibration, _ = default_calibration(loaded.preprocessing, 32, seed=0)
    quantized = quantize(loaded.model, calibration, load_recipe(None))
    target, request, path, _ = _export(tmp_path, loaded, "int8", TfliteOptions(io_dtype="float"), quantized)
    fid = compare(target.load(path, request)(images.x), quantized.simulate(images.x))
    assert fid.cosine > 0.99, fid
    # The same graph with integer I/O (what export does for --io-dtype int8, without converting again).
    int8_path = tmp_path / "int8-io.tflite"
    int8_path.write_bytes(set_io_dtype(path.read_bytes(), "int8"))
    int8_request = ExportRequest(loaded, "int8", TfliteOptions(io_dtype="int8"), quantized)
    described = target.describe(int8_path, request)
    # Every op int8, the 8 Mobile MQA blocks included: BatchNorm as depthwise conv, int8 attention matmuls,
    # the fused int8 SOFTMAX (output scale 1/256, zero point -128).
    assert described["full_integer"], described["float_ops"]
    assert described["operators"].get("SOFTMAX") == 8, described["operators"]
    fid = compare(target.load(int8_path, int8_request)(images.x), quantized.simulate(images.x))
    assert fid.cosine > 0.99, fid


@pytest.mark.slow
def test_hybrid_int8_full_size(tmp_path):
    """hybrid_medium at 224 (about 3+ minutes of conversion): a full-integer model that runs in the interpreter
    and reproduces the PyTorch simulation (the 1-epoch checkpoint when present, which runs at any input size;
    random weights give ~1e-22 logits, so then only the plumbing and the int8 graph are judged)."""
    from mnv4_deploy.quantization.pt2e import quantize

    trained = HYBRID_REFERENCE.is_file()
    loaded = _small("mobilenetv4_hybrid_medium", 224, str(HYBRID_REFERENCE) if trained else "random")
    calibration, _ = default_calibration(loaded.preprocessing, 16, seed=0)
    quantized = quantize(loaded.model, calibration, load_recipe(None))
    target, request, path, _ = _export(tmp_path, loaded, "int8", TfliteOptions(io_dtype="int8"), quantized)
    described = target.describe(path, request)
    assert described["full_integer"] and described["operators"].get("SOFTMAX") == 8, described["float_ops"]
    out = target.load(path, request)(calibration.x[:4])  # refuses any float op left
    assert out.shape == (4, loaded.num_classes) and np.isfinite(out).all()
    if trained:
        fid = compare(out, quantized.simulate(calibration.x[:4]))
        assert fid.cosine > 0.95, fid
