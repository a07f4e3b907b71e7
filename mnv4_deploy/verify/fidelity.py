"""Compare an artifact's outputs, run in its real runtime, with the float PyTorch model.

Fidelity numbers (cosine, SQNR, top-1 agreement) need no labels; accuracy needs a labelled folder.
At low accuracy (e.g. 23% top-1 on 202 classes) top-1 moves by about half a point from noise alone,
so agreement with float is the more sensitive number: report both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..load.images import model_input


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
