"""`mnv4-deploy report`: schema round-trip, the regression gate, the HTML page, numbers equal to manifests.

Most tests use a hand-made manifest (instant). One module-scoped build runs the real pipeline on
mobilenetv4_conv_small_035 (fixed random weights saved to a checkpoint) at 64x64, onnx only, with a tiny
recipe, so the whole file stays well under two minutes on two cores.
"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnv4_deploy import UserError
from mnv4_deploy.cli import main
from mnv4_deploy.report import markdown, page, roofline, svg
from mnv4_deploy.report.regression_gate import RegressionThresholds, compare_reports, parse_percent
from mnv4_deploy.report.schema import (EVAL_SETS, cell_from_manifest, empty_cell, load_report, model_section,
                                       new_report, validate)
from mnv4_deploy.report.svg import pareto_front


N_IMAGES, N_CLASSES = 2000, 10


def fake_predictions(top1: float, agree: float, float_top1: float = 0.217,
                     n: int = N_IMAGES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, float top-1, artifact top-1) with the given accuracies, nested so that a lower number only loses
    images (a paired comparison of two such sets has no gains)."""
    labels = np.arange(n) % N_CLASSES
    n_float, n_ok, n_agree = round(float_top1 * n), round(top1 * n), round(agree * n)
    assert n_ok <= n_float and n_ok <= n_agree <= n_ok + (n - n_float)
    ref = np.where(np.arange(n) < n_float, labels, (labels + 1) % N_CLASSES)
    pred = np.where(np.arange(n) < n_ok, labels, (labels + 2) % N_CLASSES)  # right, or wrong and not float's
    agreeing = n_float + np.arange(n - n_float) < n_float + (n_agree - n_ok)  # among float's wrong images
    pred[n_float:][agreeing] = ref[n_float:][agreeing]
    return labels, ref, pred


def one_hot(classes: np.ndarray) -> np.ndarray:
    return np.eye(N_CLASSES, dtype=np.float32)[classes]


