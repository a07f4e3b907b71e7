"""Compare an artifact's outputs, run in its real runtime, with the float PyTorch model.

Fidelity numbers (cosine, SQNR, top-1 agreement) need no labels; accuracy needs a labelled folder.
At low accuracy (e.g. 23% top-1 on 202 classes) top-1 moves by about half a point from noise alone,
so agreement with float is the more sensitive number: report both.
"""
from __future__ import annotations

import base64
import hashlib
import math
import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .data import model_input


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
        return run_batched(lambda b: model(model_input(b)).numpy(), x, batch_size)


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
    threads: Any = None  # the runtime's intra-op threads, or what decides them
    input_shape: Optional[list[int]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(fn: Callable[[np.ndarray], Any], x: np.ndarray, warmup: int = 5, runs: int = 30,
                    threads: Any = None) -> Latency:
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
                   runs, threads, list(x.shape))


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


# ---------------------------------------------------------------- sampling noise of accuracy numbers
# An accuracy is a proportion over a finite image set, so every number the toolkit prints comes with its sample
# size and a 95% interval; two artifacts evaluated on the same images are compared image by image (paired),
# which is far more sensitive than comparing two independent proportions.


def paired_counts(first_ok: np.ndarray, second_ok: np.ndarray) -> tuple[int, int, int, int]:
    """(both right, only first right, only second right, both wrong) over the same images."""
    a, b = np.asarray(first_ok, bool), np.asarray(second_ok, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same images: {a.shape} vs {b.shape}")
    return int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum())


def paired_difference_interval(both: int, first_only: int, second_only: int, neither: int,
                               z: float = 1.96) -> tuple[float, float]:
    """95% interval of p_first - p_second for paired proportions (Newcombe 1998, method 10: built from the two
    Wilson intervals and the pairing correlation), so it stays inside [-1, 1] and honest at 0 discordant."""
    n = both + first_only + second_only + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson_interval(both + first_only, n, z)
    l2, u2 = wilson_interval(both + second_only, n, z)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    phi = (both * neither - first_only * second_only) / float(np.sqrt(margins)) if margins else 0.0
    theta = p1 - p2
    lo = theta - float(np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)))
    hi = theta + float(np.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)))
    return max(-1.0, lo), min(1.0, hi)


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic: no tail underflow at large n)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def mcnemar_drop_pvalue(lost: int, gained: int) -> float:
    """One-sided exact McNemar test that a change lost more images than it gained: of the `lost + gained`
    discordant images, under 'no change' each is equally likely to go either way."""
    return binomial_tail(lost, lost + gained)


