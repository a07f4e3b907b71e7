"""The CI regression gate: compare a new report.json with a committed baseline, cell by cell.

Accuracy is judged on the same images, image by image. For a cell's val top-1 and its top-1 agreement with
float (on val, or on the held-back images when there is no val set), the images one run got right and the
other wrong (the discordant ones) decide: under "nothing changed" each is equally likely to go either way, so
the one-sided exact McNemar (binomial) test says how surprising the net loss is. A check regresses only when
the drop is both larger than its threshold (--max-drop / --max-agreement-drop, points) and significant at
--alpha after Holm's correction over every accuracy test of the run (more cells, more chances of a fluke).
Each check also states the smallest drop these images could have detected at that level, so a gate that
cannot see a 0.5 point change says so instead of passing quietly.

Comparisons only make sense on the same evaluation images and the same calibration images: a cell whose
image-set digest or calibration-set digest differs from the baseline's is refused with one line.
Latency: a cell regresses when its measured median rose by more than --max-latency-regression; latencies are
compared only when both are measured (not simulated), and a host change is reported as a warning.
A cell built in the baseline but missing or failed now regresses too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from ..verify import (decode_classes, holm_significant, mcnemar_drop_pvalue, paired_counts,
                      paired_difference_interval, smallest_detectable_drop)
from .schema import cell_id

OK_STATUS = ("built", "reused")


@dataclass(frozen=True)
class Thresholds:
    max_drop: float = 0.5  # percentage points of top-1
    max_agreement_drop: Optional[float] = None  # percentage points; None = same as max_drop
    max_latency_regression: Optional[float] = 0.10  # fraction; None = latency not gated
    alpha: float = 0.05  # family-wise significance level of the paired tests (Holm-corrected)

    @property
    def agreement(self) -> float:
        return self.max_drop if self.max_agreement_drop is None else self.max_agreement_drop


@dataclass
class Check:
    target: str
    precision: str
    check: str  # 'top-1', 'agreement', 'latency', 'present'
    baseline: Optional[float]
    new: Optional[float]
    change: Optional[float]  # points for accuracy (positive = worse), percent for latency (positive = slower)
    limit: Optional[float]
    unit: str
    failed: bool
    note: str = ""
    model: str = ""
    # paired accuracy checks only:
    images: Optional[int] = None
    lost: Optional[int] = None  # images the baseline got right and the new run wrong
    gained: Optional[int] = None  # the other way round
    ci95: Optional[list[float]] = None  # 95% interval of the drop, points (Newcombe paired)
    p_value: Optional[float] = None  # one-sided exact McNemar: P(a net loss this large | no change)
    significant: Optional[bool] = None  # after Holm's correction
    detectable: Optional[float] = None  # smallest drop (points) significant at alpha/m with these images

    @property
    def cell(self) -> str:
        return f"{self.model}/{self.target}/{self.precision}" if self.model else f"{self.target}/{self.precision}"

    @property
    def within_noise(self) -> bool:
        return self.ci95 is not None and self.ci95[0] <= 0.0 <= self.ci95[1]


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    tests: int = 0  # paired accuracy tests the alpha is shared among

    @property
    def regressions(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "thresholds": {"max_drop": {"value": self.thresholds.max_drop, "unit": "percentage points"},
                           "max_agreement_drop": {"value": self.thresholds.agreement, "unit": "percentage points"},
                           "max_latency_regression": {
                               "value": None if self.thresholds.max_latency_regression is None
                               else round(100 * self.thresholds.max_latency_regression, 3), "unit": "%"},
                           "alpha": {"value": self.thresholds.alpha, "unit": "probability",
                                     "how": f"family-wise, Holm over {self.tests} paired test(s)"}},
            "test": "one-sided exact McNemar (binomial on the discordant images), Holm-corrected",
            "warnings": self.warnings,
            "checks": [c.__dict__ | {"cell": c.cell, "within_noise": c.within_noise} for c in self.checks],
        }


def parse_percent(text: Optional[str]) -> Optional[float]:
    """'10%' or '10' -> 0.10; 'off' -> None (latency not gated)."""
    if text is None or text.strip().lower() in ("off", "none"):
        return None
    try:
        pct = float(text.strip().rstrip("%"))
    except ValueError:
        raise UserError(f"--max-latency-regression must be a percentage like 10% (or 'off'), got '{text}'") from None
    if pct < 0:
        raise UserError(f"--max-latency-regression must be >= 0%, got '{text}'")
    return pct / 100.0


def _short(digest: Any) -> str:
    return str(digest).removeprefix("sha256:")[:12]


def _eval(cell: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    return (cell.get("evaluation") or {}).get(name)


def _same_images(new: dict[str, Any], base: dict[str, Any], name: str) -> None:
    """Refuse a paired comparison on different images (or different calibration images)."""
    a, b = _eval(new, name)["image_set"], _eval(base, name)["image_set"]
    if a["digest"] != b["digest"] or a["images"] != b["images"]:
        raise UserError(f"cannot gate {cell_id(new)}: its {name} images differ from the baseline's (image-set "
                        f"{_short(a['digest'])}, {a['images']} images vs {_short(b['digest'])}, {b['images']}): "
                        "rebuild both with the same --val/--val-limit/--calib")


def _same_calibration(new: dict[str, Any], base: dict[str, Any]) -> None:
    a, b = new.get("calibration_set"), base.get("calibration_set")
    if a and b and a.get("digest") != b.get("digest"):
        raise UserError(f"cannot gate {cell_id(new)}: calibrated on other images than the baseline "
                        f"({a.get('name')} {_short(a.get('digest'))} vs {b.get('name')} {_short(b.get('digest'))}): "
                        "rebuild both with the same calibration set")


def _correct(cell: dict[str, Any], name: str, check: str) -> Optional[np.ndarray]:
    """Per image: right (top-1 vs labels) or agreeing with float (agreement), from the stored predictions."""
    ev = _eval(cell, name)
    if ev is None:
        return None
    pred = ev["predictions"]
    top1 = decode_classes(pred["top1"])
    if check == "top-1":
        return None if pred.get("labels") is None else top1 == decode_classes(pred["labels"])
    return top1 == decode_classes(pred["float_top1"])


def _paired_check(new: dict[str, Any], base: dict[str, Any], check: str, limit: float) -> Optional[Check]:
    """The paired numbers of one accuracy check (verdict later, once every test's p-value is known)."""
    names = ("val",) if check == "top-1" else ("val", "held_back")
    for name in names:
        if _eval(new, name) is None or _eval(base, name) is None:
            continue
        _same_images(new, base, name)
        b_ok, n_ok = _correct(base, name, check), _correct(new, name, check)
        if b_ok is None or n_ok is None:
            continue
        both, lost, gained, neither = paired_counts(b_ok, n_ok)
        n = len(b_ok)
        lo, hi = paired_difference_interval(both, lost, gained, neither)
        return Check(new["target"], new["precision"], check, round(100 * float(b_ok.mean()), 3),
                     round(100 * float(n_ok.mean()), 3), round(100.0 * (lost - gained) / n, 3), limit, "pp", False,
                     "" if check == "top-1" else name, new.get("model", ""), n, lost, gained,
                     [round(100 * lo, 3), round(100 * hi, 3)], mcnemar_drop_pvalue(lost, gained))
    return None


def compare_reports(new: dict[str, Any], baseline: dict[str, Any], th: Thresholds) -> GateResult:
    """Every check for every baseline cell; the gate passes when none failed."""
    result = GateResult(thresholds=th)
    new_models = {m["key"]: m for m in new.get("models", [])}
    for m in baseline.get("models", []):
        cur = new_models.get(m["key"])
        if cur is not None and cur.get("model", {}).get("weights_sha256") != m.get("model", {}).get("weights_sha256"):
            result.warnings.append(f"{m['key']}: the model weights differ from the baseline's (weights_sha256)")
    hosts = lambda r: sorted({c.get("host") or r.get("host", {}).get("hostname") for c in r["cells"]} - {None})
    if hosts(new) != hosts(baseline):
        result.warnings.append(f"latency measured on other hosts than the baseline's ({', '.join(hosts(new))} vs "
                               f"{', '.join(hosts(baseline))}): latency comparisons are indicative")
    cells = {cell_id(c): c for c in new["cells"]}
    paired: list[Check] = []
    for base in baseline["cells"]:
        if base["status"] not in OK_STATUS:
            continue
        cid = cell_id(base)
        cur = cells.get(cid)
        if cur is None or cur["status"] not in OK_STATUS:
            why = "not in the new report" if cur is None else f"{cur['status']}: {cur.get('note', '')}".strip()
            result.checks.append(Check(base["target"], base["precision"], "present", None, None, None, None, "",
                                       True, why, base.get("model", "")))
            continue
        _same_calibration(cur, base)
        for check, limit in (("top-1", th.max_drop), ("agreement", th.agreement)):
            if not cur.get("evaluation") or not base.get("evaluation"):
                raise UserError(f"cannot gate {cid}: a report has no per-image predictions for it: regenerate "
                                "both reports with this version of `mnv4-deploy report`")
            c = _paired_check(cur, base, check, limit)
            if c is not None:
                paired.append(c)
                result.checks.append(c)
        bl, nl = base["metrics"].get("latency_median"), cur["metrics"].get("latency_median")
        if bl and nl:
            both_measured = bl["method"] == nl["method"] == "measured"
            change = round(100.0 * (nl["value"] / bl["value"] - 1.0), 2) if bl["value"] else None
            limit = th.max_latency_regression
            failed = bool(both_measured and limit is not None and change is not None and change > 100 * limit)
            note = "" if both_measured else "not measured in the real runtime: not gated"
            result.checks.append(Check(cur["target"], cur["precision"], "latency", bl["value"], nl["value"], change,
                                       None if limit is None else 100 * limit, "%", failed, note, cur.get("model", "")))
    result.tests = len(paired)
    significant = holm_significant([c.p_value for c in paired], th.alpha)
    for c, sig in zip(paired, significant):
        c.significant = sig
        c.failed = bool(sig and c.change > c.limit)
        # Holm's strictest level is alpha/m: a drop this large is flagged whatever the other tests say
        k = smallest_detectable_drop(c.lost + c.gained, th.alpha / len(paired))
        c.detectable = round(100.0 * k / c.images, 3) if k <= c.images else None  # None: too few images for any
    known = {cell_id(c) for c in baseline["cells"]}
    new_cells = [k for k, c in cells.items() if k not in known and c["status"] in OK_STATUS]
    if new_cells:
        result.warnings.append(f"cells without a baseline (not gated): {', '.join(new_cells)}")
    return result
