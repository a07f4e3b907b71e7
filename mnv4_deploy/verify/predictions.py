"""What a manifest keeps beside an evaluation set's numbers so that reports can judge noise later: the image
set's digest, per-image top-1 classes (stored compactly) and 95% intervals of every accuracy number."""
from __future__ import annotations

import base64
import hashlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .significance import paired_counts, paired_difference_interval, wilson_interval


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
