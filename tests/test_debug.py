"""`mnv4-deploy debug` (mnv4_deploy/debug/): rebuilt from the manifest, a faithful artifact follows its
simulation at every layer, injected defects are named at their layer, refusals are one line.

One real convert (conv_small_035, random weights, 32x32, ONNX int8) and one rebuild per module; defects are
injected into copies of the ONNX file (the tensorwise tests' helpers) and compared against the same rebuilt
model. About two minutes on 2 cores.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from mnv4_deploy.cli import main  # noqa: E402
from mnv4_deploy.debug import DebugOptions, _layers, _trace, table  # noqa: E402
from mnv4_deploy.debug import layers as L  # noqa: E402
from mnv4_deploy.debug.rebuild import read_artifact, rebuild  # noqa: E402
from mnv4_deploy.errors import UserError  # noqa: E402

from .test_tensorwise import onnx_drop_qdq, onnx_scale_defect  # noqa: E402

SMALL = ["--model", "mobilenetv4_conv_small_035", "--weights", "random", "--input-size", "32", "--crop-pct", "1.0"]


def onnx_transpose(src: Path, dst: Path, index: int) -> str:
    """Swap H and W of the `index`-th activation QuantizeLinear's input (a converter that mixed up a layout):
    that tensor and everything computed from it are transposed. Returns the QuantizeLinear output's name."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name for t in g.initializer}
    q = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits][index]
    out = q.input[0] + "_transposed"
    t = helper.make_node("Transpose", [q.input[0]], [out], perm=[0, 1, 3, 2], name=out)
    g.node.insert(list(g.node).index(q), t)
    q.input[0] = out
    onnx.save(model, str(dst))
    return q.output[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("debug")
    rc = main(["convert", *SMALL, "--to", "onnx", "--int8", "--out", str(out), "--latency-runs", "1",
               "--no-progress", "--no-verify-gate"])
    assert rc == 0
    rb = rebuild([out / "onnx"], out / "work")
    x = rb.run.evals[0].images.x[:8]
    return out, rb, x


def _with_artifact(rb, path: Path):
    """The rebuilt run, its one artifact replaced by another file (same model, same request)."""
    art = dataclasses.replace(rb.artifacts[0], path=path)
    return dataclasses.replace(rb, artifacts=[art])


def _first(rb, x):
    result = _layers(rb, x, DebugOptions(folders=[]))
    return result, result["artifacts"][0]["first_divergence"]


def test_faithful_artifact_follows_its_simulation(built):
    out, rb, x = built
    result, first = _first(rb, x)
    assert first is None, first
    rows = result["layers"]["onnx"]
    assert len(rows) == len(result["positions"]) > 40 and not any(r["diverged"] for r in rows)
    assert all(r["local"]["max_lsb"] <= 1.0 for r in rows)
    # against float: every tensor has an SQNR and cosine; the runtime and its simulation are about as far
    assert all(r["vs_float"]["sqnr_db"] is not None and 0 < r["vs_float"]["cosine"] <= 1 for r in rows)
    assert all(abs(r["vs_float"]["sqnr_db"] - r["vs_float"]["simulation_sqnr_db"]) < 6 for r in rows)
    assert "DIVERGES" not in table({"layers": result["layers"], "worst": result["worst"]})


def test_corrupted_runtime_scale_is_named_at_its_layer(built, tmp_path):
    out, rb, x = built
    bad = tmp_path / "scale.onnx"
    onnx_scale_defect(rb.artifacts[0].path, bad, index=10, consistent=False)
    result, first = _first(_with_artifact(rb, bad), x)
    assert first is not None and first["position"] == 10, first
    assert any("inconsistent in the runtime" in r for r in first["reasons"]), first
    assert first["scale"] and first["runtime_scale"] and first["producer"]
    assert "leaves its simulation at #10" in L.describe_divergence("onnx", first)


def test_dropped_quantizer_is_named_at_its_layer(built, tmp_path):
    out, rb, x = built
    bad = tmp_path / "dropped.onnx"
    onnx_drop_qdq(rb.artifacts[0].path, bad, index=20)
    result, first = _first(_with_artifact(rb, bad), x)
    assert first is not None and first["position"] == 20 and first["runtime_tensor"] is None, first
    assert "dropped" in first["reasons"][0]


def test_transposed_layout_is_named_at_its_layer(built, tmp_path):
    out, rb, x = built
    bad = tmp_path / "transposed.onnx"
    onnx_transpose(rb.artifacts[0].path, bad, index=12)
    result, first = _first(_with_artifact(rb, bad), x)
    # onnxruntime moves the Transpose past the QuantizeLinear (its transpose optimizer): tensor #12 is still
    # written right, and the first layer computing from the transposed copy is #13 (the residual add)
    assert first is not None and first["position"] in (12, 13), first
    assert any("#12" in r and "transposed" in r for r in first["reasons"]) or first["position"] == 12, first


def test_side_by_side_finds_where_two_artifacts_part(built, tmp_path):
    out, rb, x = built
    bad = tmp_path / "scale.onnx"
    onnx_scale_defect(rb.artifacts[0].path, bad, index=15, consistent=False)
    good = rb.artifacts[0]
    broken = dataclasses.replace(good, path=bad, label="broken")
    result = _layers(dataclasses.replace(rb, artifacts=[good, broken]), x, DebugOptions(folders=[]))
    [pair] = result["side_by_side"]
    assert pair["artifacts"] == ["onnx", "broken"]
    assert pair["parted_at"]["position"] == 15 and pair["parted_at"]["closer_to_float"] == "onnx", pair


def test_one_image_trace_names_the_flip_layer(built):
    out, rb, x = built
    q = rb.artifacts[0].request.quantized
    fg = L.FloatGraph(q)
    sim = q.simulate(x).argmax(1)
    i = int(np.argmax(sim != fg.run(x, record=False)[0].argmax(1))) if (sim != fg.run(x, record=False)[0].argmax(1)).any() else 0
    t = _trace(rb, fg, x[i:i + 1], 0, "img")
    s = t["simulation"]
    dec = s["decisions"]
    assert len(dec) == len(fg.positions) + 1
    assert dec[0] == int(fg.run(x[i:i + 1], record=False)[0].argmax())  # all float
    assert dec[-1] == int(sim[i])  # int8 through every quantizer: the simulation's decision
    if s["flipped"]:
        k = s["flip"]["position"]
        assert dec[k] == dec[0] and all(d != dec[0] for d in dec[k + 1:])
    assert "onnx" in t["runtimes"]


def test_refusals_are_one_line(built, tmp_path, capfd):
    out, rb, x = built
    folder = tmp_path / "onnx"
    shutil.copytree(out / "onnx", folder)
    manifest = json.loads((folder / "manifest.json").read_text())

    def refused(change, expected: str) -> None:
        m = json.loads(json.dumps(manifest))
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))
        capfd.readouterr()
        assert main(["debug", str(folder), "--out", str(tmp_path / "dbg"), "--no-progress"]) == 2
        err = capfd.readouterr().err.strip().splitlines()  # progress log lines may come before it
        errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
        assert errors == [err[-1]] and err[-1].startswith("mnv4-deploy: error:") and expected in err[-1], err

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not the weights")

    def changed_weights(m):
        m["model"]["weights"], m["model"]["weights_sha256"] = str(weights), "0" * 64

    refused(changed_weights, "weights changed")

    def changed_set(m):
        m["quantization"]["calibration_set"]["digest"] = "sha256:" + "0" * 64

    refused(changed_set, "calibration set differs")

    def fp32(m):
        m["precision"] = "fp32"

    refused(fp32, "fp32 artifact")
    with pytest.raises(UserError, match="no manifest.json"):
        read_artifact(tmp_path)


