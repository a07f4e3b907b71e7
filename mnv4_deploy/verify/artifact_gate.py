"""The artifact gate: the checks an artifact must pass, in its runtime, to be written (finite outputs, closeness
to float and to the PyTorch simulation, with the recipe's `verification:` thresholds).

Not to be confused with the CI regression gate (report/regression_gate.py), which compares two reports.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from .fidelity import Fidelity
from .significance import wilson_interval


@dataclass
class GateCheck:
    """One verification threshold, applied to one measured number."""

    check: str  # e.g. 'top-1 agreement with float'
    value: float
    threshold: float
    passed: bool
    upper_95: Optional[float] = None  # agreement: the Wilson upper bound the threshold is compared with

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        percent = "agreement" in self.check or self.check.startswith("finite")
        shown = lambda v: f"{100 * v:.2f}%" if percent else f"{v:.4f}"
        bound = "" if self.upper_95 is None else f" (at most {shown(self.upper_95)} at 95% confidence)"
        return f"{self.check} {shown(self.value)}{bound} < {shown(self.threshold)}"


def gate_checks(logits: np.ndarray, vs_float: Fidelity, thresholds: Any,
                vs_simulation: Optional[Fidelity] = None, simulation_thresholds: Any = None) -> list[GateCheck]:
    """The checks an artifact must pass to be written: finite outputs, closeness to float (`thresholds`:
    the recipe's per-precision `min_agreement`/`min_cosine`) and, when given, to the PyTorch simulation."""
    finite = float(np.isfinite(logits).mean()) if logits.size else 0.0
    checks = [GateCheck("finite outputs", finite, 1.0, finite == 1.0)]

    def against(fid: Fidelity, th: Any, what: str) -> None:
        # Agreement is a proportion over the held-back images: it fails only when even its 95% upper bound is
        # below the threshold, so a handful of images cannot fail an artifact on a near-tie. NaN compares
        # False: a non-finite number fails its check too.
        upper = wilson_interval(round(fid.top1_agreement * fid.images), fid.images)[1]
        checks.append(GateCheck(f"top-1 agreement with {what}", fid.top1_agreement, th.min_agreement,
                                bool(upper >= th.min_agreement), round(upper, 5)))
        checks.append(GateCheck(f"cosine with {what}", fid.cosine, th.min_cosine, bool(fid.cosine >= th.min_cosine)))

    against(vs_float, thresholds, "float")
    if vs_simulation is not None:
        against(vs_simulation, simulation_thresholds, "the PyTorch simulation")
    return checks


def gate_record(precision: str, verification: Any, judged: str, entry: dict[str, Any], logits: np.ndarray,
                enforced: bool) -> dict[str, Any]:
    """The manifest's `verification.gate`: one evaluation set's numbers (`judged`: the held-back images; `entry`
    its manifest entry, `logits` the artifact's) against the recipe's `verification:` section for `precision`.
    `enforced`: whether a failure keeps the artifact from being written."""
    sim = entry.get("vs_pytorch_simulation")
    checks = gate_checks(logits, Fidelity(**entry["vs_float"]), getattr(verification, precision),
                         Fidelity(**sim) if sim is not None else None, verification.simulation)
    failed = [c for c in checks if not c.passed]
    return {"passed": not failed, "enforced": enforced, "on": judged,
            "failures": [c.line() for c in failed], "checks": [c.to_dict() for c in checks]}
