"""QNN target (Qualcomm HTP via onnxruntime-qnn, emulated on x86): placement proof, the context binary, 16-bit
activations, and what `--to all` does without the extra. The reference-checkpoint builds are slow (-m slow);
the default suite's qnn artifact comes from tests/test_target_conformance.py."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnv4_deploy.errors import MissingDependencyError, VerificationError
from mnv4_deploy.pipeline import ConvertSettings, _select_targets, convert
from mnv4_deploy.targets import get_target
from mnv4_deploy.targets.qnn.context import TRACE, compile_context
from mnv4_deploy.targets.qnn.passes.boundary_converts import convert_boundaries
from mnv4_deploy.targets.qnn.placement import htp_quantization, placement_record
from mnv4_deploy.targets.qnn.target import CONTEXT_MODEL, QnnOptions, QnnRunner, _int16_to_uint16
from tests.conftest import qnn_or_skip

INSTALL = "pip install 'mnv4-deploy[qnn]'"


def _qdq_model(path: Path, dtype: Any, scale: float, zero: int, ops: tuple[str, ...] = ("Relu",)) -> Path:
    """input -> Q -> DQ -> (op -> Q -> DQ) per op -> output, activations of `dtype`: a tiny, real QDQ graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zero, dtype), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q0"], name="q0"),
             helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["d0"], name="dq0")]
    for i, op in enumerate(ops, 1):
        out = "logits" if i == len(ops) else f"d{i}"
        nodes += [helper.make_node(op, [f"d{i - 1}"], [f"m{i}"], name=f"{op.lower()}{i}", **({"axis": 1} if op == "Hardmax" else {})),
                  helper.make_node("QuantizeLinear", [f"m{i}", "s", "z"], [f"q{i}"], name=f"q{i}"),
                  helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [out], name=f"dq{i}")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def _cpu(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_missing_extra_is_named_and_all_skips_it(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    """Without onnxruntime-qnn: `--to qnn` names the install command; `--to all` goes on without qnn (the check
    `--to all` applies to each target, pipeline._installed)."""
    from mnv4_deploy.pipeline import _installed
    from mnv4_deploy.targets.qnn.target import QnnTarget

    monkeypatch.setattr(QnnTarget, "requires", ("onnx", "mnv4_absent_onnxruntime_qnn"))
    with pytest.raises(MissingDependencyError, match=r"install the 'qnn' extra: pip install 'mnv4-deploy\[qnn\]'"):
        _select_targets(ConvertSettings(model="m", out=Path("."), targets="qnn", precision="int8"))
    with caplog.at_level(logging.WARNING):
        assert not _installed(get_target("qnn"))
    assert any("skipping qnn" in r.getMessage() and INSTALL in r.getMessage() for r in caplog.records)


def test_refuses_a_model_not_placed_whole(tmp_path: Path) -> None:
    """Placement proof: QNN refuses Hardmax; the default options refuse the model, naming the node and QNN's
    reason; --allow-cpu-fallback compiles it, and the manifest's placement names what stayed on the CPU."""
    import onnx

    qnn_or_skip()
    model = _qdq_model(tmp_path / "m.onnx", np.uint8, 0.05, 128, ops=("Relu", "Hardmax", "Relu"))
    folder = tmp_path / "strict"
    folder.mkdir()
    with pytest.raises(VerificationError, match=r"1 node\(s\) not placed on HTP .*hardmax2 \(Hardmax\): "
                                                r"Operators of type `Hardmax` are not supported by QNN EP"):
        compile_context(model, folder / CONTEXT_MODEL, folder, QnnOptions())

    folder = tmp_path / "fallback"
    folder.mkdir()
    opts = QnnOptions(allow_cpu_fallback=True)
    compile_context(model, folder / CONTEXT_MODEL, folder, opts)
    placement = placement_record(onnx.load(str(model)), json.loads((folder / TRACE).read_text()))
    # with fallback allowed QNN also leaves I/O quantization to the CPU (its offload_graph_io_quantization)
    left = {r["node"]: r["reason"] for r in placement["left_off_htp"]}
    assert not placement["whole_model_on_htp"] and "not supported by QNN EP" in left["hardmax2"], left
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(QnnRunner(folder / CONTEXT_MODEL, opts)(x), _cpu(model, x), atol=0.05 + 1e-6)


def test_uint16_activations_run_on_htp(tmp_path: Path) -> None:
    """w8a16's activations: int16 zero points become uint16 (same values on the CPU), the model conforms to what
    QNN documents for HTP, compiles whole into a context binary, and loads back with CPU fallback disabled."""
    import onnx

    qnn_or_skip()
    signed = _qdq_model(tmp_path / "s.onnx", np.int16, 1e-4, -300)
    unsigned = tmp_path / "u.onnx"
    unsigned.write_bytes(signed.read_bytes())
    assert _int16_to_uint16(unsigned) == 1
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_cpu(signed, x), _cpu(unsigned, x))
    check = htp_quantization(onnx.load(str(unsigned)))
    assert check["conforms"] and check["activation_quantizers"] == {"uint16": 2}, check
    assert not htp_quantization(onnx.load(str(signed)))["conforms"]  # int16 activations: not what HTP runs
    folder = tmp_path / "ctx"
    folder.mkdir()
    opts = QnnOptions(soc="SM8650")
    compile_context(unsigned, folder / CONTEXT_MODEL, folder, opts)
    placement = placement_record(onnx.load(str(unsigned)), json.loads((folder / TRACE).read_text()))
    assert placement["whole_model_on_htp"] and placement["compiled_for"][0]["htp_arch"] == "V75", placement
    assert list(folder.glob("*.bin")), "no context binary written"
    got = QnnRunner(folder / CONTEXT_MODEL, opts)(x)
    assert np.abs(got - _cpu(unsigned, x)).max() <= 1e-4 + 1e-7  # within one 16-bit step


# ----------------------------------------------------------------------------- reference checkpoints (slow)
RECIPE = """\
name: qnn-test
quantization:
  calibration: {images: 64, batch_size: 32}
verification: {images: 32, batch_size: 32}
targets:
  qnn: {emulated_images: 16}
"""


def _convert(tmp_path: Path, model: str, checkpoint: Path, tin: Path, recipe: str, gate: bool = True) -> Any:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    [result] = convert(ConvertSettings(
        model=model, weights=str(checkpoint), num_classes=202, preprocessing={"input_size": [64], "crop_pct": 1.0},
        out=tmp_path / "out", targets="qnn", precision="int8", calib=tin / "train", recipe=str(path),
        progress=False, verify_gate=gate))
    return result


def _placed_whole(result: Any) -> dict[str, Any]:
    m = result.manifest
    placement = m["structure"]["placement"]
    assert placement["whole_model_on_htp"] and not placement["left_off_htp"], placement["left_off_htp"]
    assert m["verification"]["numbers"] == "emulated" and m["verification"]["latency"]["median_ms"] is None
    assert m["structure"]["htp_quantization"]["conforms"], m["structure"]["htp_quantization"]
    assert m["structure"]["context_model_operators"] == {"EPContext": 1}
    assert m["export"]["context_binary_bytes"] > 0 and (result.path / m["export"]["context_binary"][0]).is_file()
    return placement


@pytest.mark.slow
def test_conv_small_placed_whole(tmp_path: Path, reference_checkpoint: Path, tiny_imagenet: Path) -> None:
    result = _convert(tmp_path, "mobilenetv4_conv_small", reference_checkpoint, tiny_imagenet, RECIPE)
    _placed_whole(result)
    compute = result.manifest["structure"]["int8_compute"]
    assert compute["int8"] == compute["total"] >= 40 and not compute["float"], compute
    assert result.manifest["verification"]["held_back"]["vs_float"]["images"] == 16  # the emulated_images limit
    assert "16 of its 32 images" in result.manifest["verification"]["held_back"]["source"]
    # HTP's arithmetic is modelled (mnv4_deploy/targets/qnn/htp_semantics.py): the emulator gives the simulation's top-1
    v = result.manifest["verification"]
    assert v["simulation"]["semantics"] == "htp-SM8550", v["simulation"]
    assert v["held_back"]["vs_pytorch_simulation"]["top1_agreement"] == 1.0, v["held_back"]["vs_pytorch_simulation"]
    table = json.loads((result.manifest_path.parent / "tensorwise.json").read_text())["tensors"]
    assert max(r["local"]["mean_lsb"] for r in table) < 1e-3, table  # rare ties: htp_semantics.MULTIPLIER_TIE


@pytest.mark.slow
def test_hybrid_attention_placed_on_htp(tmp_path: Path, tiny_imagenet: Path) -> None:
    from tests.conftest import HYBRID_REFERENCE

    if not HYBRID_REFERENCE.is_file():
        pytest.skip(f"hybrid checkpoint not found at {HYBRID_REFERENCE}")
    # the 1-epoch hybrid fails the int8 numbers gate under PTQ on every target (README): placement is the point
    result = _convert(tmp_path, "mobilenetv4_hybrid_medium", HYBRID_REFERENCE, tiny_imagenet, RECIPE, gate=False)
    placement = _placed_whole(result)
    assert placement["qnn_ops"].get("MatMul", 0) >= 2 and placement["qnn_ops"].get("Softmax", 0) >= 1, placement


@pytest.mark.slow
def test_mixed_recipe_runs_uint16_at_its_sites(tmp_path: Path, reference_checkpoint: Path,
                                              tiny_imagenet: Path) -> None:
    """ptq-int8-mixed's int16 fallback: real 16-bit activations (uint16) on HTP at the chosen sites."""
    recipe = RECIPE.replace("quantization:\n  calibration: {images: 64, batch_size: 32}\n",
                            "quantization:\n  calibration: {images: 64, batch_size: 32}\n"
                            "  fallback: {precision: int16, target_agreement: 0.99, max_layers: 4, images: 64}\n")
    result = _convert(tmp_path, "mobilenetv4_conv_small", reference_checkpoint, tiny_imagenet, recipe)
    _placed_whole(result)
    sites = result.manifest["quantization"]["fallback"]["sites"]
    assert 0 < len(sites) <= 4
    assert result.manifest["export"]["activation_zero_points_rewritten"]["int16->uint16"] >= 1
    assert result.manifest["export"]["uint8_uint16_converts"] >= 1  # QNN's region boundaries
    assert result.manifest["structure"]["htp_quantization"]["activation_quantizers"]["uint16"] >= len(sites)
    assert result.manifest["structure"]["int8_compute"]["int16"] >= 1


def test_slow_runner_verifies_on_evenly_spaced_images() -> None:
    """`Runner.max_images` (the HTP emulator's limit): each evaluation set shrinks to that many images, evenly
    spaced, with the float logits, labels and simulation alongside, and its source says so."""
    from mnv4_deploy.load.images import LoadedImages
    from mnv4_deploy.pipeline import EvalData, _within_limit
    from mnv4_deploy.targets import Runner

    class Slow(Runner):
        numbers, max_images, max_images_reason = "emulated", 4, "slow"

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return x

    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    held = EvalData("held_back", "held", LoadedImages(x, np.arange(10)), np.arange(10.0)[:, None])
    val = EvalData("val", "val", LoadedImages(x[:3], None), np.zeros((3, 1)))
    (h, v), sim = _within_limit(Slow(), [held, val], np.arange(10.0)[:, None])
    assert h.images.x.ravel().tolist() == [0, 3, 6, 9] == h.images.labels.tolist() == h.float_logits.ravel().tolist()
    assert sim.ravel().tolist() == [0, 3, 6, 9] and "4 of its 10 images, evenly spaced (emulated: slow)" in h.source
    assert v is val  # a set within the limit is untouched


def test_w8a16_boundaries_get_converts(tmp_path: Path) -> None:
    """An int16 fallback site between 8-bit tensors: the units on both sides mix 8 and 16 bits, which HTP
    refuses for a conv with per-channel weights; after QNN's convention (DQ -> Q converts at the boundary) the model is placed whole and computes
    the same values on the CPU."""
    from .test_pass_qnn_boundary_converts import w8a16_boundary_model

    qnn_or_skip()
    path = w8a16_boundary_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    before = _cpu(path, x)
    refused = tmp_path / "refused"
    refused.mkdir()
    with pytest.raises(VerificationError, match="standalone DQ op with per-channel quantization"):
        compile_context(path, refused / CONTEXT_MODEL, refused, QnnOptions())
    assert convert_boundaries(path) == 2  # the conv's output is 16-bit: its 8-bit input is converted up
    after = _cpu(path, x)                      # sig2's output is 8-bit: computed in 16 bits, converted down
    assert np.abs(after - before).max() <= 0.05 + 1e-6 and (after == before).mean() > 0.99
    folder = tmp_path / "ctx"
    folder.mkdir()
    compile_context(path, folder / CONTEXT_MODEL, folder, QnnOptions())  # now placed whole