def test_cli_writes_table_json_and_html(built, tmp_path, capfd):
    from .test_report import _Collector

    out, rb, x = built
    dest = tmp_path / "dbg"
    capfd.readouterr()
    assert main(["debug", str(out / "onnx"), "--max-images", "8", "--advice", "1", "--out", str(dest),
                 "--no-progress"]) == 0
    printed = capfd.readouterr().out
    assert "worst layers" in printed and "follows its simulation at every layer" in printed
    report = json.loads((dest / "debug.json").read_text())
    assert report["version"] == 1 and report["artifacts"][0]["first_divergence"] is None
    assert report["images"]["count"] == 8 and len(report["layers"]["onnx"]) == len(report["positions"])
    text = (dest / "debug.html").read_text()
    parser = _Collector()  # parsed as the report's HTML is: well formed, self-contained
    parser.feed(text)
    parser.close()
    assert "script" not in parser.tags and not parser.external
    assert parser.tags.count("svg") >= 2 and text.count("<polyline") >= 2 and "runtime vs float" in text


def test_rebuilt_model_from_the_cache_is_the_same_model(built):
    """A second rebuild into the same folder loads the saved calibrated state: the same graph (node names, module
    paths), the same int8 simulation bit for bit, the same calibration record."""
    import torch

    out, rb, x = built
    assert list((out / "work" / "rebuilt").glob("*.pt"))
    again = rebuild([out / "onnx"], out / "work")
    q0, q1 = rb.artifacts[0].request.quantized, again.artifacts[0].request.quantized
    assert q1 is not q0 and q1.calibration == q0.calibration
    p0, p1 = q0.prepared.state_dict(), q1.prepared.state_dict()
    assert p0.keys() == p1.keys() and [(k, p0[k], p1[k]) for k in p0 if not torch.equal(p0[k], p1[k])][:3] == []
    g0, g1 = q0.converted(), q1.converted()
    assert [n.name for n in g1.graph.nodes] == [n.name for n in g0.graph.nodes]
    assert [(n.name, n.args[1:]) for n in g1.graph.nodes if "quantize_per_tensor" in str(n.target)] == \
        [(n.name, n.args[1:]) for n in g0.graph.nodes if "quantize_per_tensor" in str(n.target)]
    s0, s1 = g0.state_dict(), g1.state_dict()
    assert s0.keys() == s1.keys() and [k for k in s0 if not torch.equal(s0[k], s1[k])] == []
    np.testing.assert_array_equal(q1.simulate(x), q0.simulate(x))
    assert L.FloatGraph(q1).modules == L.FloatGraph(q0).modules


