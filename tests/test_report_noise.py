"""Issue 17: reports that know their noise. The paired gate against hand computations, intervals, refusals of
different image or calibration sets, error bars that never fill their axis, and the zoo's shards and merge.

Everything here is hand-made reports (instant) except one module-scoped build: two models (random weights,
fp32, onnx only, 64x64) built unsharded and as two shards, whose merge must equal the unsharded run.
"""
from __future__ import annotations

import copy
import json
import re
from fractions import Fraction
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnv4_deploy import UserError
from mnv4_deploy.cli import main
from mnv4_deploy.report import markdown, page, svg
from mnv4_deploy.report.grid import merge_reports, parse_shard, shard_of
from mnv4_deploy.report.regression_gate import RegressionThresholds, compare_reports
from mnv4_deploy.report.schema import cell_from_manifest, model_section, new_report
from mnv4_deploy.verify.significance import (holm_significant, mcnemar_drop_pvalue, paired_difference_interval,
                                             smallest_detectable_drop, wilson_interval)
from tests.test_report import fake_manifest, fake_report

N = 2000


def paired_report(correct: np.ndarray, model: str = "m", precision: str = "int8") -> dict[str, Any]:
    """A one-cell report whose val predictions are right exactly where `correct` is (float always right)."""
    labels = np.arange(N) % 10
    pred = np.where(correct, labels, (labels + 1) % 10)
    cell = cell_from_manifest(fake_manifest(precision=precision, preds=(labels, labels, pred)), "built", "a", "b",
                              model=model)
    return new_report([model_section(model, {"name": model, "weights_sha256": "ab"}, {}, None)], [cell], {})