def smallest_detectable_drop(discordant: int, alpha: float) -> int:
    """The smallest net loss (lost - gained, in images) that the one-sided exact test calls significant at
    `alpha` when `discordant` images changed; with too few discordant images, the net loss that would need
    every one of them to go the same way."""
    for lost in range((discordant + 1) // 2, discordant + 1):
        if mcnemar_drop_pvalue(lost, discordant - lost) <= alpha:
            return 2 * lost - discordant
    return max(1, math.ceil(math.log2(1.0 / alpha))) if alpha > 0 else discordant + 1


def holm_significant(pvalues: Sequence[float], alpha: float) -> list[bool]:
    """Holm's step-down correction: which of `pvalues` stay significant at family-wise level `alpha`."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        out[i] = True
    return out


# ---------------------------------------------------------------- per-image predictions, stored compactly


def encode_classes(values: np.ndarray) -> dict[str, Any]:
    """Class indices as zlib + base64 of the narrowest unsigned dtype: ~1-2 bytes per image in report.json."""
    arr = np.asarray(values).astype(np.int64).ravel()
    top = int(arr.max()) if arr.size else 0
    if arr.size and int(arr.min()) < 0:
        raise ValueError("class indices must be >= 0")
    dtype = "uint8" if top < 2 ** 8 else "uint16" if top < 2 ** 16 else "uint32"
    data = base64.b64encode(zlib.compress(arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes(), 9)).decode()
    return {"encoding": "zlib+base64", "dtype": dtype, "count": int(arr.size), "data": data}


def decode_classes(enc: dict[str, Any]) -> np.ndarray:
    """The class indices encode_classes stored; ValueError for data that is not such an encoding (decompressed
    no further than the stated count needs, so an edited file cannot unpack gigabytes)."""
    dtype = np.dtype(enc["dtype"]).newbyteorder("<")
    raw = zlib.decompressobj().decompress(base64.b64decode(enc["data"], validate=True), dtype.itemsize * enc["count"] + 1)
    if len(raw) % dtype.itemsize:
        raise ValueError(f"stored predictions are {len(raw)} bytes, not a whole number of {enc['dtype']}")
    arr = np.frombuffer(raw, dtype).astype(np.int64)
    if len(arr) != enc["count"]:
        raise ValueError(f"stored predictions hold {len(arr)} images, expected {enc['count']}")
    return arr


def image_set_digest(images: Any) -> str:
    """Identity of an evaluation set (which images, in which order, with which labels): paired comparisons are
    only meaningful on the same set. Files are named relative to their folder so CI checkouts in other places
    agree; sets without files (the default scikit-image crops) are identified by their pixels."""
    cached = getattr(images, "_mnv4_digest", None)
    if cached:
        return cached
    h = hashlib.sha256()
    files = getattr(images, "files", None)
    labels = getattr(images, "labels", None)
    if files is not None and len(files) == len(images.x):
        root = Path(files.source) if files.source else None
        for i, path in enumerate(files.paths):
            path = Path(path)
            try:
                name = path.relative_to(root).as_posix() if root else path.name
            except ValueError:
                name = path.name
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            h.update(b"" if labels is None else str(int(labels[i])).encode())
    else:
        h.update(np.ascontiguousarray(images.uint8 if getattr(images, "uint8", None) is not None else images.x))
        if labels is not None:
            h.update(np.asarray(labels, np.int64).tobytes())
    digest = "sha256:" + h.hexdigest()
    try:
        images._mnv4_digest = digest  # computed once per set, shared by every target
    except AttributeError:
        pass
    return digest


def evaluation_record(logits: np.ndarray, float_logits: np.ndarray, images: Any) -> dict[str, Any]:
    """What a manifest keeps beside an evaluation set's numbers so reports can judge noise later: the image
    set's digest, per-image top-1 (artifact, float, labels), and 95% intervals of every accuracy number."""
    n = len(logits)
    pred, ref = np.asarray(logits).reshape(n, -1).argmax(1), np.asarray(float_logits).reshape(n, -1).argmax(1)
    labels = getattr(images, "labels", None)
    agree = int((pred == ref).sum())
    ci: dict[str, Any] = {"top1_agreement": list(wilson_interval(agree, n))}
    if labels is not None:
        lab = np.asarray(labels)
        ok, ref_ok = pred == lab, ref == lab
        top5 = int((np.argsort(-np.asarray(logits).reshape(n, -1), 1)[:, :5] == lab[:, None]).any(1).sum())
        ci["top1"] = list(wilson_interval(int(ok.sum()), n))
        ci["top5"] = list(wilson_interval(top5, n))
        ci["reference_top1"] = list(wilson_interval(int(ref_ok.sum()), n))
        # float top-1 minus the artifact's top-1 on the same images (a drop is positive)
        ci["top1_drop"] = list(paired_difference_interval(*paired_counts(ref_ok, ok)))
    return {
        "image_set": {"digest": image_set_digest(images), "images": n},
        "predictions": {"top1": encode_classes(pred), "float_top1": encode_classes(ref),
                        "labels": None if labels is None else encode_classes(np.asarray(labels))},
        "ci95": {"level": 0.95, "method": "Wilson score; paired differences: Newcombe (method 10)", "n": n} | ci,
    }
