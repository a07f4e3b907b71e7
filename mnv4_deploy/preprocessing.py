"""Input preprocessing taken from the checkpoint's timm `pretrained_cfg`, never hard-coded.

Some MNv4 tags use Inception mean/std (0.5/0.5), others ImageNet's; all use bicubic resizing.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from .errors import UserError

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


# Calibration (512) and held-back (256) images are decoded to float32 NCHW in memory: 12 MB each at 1024x1024.
MAX_INPUT_SIZE = 1024


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the model's input tensor (NCHW float32)."""

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise UserError(
                f"unknown interpolation '{self.interpolation}': use one of {', '.join(_INTERPOLATIONS)}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise UserError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise UserError("--mean and --std need three numbers each, std > 0 (e.g. --mean 0.5,0.5,0.5)")
        if min(self.input_size) < 16:
            raise UserError(f"input size {self.input_size} is too small for MNv4 (use at least 32)")
        if max(self.input_size) > MAX_INPUT_SIZE:
            raise UserError(f"input size {self.input_size} is larger than the largest supported, {MAX_INPUT_SIZE}: "
                            "calibration and verification keep every image in memory as float32 (768 images at "
                            f"{MAX_INPUT_SIZE}x{MAX_INPUT_SIZE} already take 9.7 GB; MNv4 is trained at 224-448)")

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict[str, Any], **overrides: Any) -> "Preprocessing":
        size = cfg.get("input_size", (3, 224, 224))
        base = cls(
            input_size=(int(size[-2]), int(size[-1])),
            mean=tuple(float(v) for v in cfg.get("mean", cls.mean)),
            std=tuple(float(v) for v in cfg.get("std", cls.std)),
            interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
            crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
        )
        return base.with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> "Preprocessing":
        given = {k: v for k, v in overrides.items() if v is not None}
        if "input_size" in given:
            given["input_size"] = _as_hw(given["input_size"])
        for key in ("mean", "std"):
            if key in given:
                given[key] = tuple(float(v) for v in given[key])
        return replace(self, **given)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, *self.input_size)

    def resize_size(self) -> tuple[int, int]:
        h, w = self.input_size
        return (int(math.floor(h / self.crop_pct)), int(math.floor(w / self.crop_pct)))

    def to_uint8_image(self, img: Image.Image) -> np.ndarray:
        """Resize (shorter side to size/crop_pct), centre-crop, return HWC uint8 RGB."""
        img = img.convert("RGB")
        rh, rw = self.resize_size()
        short = min(rh, rw)
        w, h = img.size
        scale = short / min(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        if new != img.size:
            img = img.resize(new, _INTERPOLATIONS[self.interpolation])
        th, tw = self.input_size
        left = max(0, (img.size[0] - tw) // 2)
        top = max(0, (img.size[1] - th) // 2)
        img = img.crop((left, top, left + tw, top + th))
        return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)

    def normalize(self, hwc_uint8: np.ndarray) -> np.ndarray:
        """HWC uint8 -> CHW float32, scaled to [0,1] then mean/std normalised. The result is a CHW view of HWC
        memory (channels last), the layout PyTorch's CPU convolutions run fastest on (`data.model_input`)."""
        x = hwc_uint8.astype(np.float32).transpose(2, 0, 1) / 255.0
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return (x - mean) / std

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.to_uint8_image(img))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def _as_hw(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    vals = [int(v) for v in value]
    if len(vals) == 1:
        return (vals[0], vals[0])
    if len(vals) == 3:  # timm style (C, H, W)
        vals = vals[1:]
    if len(vals) != 2:
        raise UserError(f"input size must be N or H,W, got {value}")
    return (vals[0], vals[1])


def parse_floats(text: Optional[str], name: str, n: int = 3) -> Optional[Sequence[float]]:
    """Parse '0.5,0.5,0.5' for a CLI option; None passes through."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} must be {n} comma-separated numbers, got '{text}'") from None
    if len(vals) != n:
        raise UserError(f"--{name} must be {n} comma-separated numbers, got '{text}'")
    return vals