def discordant(lost: int, gained: int, base_right: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and new correctness on N images: `lost` right only in the baseline, `gained` only in the new."""
    base = np.zeros(N, bool)
    base[:base_right] = True
    new = base.copy()
    new[:lost] = False
    new[base_right:base_right + gained] = True
    return base, new


def hand_pvalue(lost: int, gained: int) -> float:
    """P(X >= lost), X ~ Binomial(lost + gained, 1/2), in exact fractions."""
    d = lost + gained
    return float(Fraction(sum(comb(d, k) for k in range(lost, d + 1)), 2 ** d))


# ---------------------------------------------------------------- the paired test (issue 17's numbers)


@pytest.mark.parametrize("lost,gained,flagged", [(90, 50, True), (73, 67, False)])
def test_paired_gate_on_140_discordant_images(lost: int, gained: int, flagged: bool):
    """2,000 images, 140 discordant: a net drop of 40 images (2 points) is flagged, one of 6 (0.3 point) is noise."""
    base, new = discordant(lost, gained)
    gate = compare_reports(paired_report(new), paired_report(base), RegressionThresholds(max_drop=0.0, alpha=0.05))
    top1 = next(c for c in gate.checks if c.check == "top-1")
    assert (top1.lost, top1.gained, top1.images) == (lost, gained, N)
    assert top1.change == pytest.approx(100 * (lost - gained) / N)
    assert top1.p_value == pytest.approx(hand_pvalue(lost, gained), rel=1e-12)
    # Holm over the two tests of the cell (top-1 and agreement with float, which here moves identically)
    assert gate.tests == 2
    assert top1.failed is flagged and gate.passed is not flagged
    # paired 95% interval of the drop: close to the Wald interval sqrt(d - (b - c)^2 / n) / n at this size
    wald = 1.96 * np.sqrt((lost + gained) - (lost - gained) ** 2 / N) / N * 100
    assert top1.ci95[0] == pytest.approx(top1.change - wald, abs=0.1)
    assert top1.ci95[1] == pytest.approx(top1.change + wald, abs=0.1)
    assert top1.within_noise is not flagged
    md = markdown.render(paired_report(new), gate)
    assert ("❌ regression" in md) is flagged and ("ok (within noise)" in md) is not flagged


def test_hand_computed_numbers():
    assert hand_pvalue(90, 50) < 0.001 < 0.3 < hand_pvalue(73, 67) < 0.4
    assert mcnemar_drop_pvalue(90, 50) == pytest.approx(hand_pvalue(90, 50), rel=1e-12)
    # smallest detectable net drop with 140 discordant images at 5%: the first b with P(X >= b) <= 0.05
    b = next(b for b in range(70, 141) if hand_pvalue(b, 140 - b) <= 0.05)
    assert smallest_detectable_drop(140, 0.05) == 2 * b - 140 == 22  # 1.1 points of 2,000 images
    assert smallest_detectable_drop(0, 0.05) == 5  # 0.5^5 = 3.1% <= 5%: five images, all lost
    # Holm: 0.01 <= 0.05/3 and 0.02 <= 0.05/2, then 0.04 <= 0.05; one large p stops the step-down
    assert holm_significant([0.04, 0.01, 0.02], 0.05) == [True, True, True]
    assert holm_significant([0.03, 0.01, 0.02], 0.05) == [True, True, True]
    assert holm_significant([0.01, 0.03, 0.9], 0.05) == [True, False, False]
    # paired interval: zero discordant images give a degenerate difference of zero inside [-1, 1]
    lo, hi = paired_difference_interval(500, 0, 0, 1500)
    assert lo <= 0.0 <= hi and hi - lo < 0.01
    assert wilson_interval(0, 10)[0] == 0.0


def test_identical_rerun_never_regresses():
    rng = np.random.default_rng(0)
    for _ in range(5):
        report = paired_report(rng.random(N) < rng.uniform(0.1, 0.9))
        gate = compare_reports(copy.deepcopy(report), report, RegressionThresholds(max_drop=0.0))
        assert gate.passed and all(c.p_value == 1.0 for c in gate.checks if c.unit == "pp")


def test_holm_correction_counts_every_cell():
    """A drop significant on its own (p ~ 0.02) is not significant once it is one of many tests."""
    base, new = discordant(45, 25)
    assert 0.01 < hand_pvalue(45, 25) < 0.025
    one = compare_reports(paired_report(new), paired_report(base), RegressionThresholds(max_drop=0.5))
    assert not one.passed
    many_new, many_base = paired_report(new), paired_report(base)
    for i in range(9):  # nine more cells that did not change
        extra = paired_report(base, precision="fp32")["cells"][0] | {"model": f"other{i}"}
        many_new["cells"].append(extra)
        many_base["cells"].append(copy.deepcopy(extra))
    many = compare_reports(many_new, many_base, RegressionThresholds(max_drop=0.5))
    assert many.tests == 20 and many.passed
    reg = next(c for c in many.checks if c.check == "top-1" and c.model == "m")
    assert reg.significant is False and reg.detectable > reg.change  # the report says what it could see


def test_different_image_or_calibration_sets_are_refused():
    base, new = paired_report(discordant(0, 0)[0]), paired_report(discordant(0, 0)[0])
    new["cells"][0]["evaluation"]["val"]["image_set"]["digest"] = "sha256:" + "0" * 64
    with pytest.raises(UserError, match=r"val images differ from the baseline's") as err:
        compare_reports(new, base, RegressionThresholds())
    assert "\n" not in str(err.value)
    new = paired_report(discordant(0, 0)[0])
    new["cells"][0]["calibration_set"] = {"name": "a", "digest": "sha256:1", "images": 64}
    base["cells"][0]["calibration_set"] = {"name": "b", "digest": "sha256:2", "images": 64}
    with pytest.raises(UserError, match="calibrated on other images"):
        compare_reports(new, base, RegressionThresholds())


def test_int8_compute_rendered_when_the_manifest_has_it():
    m = fake_manifest()
    m["structure"] = {"int8_compute": {"int8": 52, "total": 58, "float": ["head"]}}
    with_it = cell_from_manifest(m, "built", "a", "b", model="m")
    without = cell_from_manifest(fake_manifest(), "built", "a", "b", model="m")
    header, rows = markdown.cells_rows({"cells": [with_it, without]})
    col = header.index("int8 compute")
    assert [r[col] for r in rows] == ["int8 compute: 52 of 58", "-"]


# ---------------------------------------------------------------- plots


def test_accuracy_plot_has_error_bars_that_do_not_fill_the_axis():
    report = fake_report()
    text = page.render(report)
    [plot] = [s for s in re.findall(r"<svg.*?</svg>", text, re.S) if "Accuracy vs latency" in s]
    bars = re.findall(r'class="errorbar" d="M[-\d.]+,([-\d.]+)V([-\d.]+)', plot)
    assert len(bars) == 2  # fp32 and int8
    height = svg.H - svg.TOP - svg.BOTTOM
    for y0, y1 in bars:
        assert 0 < abs(float(y1) - float(y0)) <= height / 3 + 1  # visible, and at most a third of the axis
        assert svg.TOP <= min(float(y0), float(y1)) and max(float(y0), float(y1)) <= svg.H - svg.BOTTOM
    lo, hi = svg.error_bar_axis([22.9], [22.95])  # the 22.88-22.98 zoom cannot happen
    assert hi - lo >= 1.0


# ---------------------------------------------------------------- zoo: shards and merge


def test_shards_are_a_stable_partition():
    cells = [(m, p, t) for m in ("a", "b") for p in ("fp32", "fp16", "int8") for t in ("onnx", "tflite", "openvino", "coreml")]
    for n in (1, 2, 3, 5, 30):
        parts = [shard_of(cells, (i, n)) for i in range(1, n + 1)]
        assert [c for part in parts for c in part] == cells  # disjoint, complete, in order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [shard_of(list(cells), (i, n)) for i in range(1, n + 1)]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "x", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def _shard(report: dict[str, Any], index: int, count: int, plan: list[str]) -> dict[str, Any]:
    return report | {"shard": {"index": index, "count": count, "plan": plan}}


def test_merge_refuses_mixed_duplicate_or_missing_shards():
    r = fake_report()
    plan = ["mobilenetv4_conv_small/onnx/fp32", "mobilenetv4_conv_small/onnx/fp16", "mobilenetv4_conv_small/onnx/int8"]
    a = _shard(r | {"cells": r["cells"][:2]}, 1, 2, plan)
    b = _shard(r | {"cells": r["cells"][2:], "models": []}, 2, 2, plan)
    merged = merge_reports([b, a], ["b", "a"])
    assert merged["cells"] == r["cells"] and [m["key"] for m in merged["models"]] == ["mobilenetv4_conv_small"]
    with pytest.raises(UserError, match="given twice"):
        merge_reports([a, a], ["a", "a2"])
    with pytest.raises(UserError, match="2/2 missing"):
        merge_reports([a], ["a"])
    with pytest.raises(UserError, match="different runs"):
        merge_reports([a, _shard(b, 2, 3, plan)], ["a", "b"])
    with pytest.raises(UserError, match="not a shard"):
        merge_reports([r, a], ["r", "a"])


def test_zoo_yaml_entries(tmp_path: Path):
    from mnv4_deploy.pipeline import ConvertSettings
    from mnv4_deploy.report.grid import ReportSettings, parse_precisions
    from mnv4_deploy.report.zoo import read_zoo, zoo_settings

    (tmp_path / "zoo.yaml").write_text("models:\n  - model: mobilenetv4_conv_small\n    input_size: 64\n"
                                      "    precisions: fp32,int8\n  - {model: mobilenetv4_conv_small, name: big, "
                                      "input_size: [96, 96], targets: [onnx, tflite]}\n")
    rs = ReportSettings(ConvertSettings(model="", out=tmp_path, targets="onnx", weights="random"), ["fp32"])
    zoo = zoo_settings(read_zoo(str(tmp_path / "zoo.yaml")), rs, parse_precisions)
    assert [z.name for z in zoo] == ["mobilenetv4_conv_small", "big"]
    assert zoo[0].precisions == ["fp32", "int8"] and zoo[0].base.preprocessing["input_size"] == [64]
    assert zoo[1].base.targets == "onnx,tflite" and zoo[1].base.preprocessing["input_size"] == [96, 96]
    (tmp_path / "bad.yaml").write_text("models:\n  - model: x\n    recpie: ptq-int8\n")
    with pytest.raises(UserError, match="unknown key 'recpie'.*recipe"):
        read_zoo(str(tmp_path / "bad.yaml"))


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("onnxruntime")
    from tests.test_report import TINY_RECIPE

    root = tmp_path_factory.mktemp("zoo")
    (root / "tiny.yaml").write_text(TINY_RECIPE)
    val = root / "val"
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    for cls, name in enumerate(["astronaut.png", "coffee.png"]):
        (val / f"c{cls}").mkdir(parents=True)
        img = Image.open(data / name).convert("RGB")
        for j in range(3):
            s = min(img.size) // (j + 1)
            img.crop((0, 0, s, s)).resize((64, 64)).save(val / f"c{cls}" / f"{j}.png")
    args = ["report", "--models", "mobilenetv4_conv_small,mobilenetv4_conv_medium", "--weights", "random",
            "--input-size", "64", "--crop-pct", "1.0", "--targets", "onnx", "--precisions", "fp32",
            "--recipe", str(root / "tiny.yaml"), "--val", str(val), "--latency-runs", "2", "--no-progress"]
    codes = {name: main(args + extra + ["--out", str(root / name)])
             for name, extra in (("all", []), ("s1", ["--shard", "1/2"]), ("s2", ["--shard", "2/2"]))}
    codes["merged"] = main(["report", "--merge", str(root / "s2" / "report.json"), str(root / "s1" / "report.json"),
                            "--out", str(root / "merged"), "--baseline", str(root / "all" / "report.json"),
                            "--max-latency-regression", "off"])
    return {"root": root, "codes": codes}


def _comparable(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell without what is measured anew on every run (wall-clock latency)."""
    cell = copy.deepcopy(cell)
    for key in ("latency_median", "latency_p90"):
        cell["metrics"].pop(key, None)
    return cell


@pytest.mark.slow  # default-suite budget (12 min on 2 cores)
def test_two_shards_merged_equal_one_unsharded_run(zoo_runs: dict[str, Any]):
    root = zoo_runs["root"]
    assert zoo_runs["codes"] == {"all": 0, "s1": 0, "s2": 0, "merged": 0}
    whole = json.loads((root / "all" / "report.json").read_text())
    merged = json.loads((root / "merged" / "report.json").read_text())
    s1 = json.loads((root / "s1" / "report.json").read_text())
    assert [c["model"] for c in s1["cells"]] == ["mobilenetv4_conv_small"]  # one cell per shard
    assert [_comparable(c) for c in merged["cells"]] == [_comparable(c) for c in whole["cells"]]
    assert [m["key"] for m in merged["models"]] == [m["key"] for m in whole["models"]]
    assert all(m["roofline"]["input_size"]["source"] == "--input-size" for m in merged["models"])
    assert merged["gate"]["passed"] and {c["check"] for c in merged["gate"]["checks"]} >= {"top-1", "agreement"}
    html = (root / "merged" / "report.html").read_text()
    assert html.count('<section class="model"') == 2 and html.count('class="errorbar"') == 2
    md = (root / "merged" / "report.md").read_text()
    assert "### mobilenetv4_conv_small" in md and "### mobilenetv4_conv_medium" in md
