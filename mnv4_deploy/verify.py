"""Compare an artifact's outputs, run in its real runtime, with the float PyTorch model.

Fidelity numbers (cosine, SQNR, top-1 agreement) need no labels; accuracy needs a labelled folder.
At low accuracy (e.g. 23% top-1 on 202 classes) top-1 moves by about half a point from noise alone,
so agreement with float is the more sensitive number: report both.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn


@dataclass
class Fidelity:
    images: int
    cosine: float  # mean per-image cosine similarity of logits
    sqnr_db: float  # 10*log10(signal power / error power) over all logits
    top1_agreement: float  # fraction of images where argmax matches the reference
    top1: Optional[float] = None  # accuracy when labels exist
    top5: Optional[float] = None
    reference_top1: Optional[float] = None
    max_abs_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 64,
                max_batch: Optional[int] = None) -> np.ndarray:
    bs = min(batch_size, max_batch) if max_batch else batch_size
    return np.concatenate([np.asarray(fn(x[i:i + bs]), np.float32) for i in range(0, len(x), bs)])


def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    with torch.no_grad():
        return run_batched(lambda b: model(torch.from_numpy(b)).numpy(), x, batch_size)


def compare(candidate: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray] = None) -> Fidelity:
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    num = (cand * ref).sum(1)
    den = np.linalg.norm(cand, axis=1) * np.linalg.norm(ref, axis=1)
    cosine = float(np.mean(num / np.maximum(den, 1e-30)))
    noise = float(((cand - ref) ** 2).sum())
    signal = float((ref ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)
    agree = float((cand.argmax(1) == ref.argmax(1)).mean())
    fid = Fidelity(len(cand), round(cosine, 6), round(sqnr, 3), round(agree, 5),
                   max_abs_error=float(np.abs(cand - ref).max()))
    if labels is not None:
        fid.top1 = round(float((cand.argmax(1) == labels).mean()), 5)
        fid.top5 = round(float((np.argsort(-cand, 1)[:, :5] == labels[:, None]).any(1).mean()), 5)
        fid.reference_top1 = round(float((ref.argmax(1) == labels).mean()), 5)
    return fid


@dataclass
class Latency:
    batch: int
    median_ms: float
    p90_ms: float
    runs: int
    threads: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(fn: Callable[[np.ndarray], Any], x: np.ndarray, warmup: int = 5, runs: int = 30,
                    threads: Optional[int] = None) -> Latency:
    """Wall-clock latency of one call on `x` (after warm-up): median and p90 in milliseconds."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return Latency(len(x), round(statistics.median(times), 4), round(times[int(0.9 * (len(times) - 1))], 4),
                   runs, threads)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion: honest at small n and near 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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
