"""Activation-range observers for PT2E calibration that resist outliers.

MNv4 activations have rare, extreme values: a range taken from the min/max over all calibration images
(MinMaxObserver), or a histogram whose bins stretch to cover them (HistogramObserver), wastes most of the
int8 grid. Measured on the reference conv_small checkpoint over three calibration draws, top-1 agreement
with float was 58-82% (min-max) and 62-84% (histogram) but 93-94% with per-batch statistics averaged
over batches. These observers compute a statistic per calibration batch and average it, so one
unlucky image cannot set the range.
"""
from __future__ import annotations

import functools

import torch
from torchao.quantization.pt2e.observer import MinMaxObserver

_MAX_SAMPLES = 1 << 20  # quantile/MSE on at most this many values per batch (a random subset)


class _BatchAveragedObserver(MinMaxObserver):
    """Keeps the running mean of a per-batch (low, high) statistic in min_val/max_val."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("batches", torch.tensor(0, dtype=torch.long))

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().to(self.min_val.dtype if self.min_val.is_floating_point() else torch.float32)
        x = _sample(x) if x.numel() > _MAX_SAMPLES else x.flatten()
        low, high = self.batch_range(x)
        n = int(self.batches)
        if n == 0:
            self.min_val.resize_(low.shape).copy_(low)
            self.max_val.resize_(high.shape).copy_(high)
        else:
            self.min_val.copy_(self.min_val + (low - self.min_val) / (n + 1))
            self.max_val.copy_(self.max_val + (high - self.max_val) / (n + 1))
        self.batches += 1
        return x_orig


def _sample(x: torch.Tensor) -> torch.Tensor:
    """The random subset of `x`'s elements the statistics are computed on: `_MAX_SAMPLES` positions of its
    row-major (NCHW) order drawn with seed 0, read straight from memory whatever the layout (channels-last
    activations would otherwise be copied whole to flatten them). The statistics depend on which elements,
    not on their order."""
    in_memory = x.permute(*sorted(range(x.dim()), key=lambda d: -x.stride(d)))  # outermost dimension first
    if not in_memory.is_contiguous():  # overlapping or gapped strides: lay it out first
        x = in_memory = x.contiguous()
    flat = in_memory.reshape(-1)  # a view: the elements as they lie in memory
    return flat.index_select(0, _sample_offsets(tuple(x.shape), tuple(x.stride()), x.device))


@functools.lru_cache(maxsize=64)
def _sample_offsets(shape: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Memory offsets of the sampled elements, sorted (a gather in memory order is 4-5x faster at 224x224);
    drawn once per shape and layout (the draw costs as much as the statistic)."""
    g = torch.Generator(device=device)
    g.manual_seed(0)
    numel = int(torch.tensor(shape).prod())
    logical = torch.randint(0, numel, (_MAX_SAMPLES,), generator=g, device=device)
    offsets = torch.zeros_like(logical)
    for size, stride in zip(reversed(shape), reversed(strides)):
        offsets += (logical % size) * stride
        logical = logical // size
    return offsets.sort().values


class MeanMinMaxObserver(_BatchAveragedObserver):
    """Mean over batches of each batch's min and max."""

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.aminmax(x)


