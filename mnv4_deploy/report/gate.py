"""The CI regression gate: compare a new report.json with a committed baseline, cell by cell.

A cell (target, precision) regresses when, against the baseline's same cell,
  - val top-1 dropped by more than --max-drop percentage points,
  - top-1 agreement with float dropped by more than --max-agreement-drop points (default: --max-drop),
    on val, or on the held-back images when there is no val set,
  - measured median latency rose by more than --max-latency-regression percent,
  - or the cell was built in the baseline but is missing or failed now.
Latencies are only compared when both are measured (not simulated); a host change is reported as a warning
because latencies from different machines are not comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import UserError
from .schema import value

OK_STATUS = ("built", "reused")


@dataclass(frozen=True)
class Thresholds:
    max_drop: float = 0.5  # percentage points of top-1
    max_agreement_drop: Optional[float] = None  # percentage points; None = same as max_drop
    max_latency_regression: Optional[float] = 0.10  # fraction; None = latency not gated

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


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)

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
                               else round(100 * self.thresholds.max_latency_regression, 3), "unit": "%"}},
            "warnings": self.warnings,
            "checks": [c.__dict__ for c in self.checks],
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


def _key(cell: dict[str, Any]) -> tuple[str, str]:
    return cell["target"], cell["precision"]


def _agreement_key(cell: dict[str, Any]) -> Optional[str]:
    for name in ("val", "held_back"):
        if value(cell, f"{name}.top1_agreement") is not None:
            return f"{name}.top1_agreement"
    return None


def compare_reports(new: dict[str, Any], baseline: dict[str, Any], th: Thresholds) -> GateResult:
    """Every check for every baseline cell; the gate passes when none failed."""
    result = GateResult(thresholds=th)
    if new.get("model", {}).get("weights_sha256") != baseline.get("model", {}).get("weights_sha256"):
        result.warnings.append("the model weights differ from the baseline's (weights_sha256)")
    if new.get("host", {}).get("hostname") != baseline.get("host", {}).get("hostname"):
        result.warnings.append(f"latency measured on another host than the baseline's "
                               f"({new.get('host', {}).get('hostname')} vs {baseline.get('host', {}).get('hostname')}): "
                               "latency comparisons are indicative")
    cells = {_key(c): c for c in new["cells"]}
    for base in baseline["cells"]:
        if base["status"] not in OK_STATUS:
            continue
        t, p = _key(base)
        cur = cells.get((t, p))
        if cur is None or cur["status"] not in OK_STATUS:
            why = "not in the new report" if cur is None else f"{cur['status']}: {cur.get('note', '')}".strip()
            result.checks.append(Check(t, p, "present", None, None, None, None, "", True, why))
            continue
        b1, n1 = value(base, "val.top1"), value(cur, "val.top1")
        if b1 is not None and n1 is not None:
            drop = round(100.0 * (b1 - n1), 3)
            result.checks.append(Check(t, p, "top-1", 100 * b1, 100 * n1, drop, th.max_drop, "pp", drop > th.max_drop))
        key = _agreement_key(base)
        if key and value(cur, key) is not None:
            ba, na = value(base, key), value(cur, key)
            drop = round(100.0 * (ba - na), 3)
            result.checks.append(Check(t, p, "agreement", 100 * ba, 100 * na, drop, th.agreement, "pp",
                                       drop > th.agreement, key.split(".")[0]))
        bl, nl = base["metrics"].get("latency_median"), cur["metrics"].get("latency_median")
        if bl and nl:
            both_measured = bl["method"] == nl["method"] == "measured"
            change = round(100.0 * (nl["value"] / bl["value"] - 1.0), 2) if bl["value"] else None
            limit = th.max_latency_regression
            failed = bool(both_measured and limit is not None and change is not None and change > 100 * limit)
            note = "" if both_measured else "simulated: not gated"
            result.checks.append(Check(t, p, "latency", bl["value"], nl["value"], change,
                                       None if limit is None else 100 * limit, "%", failed, note))
    known = {_key(c) for c in baseline["cells"]}
    new_cells = [f"{t}/{p}" for (t, p), c in cells.items() if (t, p) not in known and c["status"] in OK_STATUS]
    if new_cells:
        result.warnings.append(f"cells without a baseline (not gated): {', '.join(new_cells)}")
    return result
