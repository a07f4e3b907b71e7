"""Image data for calibration, verification and QAT: folders of images, flat or ImageFolder.

An ImageFolder layout (one sub-folder per class, sorted names = class index, as torchvision and timm do)
also gives labels, so accuracy can be measured. Unreadable files are skipped and counted, never fatal.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .preprocessing import Preprocessing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class ImageSet:
    """A list of image files with optional integer labels (None for a flat folder)."""

    paths: list[Path]
    labels: Optional[list[int]] = None
    classes: Optional[list[str]] = None
    source: str = ""
    skipped_files: int = 0  # non-image files found while scanning

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(
            [self.paths[i] for i in indices],
            [self.labels[i] for i in indices] if self.labels is not None else None,
            self.classes, self.source, self.skipped_files,
        )

    def split(self, first: int, second: int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """Two disjoint random subsets (e.g. calibration and held-back verification images)."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        if len(order) < 2:
            raise UserError(f"{self.source}: need at least 2 images to calibrate and verify, found {len(order)}")
        second = min(second, max(1, len(order) // 4)) if first + second > len(order) else second
        first = min(first, len(order) - second)
        return self.subset(order[:first]), self.subset(order[first:first + second])

    def sample(self, n: int, seed: int = 0) -> "ImageSet":
        if n >= len(self):
            return self
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return self.subset(sorted(order[:n]))


def scan_folder(folder: str | Path, classes: Optional[Sequence[str]] = None) -> ImageSet:
    """Find images in `folder`: ImageFolder (class sub-folders) if it has them, else flat (recursive)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder '{folder}' does not exist or is not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    skipped = 0
    if subdirs:
        names = list(classes) if classes is not None else [d.name for d in subdirs]
        index = {n: i for i, n in enumerate(names)}
        for d in subdirs:
            files, bad = _image_files(d)
            skipped += bad
            if d.name not in index:
                if classes is not None:
                    raise UserError(f"{root}: sub-folder '{d.name}' is not in the class list")
                continue
            paths += files
            labels += [index[d.name]] * len(files)
        loose, bad = _image_files(root, recursive=False)
        skipped += bad
        if loose and not paths:  # images next to unrelated folders: treat as flat
            return ImageSet(loose, None, None, str(root), skipped)
        result = ImageSet(paths, labels, names, str(root), skipped)
    else:
        files, skipped = _image_files(root)
        result = ImageSet(files, None, None, str(root), skipped)
    if not result.paths:
        raise UserError(
            f"no images found in '{folder}' (looked for {', '.join(sorted(IMAGE_SUFFIXES))}; "
            f"{skipped} other files): point --calib/--val at a folder of images"
        )
    return result


def _image_files(folder: Path, recursive: bool = True) -> tuple[list[Path], int]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    files, other = [], 0
    for p in sorted(it):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            other += 1
    return files, other


@dataclass
class LoadedImages:
    """Preprocessed images in memory: float NCHW (normalised) plus the uint8 NHWC they came from."""

    x: np.ndarray  # (N, 3, H, W) float32, normalised
    labels: Optional[np.ndarray]
    unreadable: int = 0
    uint8: Optional[np.ndarray] = field(default=None, repr=False)  # (N, H, W, 3)
    files: Optional[ImageSet] = field(default=None, repr=False)  # the image files these were read from

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size]


def load_images(images: ImageSet, pre: Preprocessing, workers: int = 0, progress: str = "") -> LoadedImages:
    """Decode and preprocess every image (a torch DataLoader with worker processes); skip unreadable ones."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class _Files(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            try:
                with Image.open(images.paths[i]) as img:
                    arr = pre.to_uint8_image(img)
                return torch.from_numpy(arr), (images.labels[i] if images.labels else -1), True
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                h, w = pre.input_size
                return torch.zeros((h, w, 3), dtype=torch.uint8), -1, False

    loader = DataLoader(_Files(), batch_size=64, num_workers=workers, shuffle=False)
    chunks, labels, ok = [], [], []
    for arr, lab, good in _progress(loader, progress, total=len(loader)):
        chunks.append(arr.numpy())
        labels.append(lab.numpy())
        ok.append(good.numpy())
    keep = np.concatenate(ok).astype(bool)
    u8 = np.concatenate(chunks)[keep]
    labs = np.concatenate(labels)[keep] if images.labelled else None
    x = np.stack([pre.normalize(a) for a in u8]) if len(u8) else np.zeros((0, 3, *pre.input_size), np.float32)
    if len(x) == 0:
        raise UserError(f"none of the {len(images)} images in '{images.source}' could be read")
    return LoadedImages(x.astype(np.float32), labs, int((~keep).sum()), u8, images)


def _progress(it, desc: str, total: int):
    if not desc:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, unit="batch")


# ---------------------------------------------------------------- default calibration set
_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "color.png", "brick.png",
                   "gravel.png", "grass.png")


def default_calibration(pre: Preprocessing, n: int = 64, seed: int = 0) -> tuple[LoadedImages, str]:
    """Random crops of the real photographs that scikit-image ships: calibration with no download."""
    try:
        import skimage
    except ImportError:
        raise UserError(
            "no --calib folder given and scikit-image (which ships the default calibration photos) is not "
            "installed: pass --calib DIR or pip install scikit-image"
        ) from None
    folder = Path(skimage.__file__).parent / "data"
    photos = [folder / name for name in _SKIMAGE_PHOTOS if (folder / name).is_file()]
    if not photos:
        raise UserError(f"scikit-image's sample photos are missing from {folder}: pass --calib DIR")
    rng = random.Random(seed)
    h, w = pre.input_size
    out = []
    opened = [Image.open(p).convert("RGB") for p in photos]
    for i in range(n):
        img = opened[i % len(opened)]
        side = int(min(img.size) * rng.uniform(0.25, 1.0))
        left = rng.randint(0, img.size[0] - side)
        top = rng.randint(0, img.size[1] - side)
        crop = img.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(pre.to_uint8_image(crop))
    u8 = np.stack(out)
    x = np.stack([pre.normalize(a) for a in u8]).astype(np.float32)
    return LoadedImages(x, None, 0, u8), f"scikit-image sample photos ({len(photos)} photos, {n} random crops)"