def fake_record(labels: np.ndarray, ref: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """A manifest's per-evaluation-set record (digest, predictions, intervals), as the pipeline writes it."""
    from types import SimpleNamespace

    from mnv4_deploy.verify.predictions import evaluation_record

    images = SimpleNamespace(x=np.zeros((len(labels), 1), np.float32), labels=labels, uint8=None, files=None)
    return evaluation_record(one_hot(pred), one_hot(ref), images)


def fake_manifest(target: str = "onnx", precision: str = "int8", top1: float = 0.21, agree: float = 0.75,
                  median_ms: float = 0.55, size: int = 3_250_000, preds: Any = None) -> dict[str, Any]:
    labels, ref, pred = preds if preds is not None else fake_predictions(top1, agree)
    top1, agree = float((pred == labels).mean()), float((pred == ref).mean())
    fid = {"images": len(labels), "cosine": 0.98, "sqnr_db": 8.3, "top1_agreement": agree, "top1": top1,
           "top5": 0.45, "reference_top1": float((ref == labels).mean()), "max_abs_error": 1.0}
    held = fake_predictions(0.21, 0.77, n=200)
    h_labels, h_ref, h_pred = held  # the held-back numbers agree with their predictions, as a real manifest's do
    held_fid = dict(fid, images=200, top1_agreement=float((h_pred == h_ref).mean()),
                    top1=float((h_pred == h_labels).mean()), reference_top1=float((h_ref == h_labels).mean()))
    return {
        "schema_version": 1, "target": target, "precision": precision,
        "model": {"name": "mobilenetv4_conv_small", "weights": "w.pth", "weights_sha256": "ab" * 32},
        "artifact": {"file": "model.onnx", "size_bytes": size, "sha256": "cd" * 32},
        "export": {"method": "float"},
        "input": {"shape": [1, 3, 64, 64]},
        "verification": {
            "numbers": "measured",
            "held_back": {"source": "train (held back)", "vs_float": held_fid}
            | fake_record(*held),
            "val": {"source": "val (2000 images)", "vs_float": fid} | fake_record(labels, ref, pred),
            "latency": {"batch": 1, "median_ms": median_ms, "p90_ms": median_ms * 1.2, "runs": 30, "threads": None},
        },
        "tool_versions": {"onnxruntime": "1.x"},
    }


def fake_report(**kw: Any) -> dict[str, Any]:
    model = "mobilenetv4_conv_small"
    cells = [cell_from_manifest(fake_manifest(precision="fp32", top1=0.217, agree=1.0, median_ms=0.8, size=15_000_000),
                                "built", "fp32/onnx/model.onnx", "fp32/onnx/manifest.json", model=model),
             empty_cell("onnx", "fp16", "skipped", "onnx does not support fp16", model),
             cell_from_manifest(fake_manifest(**kw), "built", "int8/onnx/model.onnx", "int8/onnx/manifest.json",
                                model=model)]
    layers = [roofline.Layer("stem", "full conv", 1_000_000, 864, 32, 20_000, "conv 3x3"),
              roofline.Layer("blocks.0", "depthwise conv", 50_000, 288, 32, 40_000, "dw 3x3"),
              roofline.Layer("head", "fully connected", 200_000, 200_000, 202, 1200, "linear")]
    roof = roofline.estimate(layers, ["fp32", "fp16", "int8"])
    section = model_section(model, {"name": model, "weights": "w.pth", "weights_sha256": "ab" * 32},
                            {"input_size": [64, 64], "recipe": "ptq-int8"}, roof)
    return new_report([section], cells, {"python": "3.11"})


# ---------------------------------------------------------------- schema


def test_schema_round_trip(tmp_path: Path):
    from mnv4_deploy.infra.fileio import write_json

    report = fake_report()
    write_json(tmp_path / "report.json", report)
    back = load_report(tmp_path)
    assert back == json.loads(json.dumps(report))
    for cell in back["cells"]:
        for m in cell["metrics"].values():
            assert {"value", "unit", "method"} <= set(m)
    assert back["models"][0]["roofline"]["precisions"]["int8"]["estimated_cost"]["method"] == "estimated"
    # every accuracy carries its sample size and 95% interval
    for key in ("val.top1", "val.top1_agreement", "val.top1_drop", "held_back.top1_agreement"):
        m = back["cells"][2]["metrics"][key]
        assert m["images"] and m["ci95"][0] <= m["value"] <= m["ci95"][1]  # the drop: points, like its interval


def test_not_a_report_is_a_user_error(tmp_path: Path):
    (tmp_path / "x.json").write_text('{"cells": []}')
    with pytest.raises(UserError, match="not an mnv4-deploy report"):
        load_report(tmp_path / "x.json")
    bad = fake_report()
    bad["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        validate(bad)
    with pytest.raises(UserError, match="no report at"):
        load_report(tmp_path / "missing.json")


def test_cell_numbers_equal_the_manifest():
    m = fake_manifest()
    cell = cell_from_manifest(m, "built", "a", "b")
    check_cell_matches_manifest(cell, m)


def check_cell_matches_manifest(cell: dict[str, Any], m: dict[str, Any]) -> None:
    v, metrics = m["verification"], cell["metrics"]
    assert metrics["size"]["value"] == m["artifact"]["size_bytes"]
    assert metrics["latency_median"]["value"] == v["latency"]["median_ms"]
    assert metrics["latency_p90"]["value"] == v["latency"]["p90_ms"]
    assert cell["artifact"]["sha256"] == m["artifact"]["sha256"]
    for name in EVAL_SETS:
        if name not in v:
            continue
        f = v[name]["vs_float"]
        for key in ("top1_agreement", "cosine", "sqnr_db"):
            assert metrics[f"{name}.{key}"]["value"] == f[key]
        if f.get("top1") is not None:
            assert metrics[f"{name}.top1"]["value"] == f["top1"]
            assert metrics[f"{name}.top5"]["value"] == f["top5"]
            assert metrics[f"{name}.float_top1"]["value"] == f["reference_top1"]
            assert metrics[f"{name}.top1"]["ci95"] == pytest.approx(v[name]["ci95"]["top1"], abs=1e-6)
        assert cell["evaluation"][name]["image_set"] == v[name]["image_set"]


# ---------------------------------------------------------------- gate


def test_gate_passes_without_regression():
    gate = compare_reports(fake_report(), fake_report(), RegressionThresholds(0.5, None, 0.10))
    assert gate.passed and gate.checks
    assert "PASSED" in "\n".join(markdown.gate_lines(gate))


def test_gate_catches_one_point_top1_regression():
    base, new = fake_report(top1=0.210), fake_report(top1=0.200)  # 1.0 point lower
    gate = compare_reports(new, base, RegressionThresholds(0.5, None, 0.10))
    assert not gate.passed
    [reg] = gate.regressions
    assert (reg.target, reg.precision, reg.check) == ("onnx", "int8", "top-1") and reg.change == pytest.approx(1.0)
    assert (reg.lost, reg.gained, reg.images) == (20, 0, 2000) and reg.p_value == pytest.approx(0.5 ** 20)
    md = markdown.render(new, gate)
    assert "FAILED: 1 regression" in md
    assert "| mobilenetv4_conv_small/onnx/int8 | top-1 | 21.00% | 20.00% | -1.00 pp (" in md
    assert "p=9.5e-07, 20 lost / 0 gained of 2000" in md and "| -0.5 pp | ❌ regression |" in md


def test_gate_catches_agreement_latency_and_missing_cells():
    base = fake_report()
    new = fake_report(agree=0.74, median_ms=0.55 * 1.2)  # agreement -1 point, latency +20%
    new["cells"] = [c for c in new["cells"] if c["precision"] != "fp32"]  # fp32 cell disappeared
    gate = compare_reports(new, base, RegressionThresholds(0.5, None, 0.10))
    failed = {(c.precision, c.check) for c in gate.regressions}
    assert failed == {("int8", "agreement"), ("int8", "latency"), ("fp32", "present")}
    # latency within the limit and a looser agreement limit pass
    assert compare_reports(new, base, RegressionThresholds(0.5, 2.0, 0.25)).regressions[0].check == "present"


def test_parse_percent():
    assert parse_percent("10%") == pytest.approx(0.10) and parse_percent("2.5") == pytest.approx(0.025)
    assert parse_percent("off") is None
    with pytest.raises(UserError, match="percentage"):
        parse_percent("ten")


def test_compare_mode_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from mnv4_deploy.infra.fileio import write_json

    write_json(tmp_path / "base.json", fake_report(top1=0.210))
    write_json(tmp_path / "same.json", fake_report(top1=0.210))
    write_json(tmp_path / "worse.json", fake_report(top1=0.200))
    args = ["report", "--baseline", str(tmp_path / "base.json"), "--max-drop", "0.5", "--max-latency-regression", "10%"]
    assert main(args + ["--compare", str(tmp_path / "same.json")]) == 0
    assert main(args + ["--compare", str(tmp_path / "worse.json"), "--out", str(tmp_path / "cmp")]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 1 regression" in out and "onnx/int8 | top-1" in out
    assert main(args + ["--compare", str(tmp_path / "worse.json"), "--alpha", "1e-9"]) == 0  # not significant
    assert json.loads((tmp_path / "cmp" / "report.json").read_text())["gate"]["passed"] is False
    assert main(["report", "--compare", str(tmp_path / "same.json")]) == 2  # no baseline: user error
    assert main(["report"]) == 2  # neither --model nor --compare


# ---------------------------------------------------------------- HTML and plots


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.external.append(v)


def check_html(text: str, pareto: bool = True) -> _Collector:
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert "script" not in parser.tags and not parser.external  # self-contained
    assert parser.tags.count("svg") >= 4  # accuracy-latency, size, estimated cost, op share, per-layer
    assert "circle" in parser.tags  # one point per artifact
    assert "polyline" in parser.tags or not pareto  # the Pareto front (needs two points on it)
    for svg_text in re.findall(r"<svg.*?</svg>", text, re.S):  # every point inside its plot area
        w, h = (float(v) for v in re.search(r'width="([\d.]+)" height="([\d.]+)"', svg_text).groups())
        for cx, cy in re.findall(r'<circle cx="([-\d.]+)" cy="([-\d.]+)"', svg_text):
            assert svg.LEFT <= float(cx) <= w - svg.RIGHT and svg.TOP <= float(cy) <= h - svg.BOTTOM
    return parser


def test_html_parses_and_holds_the_plots():
    report = fake_report()
    text = page.render(report, compare_reports(report, report, RegressionThresholds()))
    check_html(text)
    assert "Pareto" in text and "ESTIMATED" in text


def test_html_in_a_headless_browser(tmp_path):
    """report.html rendered by a real browser: not blank, the plots drawn (their points in the series colours,
    axis frames), not only parsed."""
    from .browser import colour_mask, not_blank, screenshot

    report = fake_report()
    html = tmp_path / "report.html"
    html.write_text(page.render(report, compare_reports(report, report, RegressionThresholds())))
    img = screenshot(html, tmp_path / "report.png")
    assert not_blank(img) > 0.03, "the page came out (nearly) blank"
    # the size and estimated-cost bars and the op-share strips fill areas in the first three series colours
    # (only the SVG plots use them: tables and text are black and grey)
    drawn = {c: int(colour_mask(img, c).sum()) for c in svg.PALETTE[:3]}
    assert all(n > 1000 for n in drawn.values()), f"plot colours drawn (pixels): {drawn}"


def test_pareto_front():
    assert pareto_front([(1, 50), (2, 60), (3, 55), (0.5, 10)]) == [(0.5, 10), (1, 50), (2, 60)]


def test_roofline_counts_real_layer_shapes():
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                torch.nn.Conv2d(8, 16, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 10))
    layers = roofline.record_layers(model, (1, 3, 8, 8))
    assert [layer.op_type for layer in layers] == ["full conv", "depthwise conv", "pointwise conv", "fully connected"]
    assert [layer.macs for layer in layers] == [64 * 8 * 27, 64 * 8 * 9, 64 * 16 * 8, 16 * 10]
    est = roofline.estimate(layers, ["fp32", "int8"])
    assert est["precisions"]["int8"]["bytes"]["value"] < est["precisions"]["fp32"]["bytes"]["value"]
    rel = est["precisions"]["int8"]["relative_to_fp32"]["value"]
    assert all(0 < r < 1 for r in rel.values())
    for shares in est["precisions"]["int8"]["op_type_share"]["value"].values():
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- the runner, with a stand-in convert


def _fake_convert(calls: list[str], fail: set[str]):
    """A stand-in for pipeline.convert: writes a tiny artifact + manifest per target, fails those in `fail`."""
    from mnv4_deploy.infra.fileio import sha256_of, write_json
    from mnv4_deploy.pipeline import ArtifactResult

    def convert(s: Any, on_target_error: Any = None) -> list[Any]:
        calls.append(f"{s.precision}:{s.targets}")
        results = []
        for target in s.targets.split(","):
            if target in fail:
                on_target_error(target, RuntimeError("converter crashed\nwith details"))
                continue
            folder = Path(s.out) / target
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.onnx").write_bytes(b"artifact " + s.precision.encode())
            m = fake_manifest(target, s.precision)
            m["artifact"].update(size_bytes=10, sha256=sha256_of(folder / "model.onnx"))
            write_json(folder / "manifest.json", m)
            results.append(ArtifactResult(target, s.precision, folder / "model.onnx", folder / "manifest.json", m))
        return results
    return convert


def test_runner_isolates_failures_and_reuses_by_manifest_hash(tmp_path: Path):
    from mnv4_deploy.pipeline import ConvertSettings
    from mnv4_deploy.report.grid import ReportSettings, GridBuilder

    base = ConvertSettings(model="mobilenetv4_conv_small_035", out=tmp_path, targets="onnx", weights="random",
                           progress=False)
    rs = ReportSettings(base, ["fp32", "fp16", "int8"])
    calls: list[str] = []
    cells = GridBuilder(rs, _fake_convert(calls, fail=set())).run()
    assert [c["status"] for c in cells] == ["built", "skipped", "built"] and calls == ["fp32:onnx", "int8:onnx"]
    again = GridBuilder(rs, _fake_convert(calls, fail=set())).run()
    assert [c["status"] for c in again] == ["reused", "skipped", "reused"] and len(calls) == 2
    # a changed recipe changes the hash: rebuilt; a failing target becomes a 'failed' cell, not a crash
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    rs2 = ReportSettings(ConvertSettings(**{**base.__dict__, "recipe": str(tmp_path / "r.yaml")}), ["int8"])
    [failed] = GridBuilder(rs2, _fake_convert(calls, fail={"onnx"})).run()
    assert failed["status"] == "failed" and failed["note"] == "RuntimeError: converter crashed"
    assert failed["model"] == "mobilenetv4_conv_small_035"


# ---------------------------------------------------------------- a real build (onnx, tiny model)

TINY_RECIPE = """\
name: tiny-test
quantization:
  activations:
    observer: minmax
  calibration:
    images: 16
    batch_size: 8
verification:
  images: 16
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("onnxruntime")
    import skimage
    import torch
    from PIL import Image

    from mnv4_deploy.load.models import load_model

    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save(load_model("mobilenetv4_conv_small_035", weights="random", num_classes=4).model.state_dict(), weights)
    val = root / "val"
    data = Path(skimage.__file__).parent / "data"
    for cls, name in enumerate(["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]):
        (val / f"c{cls}").mkdir(parents=True)
        img = Image.open(data / name).convert("RGB")
        for j in range(3):
            s = min(img.size) // (j + 1)
            img.crop((0, 0, s, s)).resize((64, 64)).save(val / f"c{cls}" / f"{j}.png")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = root / "run"
    args = ["report", "--model", "mobilenetv4_conv_small_035", "--weights", str(weights), "--num-classes", "4",
            "--input-size", "64", "--crop-pct", "1.0", "--targets", "onnx", "--precisions", "fp32,fp16,int8",
            "--recipe", str(recipe), "--val", str(val), "--latency-runs", "3", "--no-progress", "--out", str(out)]
    code = main(args)
    return {"code": code, "out": out, "args": args}


def test_build_writes_three_outputs_with_manifest_numbers(built: dict[str, Any]):
    assert built["code"] == 0
    out = built["out"]
    report = load_report(out / "report.json")
    cells = {(c["target"], c["precision"]): c for c in report["cells"]}
    assert cells[("onnx", "fp16")]["status"] == "skipped" and "fp16" in cells[("onnx", "fp16")]["note"]
    for precision in ("fp32", "int8"):
        cell = cells[("onnx", precision)]
        assert cell["status"] == "built"
        manifest = json.loads((out / cell["artifact"]["manifest"]).read_text())
        check_cell_matches_manifest(cell, manifest)
        assert (out / cell["artifact"]["path"]).is_file()
    [section] = report["models"]
    assert section["roofline"]["macs"]["value"] > 0 and report["host"]["cpu_count"]
    assert section["roofline"]["input_size"] == {"value": [64, 64], "source": "--input-size"}
    sens = section["sensitivity"]["layers"]
    # The recipe's quantizers (weights and activations), most sensitive first, from the same recipe as the cells.
    assert {layer["kind"] for layer in sens} == {"weight", "activation"} and sens[0]["sqnr_db"] > 0
    assert [layer["sqnr_db"] for layer in sens] == sorted(layer["sqnr_db"] for layer in sens)
    assert section["sensitivity"]["recipe"] == "tiny-test"
    # int8 against float timed interleaved: onnxruntime's default float is its strict f32
    [speed] = section["speed"]
    assert speed["target"] == "onnx" and speed["strict_f32"]["fp32"]["runs"] >= 3
    assert speed["strict_f32"]["int8_over_float"] == round(
        speed["strict_f32"]["int8"]["median_ms"] / speed["strict_f32"]["fp32"]["median_ms"], 3)
    assert speed["runtime_default"]["float_is"].startswith("fp32")
    md = (out / "report.md").read_text()
    assert "| onnx | int8 | built |" in md and "| onnx | fp16 | skipped |" in md
    assert "int8 / default float" in md
    check_html((out / "report.html").read_text(), pareto=False)


def test_second_run_reuses_artifacts_and_gates_against_first(built: dict[str, Any], tmp_path: Path):
    import shutil

    baseline = tmp_path / "baseline.json"
    shutil.copy(built["out"] / "report.json", baseline)
    code = main(built["args"] + ["--baseline", str(baseline), "--max-latency-regression", "off"])
    assert code == 0
    report = load_report(built["out"] / "report.json")
    assert {c["status"] for c in report["cells"] if c["precision"] != "fp16"} == {"reused"}
    assert report["gate"]["passed"] is True