class PercentileObserver(_BatchAveragedObserver):
    """Mean over batches of each batch's low/high percentile (clips the rarest values)."""

    def __init__(self, *args, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.percentile = percentile

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # topk is linear-time; torch.quantile sorts the whole tensor.
        k = max(1, int(round(x.numel() * (1.0 - self.percentile / 100.0))))
        high = torch.topk(x, k).values[-1]
        low = torch.topk(x, k, largest=False).values[-1]  # no negated copy of x: 3x faster on 1M values
        return low, high


class MSEObserver(_BatchAveragedObserver):
    """Per batch, the clipping range (a shrink of min/max) with the least int8 quantization MSE."""

    def __init__(self, *args, candidates: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.candidates = candidates

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.aminmax(x)
        lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
        levels = self.quant_max - self.quant_min
        best, best_err = (lo, hi), None
        for frac in torch.linspace(0.2, 1.0, self.candidates):
            a, b = lo * frac, hi * frac
            scale = torch.clamp((b - a) / levels, min=1e-12)
            zp = torch.round(-a / scale)
            q = torch.clamp(torch.round(x / scale) + zp, 0, levels)
            err = torch.mean(((q - zp) * scale - x) ** 2)
            if best_err is None or err < best_err:
                best, best_err = (a, b), err
        return best


class KLObserver(MinMaxObserver):
    """TensorRT-style entropy calibration: the clipping threshold whose int8 histogram loses least information.

    A histogram of |x| is accumulated over all calibration batches (2048 bins; the range doubles, merging bin
    pairs, when a batch exceeds it). At the end, each candidate threshold T (bin 128 or more) is scored by the
    KL divergence between the clipped reference distribution P (outliers folded into the last bin) and Q,
    P squeezed into the int8 levels that cover [0, T] and expanded back. Unlike a percentile, the clip adapts
    to each tensor's shape: heavy-tailed activations get clipped hard, compact ones keep their full range.
    Non-negative tensors (after ReLU) use all 256 levels on [0, T]; signed ones 128 per side. Exact zeros are
    left out of the histogram: they quantize exactly, and as a spike in the first bin they drive T far too low
    (measured on the reference checkpoint: 20% top-1 agreement with them, see bench/bench_recipes.py without).
    """

    BINS = 2048

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("histogram", torch.zeros(self.BINS, dtype=torch.float64))
        self.register_buffer("hist_max", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("seen_min", torch.tensor(float("inf")))
        self.register_buffer("seen_max", torch.tensor(float("-inf")))
        self.fitted = False  # min_val/max_val hold the KL threshold (set on the first calculate_qparams)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float()
        lo, hi = torch.aminmax(x)
        self.seen_min.copy_(torch.minimum(self.seen_min, lo))
        self.seen_max.copy_(torch.maximum(self.seen_max, hi))
        a = x.abs().flatten()
        a = a[a > 0]  # exact zeros (half of every ReLU output) are exact in int8; as a spike they bias KL to tiny T
        top = float(a.max()) if a.numel() else 0.0
        if top <= 0:
            return x_orig
        if float(self.hist_max) == 0:
            self.hist_max.fill_(top)
        while top > float(self.hist_max):  # double the range: merge bin pairs into the lower half
            merged = self.histogram.view(self.BINS // 2, 2).sum(1)
            self.histogram.zero_()
            self.histogram[: self.BINS // 2] = merged
            self.hist_max.mul_(2)
        self.histogram += torch.histc(a, self.BINS, 0.0, float(self.hist_max)).double()
        self.fitted = False
        return x_orig

    @torch.jit.export
    def calculate_qparams(self):  # type: ignore[override]
        if not self.fitted and float(self.hist_max) > 0:
            signed = float(self.seen_min) < 0
            t = kl_threshold(self.histogram, float(self.hist_max), 128 if signed else 256)
            lo = max(float(self.seen_min), -t) if signed else 0.0
            self.min_val.resize_(()).fill_(lo)
            self.max_val.resize_(()).fill_(min(float(self.seen_max), t))
            self.fitted = True
        return self._calculate_qparams(self.min_val, self.max_val)


def kl_threshold(histogram: torch.Tensor, hist_max: float, levels: int, stride: int = 16) -> float:
    """The threshold (in x units) minimising KL(P || Q) over candidate bin counts, TensorRT's entropy method."""
    import numpy as np

    hist = histogram.cpu().numpy().astype(np.float64)
    nbins = len(hist)
    last = int(np.nonzero(hist)[0].max()) + 1 if hist.any() else nbins
    best_i, best_kl = nbins, float("inf")
    for i in list(range(levels, last, stride)) + [max(levels, last)]:
        if i > nbins:
            break
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
        ref = hist[:i]
        # Q: the first i bins merged into `levels` groups, each group's mass spread over its non-empty bins.
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        nonzero = (ref > 0).astype(np.float64)
        mass = np.bincount(groups, weights=ref, minlength=levels)
        count = np.bincount(groups, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, mass[groups] / np.maximum(count[groups], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return (best_i + 0.5) * hist_max / nbins if best_i < nbins else hist_max