def test_debug_html_in_a_headless_browser(built, tmp_path):
    """debug.html of a faithful and a broken artifact, rendered by a real browser: one line per runtime in its
    colour, the broken one's first divergence drawn as a dashed marker (the faithful one has none)."""
    import hashlib

    from mnv4_deploy.report.svg import PALETTE

    from .browser import colour_mask, dashed_columns, not_blank, screenshot

    out, rb, x = built
    broken = tmp_path / "broken" / "onnx"
    shutil.copytree(out / "onnx", broken)
    onnx_scale_defect(out / "onnx" / "model.onnx", broken / "model.onnx", index=15, consistent=False)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["artifact"]["sha256"] = hashlib.sha256((broken / "model.onnx").read_bytes()).hexdigest()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    dest = out / "work"  # the fixture's rebuild folder: the rebuilt model is read back, not calibrated again
    assert main(["debug", str(out / "onnx"), str(broken), "--max-images", "8", "--advice", "1", "--out", str(dest),
                 "--no-progress"]) == 0
    report = json.loads((dest / "debug.json").read_text())
    good, bad = (a["first_divergence"] for a in report["artifacts"])
    assert good is None and bad is not None and bad["position"] == 15
    img = screenshot(dest / "debug.html", tmp_path / "debug.png")
    assert not_blank(img) > 0.03, "the page came out (nearly) blank"
    blue, orange = (colour_mask(img, c) for c in PALETTE[:2])  # the two runtimes' lines, in report order
    assert blue.sum() > 300 and orange.sum() > 300, (blue.sum(), orange.sum())
    assert len(dashed_columns(orange, min_length=100, min_dashes=8)) >= 1, "no divergence marker for the broken one"
    assert dashed_columns(blue, min_length=100, min_dashes=8) == [], "a divergence marker for the faithful one"
