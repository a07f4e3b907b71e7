"""Image data for calibration, verification and QAT: folders of images, flat or ImageFolder.

An ImageFolder layout (one sub-folder per class, sorted names = class index, as torchvision and timm do)
also gives labels, so accuracy can be measured. Unreadable files are skipped and counted, never fatal.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .preprocessing import Preprocessing
from .stages import stage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class ImageSet:
    """A list of image files with optional integer labels (None for a flat folder)."""

    paths: list[Path]
    labels: Optional[list[int]] = None
    classes: Optional[list[str]] = None
    source: str = ""
    skipped_files: int = 0  # non-image files found while scanning
    found: int = 0  # image files the scan found (a subset keeps the folder's count, for messages)
    links_out: int = 0  # symbolic links leading out of the folder, not followed

    def __post_init__(self) -> None:
        self.found = self.found or len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(
            [self.paths[i] for i in indices],
            [self.labels[i] for i in indices] if self.labels is not None else None,
            self.classes, self.source, self.skipped_files, self.found, self.links_out,
        )

    def split(self, first: int, second: int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """Two disjoint random subsets (e.g. calibration and held-back verification images)."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        if len(order) < 2:
            found, any_bad = _found_and_unreadable(self.paths)
            fix = "replace the unreadable files and add images" if any_bad else "add images to the folder"
            raise UserError(f"{self.source}: need at least 2 readable images to calibrate and verify; {found}: {fix}")
        second = min(second, max(1, len(order) // 4)) if first + second > len(order) else second
        first = min(first, len(order) - second)
        return self.subset(order[:first]), self.subset(order[first:first + second])

    def sample(self, n: int, seed: int = 0) -> "ImageSet":
        if n >= len(self):
            return self
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return self.subset(sorted(order[:n]))


def scan_folder(folder: str | Path, classes: Optional[Sequence[str]] = None,
                labels_file: Optional[str | Path] = None) -> ImageSet:
    """Find images in `folder`: ImageFolder (class sub-folders) if it has them, else flat (recursive).

    `labels_file`: a ground-truth file for a flat folder (ImageNet's flat val folder), see read_val_labels.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder '{folder}' does not exist or is not a directory")
    if labels_file is not None:
        return _labelled_flat_folder(root, Path(labels_file).expanduser())
    walk = _Walk(root)
    subdirs = walk.subfolders(root)
    paths: list[Path] = []
    labels: list[int] = []
    skipped = 0
    if subdirs:
        names = list(classes) if classes is not None else [d.name for d in subdirs]
        index = {n: i for i, n in enumerate(names)}
        for d in subdirs:
            files, bad = walk.image_files(d)
            skipped += bad
            if d.name not in index:
                if classes is not None:
                    raise UserError(f"{root}: sub-folder '{d.name}' is not in the class list")
                continue
            paths += files
            labels += [index[d.name]] * len(files)
        loose, bad = walk.image_files(root, recursive=False)
        skipped += bad
        if loose and not paths:  # images next to unrelated folders: treat as flat
            return walk.done(ImageSet(loose, None, None, str(root), skipped))
        result = ImageSet(paths, labels, names, str(root), skipped)
    else:
        files, skipped = walk.image_files(root)
        result = ImageSet(files, None, None, str(root), skipped)
    walk.done(result)
    if not result.paths:
        raise UserError(
            f"no images found in '{folder}' (looked for {', '.join(sorted(IMAGE_SUFFIXES))}; "
            f"{skipped} other files): point --calib/--val at a folder of images"
        )
    return result


# ---------------------------------------------------------------- ImageNet-1k as users keep it
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in the order timm's pretrained 1000-class heads use (sorted wnids,
    timm's imagenet_synsets.txt)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def read_val_labels(path: Path) -> dict[str, int]:
    """{image file stem: class index in timm's ImageNet-1k order} from a ground-truth file.

    Reads Kaggle's `LOC_val_solution.csv` (ImageId,PredictionString starting with the wnid) and two-column
    lists `<file> <label>` (space, tab or comma), the label a wnid or a class index in sorted-wnid order (as
    Caffe's `val.txt`). The devkit's `ILSVRC2012_validation_ground_truth.txt` numbers classes in its own
    ILSVRC2012_ID order, which is not timm's: it is refused rather than silently mislabelled.
    """
    if not path.is_file():
        raise UserError(f"ground-truth file '{path}' not found: give LOC_val_solution.csv or a '<file> <wnid>' list")
    classes = imagenet_classes()
    index = {w: i for i, w in enumerate(classes)}
    out: dict[str, int] = {}
    lines = [l.strip() for l in path.read_text().splitlines() if l.strip()]
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        lines = lines[1:]
    for n, line in enumerate(lines, 1):
        parts = line.replace(",", " ").split()
        if len(parts) == 1:
            raise UserError(f"{path}:{n}: one column only (the devkit's ILSVRC2012_validation_ground_truth.txt uses "
                            "ILSVRC2012_IDs, not timm's class order): give LOC_val_solution.csv or '<file> <wnid>' lines")
        name, label = Path(parts[0]).stem, parts[1]
        if label in index:
            out[name] = index[label]
        elif label.isdigit() and int(label) < len(classes):
            out[name] = int(label)
        else:
            raise UserError(f"{path}:{n}: label '{label}' is neither an ImageNet-1k wnid nor a class index 0-999: "
                            "give the ground truth of the ILSVRC2012 val split")
    return out


def _labelled_flat_folder(root: Path, labels_file: Path) -> ImageSet:
    """A flat folder (ILSVRC2012_val_00000001.JPEG ...) labelled from its ground-truth file."""
    truth = read_val_labels(labels_file)
    files, skipped = _image_files(root)
    paths = [p for p in files if p.stem in truth]
    if not paths:
        raise UserError(f"none of the {len(files)} images in '{root}' is named in '{labels_file}': "
                        "give the ground truth of these files")
    if len(paths) < len(files):
        logger.info(f"note: {len(files) - len(paths)} images in '{root}' have no label in '{labels_file}'; left out")
    return ImageSet(paths, [truth[p.stem] for p in paths], imagenet_classes(), str(root), skipped)


def _image_files(folder: Path, recursive: bool = True) -> tuple[list[Path], int]:
    return _Walk(folder).image_files(folder, recursive)


class _Walk:
    """Lists a user's image folder without leaving it through a folder link: a link to a folder outside the root
    is not followed (a link to /proc or / once walked the whole machine), nor is a linked folder inside it (its
    images would count twice). A link to an image file elsewhere is read like a file (a calibration subset is
    often a folder of links into a dataset); one that leads nowhere is skipped. Unreadable sub-folders are
    skipped. Links not followed and unreadable folders are counted and noted once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = _real(root) or root
        self.links_out: dict[Path, str] = {}  # each link once, however often the walk meets it
        self.unreadable: list[str] = []

    def _follow(self, path: Path) -> bool:
        """Whether a symbolic link may be used: a file link to a regular file, or a folder link inside the root."""
        real = _real(path)
        if real is not None and (real.is_file() or (real.is_dir() and real.is_relative_to(self.real_root))):
            return True
        self.links_out[path] = f"{path.name} -> {os.readlink(path)}"
        return False

    def subfolders(self, folder: Path) -> list[Path]:
        """Class sub-folders: real folders, or links to folders inside the root."""
        out = []
        for p in self._entries(folder):
            if p.name.startswith(".") or not p.is_dir():
                continue
            if p.is_symlink() and not self._follow(p):
                continue
            out.append(p)
        return sorted(out)

    def _entries(self, folder: Path) -> list[Path]:
        try:
            return list(folder.iterdir())
        except OSError as exc:
            self.unreadable.append(f"{folder} ({exc.strerror})")
            return []

    def image_files(self, folder: Path, recursive: bool = True) -> tuple[list[Path], int]:
        """(image files, count of other files) in `folder` (and below it, not through links to folders)."""
        if recursive:
            found = []
            on_error = lambda exc: self.unreadable.append(f"{exc.filename} ({exc.strerror})")  # noqa: E731
            for top, dirs, names in os.walk(folder, onerror=on_error):
                found += [Path(top) / n for n in names]
                found += [Path(top) / d for d in dirs if os.path.islink(os.path.join(top, d))]  # noted below
        else:
            found = self._entries(folder)
        files, other = [], 0
        for p in sorted(found):
            if p.name.startswith("."):
                continue
            if p.is_symlink() and not self._follow(p):
                continue
            if not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
            else:
                other += 1
        return files, other

    def done(self, result: ImageSet) -> ImageSet:
        """Note what was not followed (once per scan) and count it on the result."""
        result.links_out = len(self.links_out)
        if self.links_out:
            logger.warning(f"note: not following {len(self.links_out)} link(s) in '{self.root}' to folders outside "
                           f"it or to nothing (e.g. {next(iter(self.links_out.values()))})")
        if self.unreadable:
            logger.warning(f"note: skipped {len(self.unreadable)} unreadable folder(s) in '{self.root}' "
                           f"(e.g. {self.unreadable[0]})")
        return result


def _real(path: Path) -> Optional[Path]:
    """Where `path` really is (links resolved), or None when that cannot be known (a link loop)."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except (OSError, RuntimeError):
        return None


@dataclass
class LoadedImages:
    """Preprocessed images in memory: float NCHW (normalised) plus the uint8 NHWC they came from."""

    x: np.ndarray  # (N, 3, H, W) float32, normalised
    labels: Optional[np.ndarray]
    unreadable: int = 0
    uint8: Optional[np.ndarray] = field(default=None, repr=False)  # (N, H, W, 3)
    files: Optional[ImageSet] = field(default=None, repr=False)  # the image files these were read from
    unreadable_example: Optional[str] = None  # one file that could not be read, for the user's note
    # Calibration images only: {name, digest, images} of the set they are (mnv4_deploy/calibration.py), which
    # every int8 manifest records so that runs are compared only when calibrated alike.
    calibration_set: Optional[dict[str, Any]] = None

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size]


def model_input(x: np.ndarray) -> "torch.Tensor":
    """Normalised NCHW images as the tensor every PyTorch model here runs on: channels-last in memory.

    oneDNN's convolutions run about 35% faster on channels-last input at 224x224, and they round differently
    from the NCHW kernels: the float and simulated logits must not depend on how an array happened to be laid
    out (a copy, a slice, a fancy index), so every run of a model here goes through this."""
    import torch

    t = torch.from_numpy(np.asarray(x, np.float32))
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


# At most this many pixels are decoded per image (150 MB as RGB): a 20000x20000 PNG (a decompression bomb, or
# a scan) is skipped as unreadable rather than taking gigabytes. A larger JPEG is decoded at a reduced scale
# (PIL's draft mode) when that brings it under the cap.
MAX_DECODE_PIXELS = 50_000_000


class ImageTooLarge(ValueError):
    """An image with more pixels than MAX_DECODE_PIXELS (after any draft-mode reduction)."""


# What a file that is not a decodable image raises (truncated, corrupt, wrong suffix, too large).
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(path: Path, short_side: int = 0) -> Image.Image:
    """Open an image for decoding, refusing (ImageTooLarge) one with more pixels than MAX_DECODE_PIXELS.

    Only the header is read here, so the refusal costs nothing; `short_side` lets a JPEG too large at full
    scale be decoded at 1/2..1/8 scale instead (never below the size preprocessing resizes to).
    """
    with warnings.catch_warnings():  # PIL warns above 89 Mpx; the cap below is what decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    w, h = img.size
    if w * h > MAX_DECODE_PIXELS and short_side:
        img.draft("RGB", (short_side, short_side))
        w, h = img.size
    if w * h > MAX_DECODE_PIXELS:
        img.close()
        raise ImageTooLarge(f"{w}x{h} pixels, more than the {MAX_DECODE_PIXELS // 1_000_000} megapixels decoded "
                            "per image")
    return img


def decode_image(path: Path, pre: Preprocessing) -> np.ndarray:
    """One image file as the model's uint8 HWC input (DECODE_ERRORS when it is not a readable image)."""
    with open_image(path, min(pre.resize_size())) as img:
        return pre.to_uint8_image(img)



def _why_unreadable(path: Path) -> Optional[str]:
    """Why `path` cannot be read as an image, or None if it can (a full decode, as loading does)."""
    try:
        with open_image(path) as img:
            img.convert("RGB")
        return None
    except DECODE_ERRORS as exc:
        return _short(exc, path)


def _short(exc: BaseException, path: Path) -> str:
    """PIL's reason on one line, without the file name it repeats (the message names the file already)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.replace(repr(str(path)), "").replace(str(path), "").strip(" :")
    return text[:100] or type(exc).__name__


def _found_and_unreadable(paths: Sequence[Path]) -> tuple[str, bool]:
    """('found N image files, M of them not readable as images (e.g. 'x.jpg': reason)', any unreadable?).

    Decodes every file: only for the small sets an error is about, so the count is the truth, not
    the number of names that end in .jpg.
    """
    bad = [(p, why) for p in paths if (why := _why_unreadable(p)) is not None]
    text = f"found {len(paths)} image file{'s' if len(paths) != 1 else ''}"
    if bad:
        text += f", {len(bad)} of them not readable as images (e.g. '{bad[0][0]}': {bad[0][1]})"
    return text, bool(bad)


class _ImageFiles:
    """Map-style dataset of image files for a DataLoader. At module level so that worker processes
    started with forkserver/spawn can unpickle it."""

    def __init__(self, paths: Sequence[Path], labels: Optional[Sequence[int]], pre: Preprocessing):
        self.paths, self.labels, self.pre = list(paths), list(labels) if labels else None, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int, bool, str]:
        """(uint8 HWC tensor, label or -1, readable?, why not ('' if readable))."""
        import torch

        try:
            arr = decode_image(self.paths[i], self.pre)
            return torch.from_numpy(arr), (self.labels[i] if self.labels else -1), True, ""
        except DECODE_ERRORS as exc:
            h, w = self.pre.input_size
            return torch.zeros((h, w, 3), dtype=torch.uint8), -1, False, _short(exc, self.paths[i])


def _worker_context() -> Optional[str]:
    """Never fork the workers: once JAX/TensorFlow (the TFLite/Core ML converters) are imported the
    process is multithreaded, and a forked child can deadlock on a lock another thread held."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def load_images(images: ImageSet, pre: Preprocessing, workers: int = 0, what: str = "images") -> LoadedImages:
    """Decode and preprocess every image (a torch DataLoader with worker processes); skip unreadable ones.
    `what` names them in the progress bar ('calibration images')."""
    from torch.utils.data import DataLoader

    dataset = _ImageFiles(images.paths, images.labels, pre)
    if workers > 0:
        loader = DataLoader(dataset, batch_size=64, num_workers=workers, shuffle=False,
                            multiprocessing_context=_worker_context())
    else:
        loader = DataLoader(dataset, batch_size=64, num_workers=0, shuffle=False)
    chunks, labels, ok = [], [], []
    first_bad: Optional[tuple[Path, str]] = None
    start = 0
    with stage("decode", f"reading {len(dataset)} {what}", total=len(dataset), unit="image") as bar:
        for arr, lab, good, why in loader:
            chunks.append(arr.numpy())
            labels.append(lab.numpy())
            ok.append(good.numpy())
            if first_bad is None and not bool(good.all()):
                j = int((~good).nonzero()[0, 0])
                first_bad = (images.paths[start + j], why[j])
            start += len(good)
            bar.advance(len(good))
    keep = np.concatenate(ok).astype(bool) if ok else np.zeros(0, bool)
    u8 = np.concatenate(chunks)[keep] if chunks else np.zeros((0, *pre.input_size, 3), np.uint8)
    labs = np.concatenate(labels)[keep] if images.labelled and labels else None
    x = np.stack([pre.normalize(a) for a in u8]) if len(u8) else np.zeros((0, 3, *pre.input_size), np.float32)
    if len(x) == 0:
        chosen = "" if len(images) >= images.found else f" (of {images.found} found there)"
        example = f" (e.g. '{first_bad[0]}': {first_bad[1]})" if first_bad else ""
        raise UserError(
            f"none of the {len(images)} image file{'s' if len(images) != 1 else ''} read from "
            f"'{images.source}'{chosen} could be read as images{example}: replace or remove the unreadable "
            "files, or point --calib/--val at a folder of readable images"
        )
    if first_bad:
        logger.info("skipped %d unreadable images in '%s', e.g. '%s': %s",
                    int((~keep).sum()), images.source, *first_bad)
    return LoadedImages(x.astype(np.float32), labs, int((~keep).sum()), u8, images,
                        str(first_bad[0]) if first_bad else None)


# ---------------------------------------------------------------- default calibration set
_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "color.png", "brick.png",
                   "gravel.png", "grass.png")


def skimage_photos() -> tuple[Path, list[Path]]:
    """scikit-image's data folder and the sample photographs in it that calibrate by default."""
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
    return folder, photos


def default_calibration(pre: Preprocessing, n: int = 64, seed: int = 0) -> tuple[LoadedImages, str]:
    """Random crops of the real photographs that scikit-image ships: calibration with no download."""
    _folder, photos = skimage_photos()
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
