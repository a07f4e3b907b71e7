"""Pinned calibration sets: which images calibrate int8, as a file, so runs on any machine are comparable.

Calibration decides int8 accuracy, and a report is only comparable to its baseline when both were calibrated
on the same images. A set file (`calibration/NAME.yaml`) lists images as paths relative to a root given at run
time (`--calib-root DIR` or $MNV4_CALIB_ROOT), each with its sha256 and label; a run refuses a set whose files
changed. Every int8 manifest records the set it used as `quantization.calibration_set`
({name, digest, images}), also for a plain `--calib` folder and for the scikit-image default.

The digest is "sha256:" + sha256 over the lines "<file sha256>  <relative path>\\n" of the images used, sorted
by path: same images, same bytes -> same digest, on any machine and any root.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional

import yaml

from .data import ImageSet, LoadedImages, default_calibration, load_images, scan_folder, skimage_photos
from .errors import UserError, did_you_mean
from .fileio import sha256_of
from .shipped import find_named, named_files, user_dir
from .yamlio import safe_load

logger = logging.getLogger(__name__)

ROOT_ENV = "MNV4_CALIB_ROOT"
DEFAULT_SET = "skimage-photos"  # the set used when nothing is given: scikit-image's sample photographs
SKIMAGE_ROOT = "scikit-image"  # a set's `root:` that means scikit-image's data folder
_SET_KEYS = ("name", "description", "root", "selection", "digest", "images")
_IMAGE_KEYS = ("path", "sha256", "label")


@dataclass(frozen=True)
class SetImage:
    path: str  # relative to the root, '/'-separated
    sha256: Optional[str] = None  # None: names only (the user brings the data, e.g. ImageNet)
    label: Optional[str] = None  # class name (e.g. a WordNet id), where known


@dataclass(frozen=True)
class CalibrationSet:
    name: str
    images: tuple[SetImage, ...]
    description: str = ""
    selection: dict[str, Any] = field(default_factory=dict)  # how the images were chosen (method, per_class, seed)
    root: Optional[str] = None  # fixed root ('scikit-image'); None: given at run time
    source: str = "<memory>"

    @property
    def hashed(self) -> bool:
        return all(im.sha256 for im in self.images)

    @property
    def digest(self) -> str:
        """Of the listed contents; names only (sha256 of the paths) for a set without hashes."""
        if self.hashed:
            return digest_of((im.path, im.sha256) for im in self.images)  # type: ignore[misc]
        return digest_of((im.path, "") for im in self.images)


def digest_of(entries: Iterable[tuple[str, str]]) -> str:
    """'sha256:...' over '<sha256>  <path>' lines sorted by path (see the module docstring)."""
    h = hashlib.sha256()
    for path, sha in sorted(entries):
        h.update(f"{sha}  {path}\n".encode())
    return "sha256:" + h.hexdigest()




# ---------------------------------------------------------------- reading and writing set files
def shipped_sets() -> list[str]:
    """Set names `--calib` accepts: the package's and the user folder's."""
    return sorted(named_files("calibration"))


def is_set_reference(value: str | Path) -> bool:
    """A set name or set file (not a folder of images)."""
    p = Path(value)
    return not p.is_dir() and (p.suffix in (".yaml", ".yml") or (not p.exists() and not p.suffix))


def load_set(name_or_path: str | Path) -> CalibrationSet:
    """A set by name (user folder, then shipped) or by .yaml path."""
    text_name = str(name_or_path)
    path = Path(text_name).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"calibration set file '{text_name}' not found: check the path, or give a set name "
                            f"({', '.join(shipped_sets())})")
        return parse_set(path.read_text(), str(path))
    named = find_named("calibration", text_name)
    if named is None:
        known = shipped_sets()
        raise UserError(f"'{text_name}' is neither a folder of images nor a calibration set"
                        f"{did_you_mean(text_name, known)}; sets: {', '.join(known) or 'none'} "
                        f"(own ones in {user_dir('calibration')}), or give a folder or a .yaml file")
    return parse_set(named.read_text(), str(named))


def parse_set(text: str, source: str = "<string>") -> CalibrationSet:
    data = safe_load(text, source)  # a syntax error or a duplicate key names its line
    fix = "regenerate it with `mnv4-deploy calib make`"
    if not isinstance(data, dict):
        raise UserError(f"{source}: a calibration set must be a mapping with name and images: {fix}")
    unknown = [k for k in data if k not in _SET_KEYS]
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}'{did_you_mean(str(unknown[0]), _SET_KEYS)}; "
                        f"valid keys: {', '.join(_SET_KEYS)}")
    name, images = data.get("name"), data.get("images")
    if not isinstance(name, str) or not name:
        raise UserError(f"{source}: 'name' must be a non-empty string: {fix}")
    if not isinstance(images, list) or not images:
        raise UserError(f"{source}: 'images' must be a non-empty list of {{path, sha256, label}}: {fix}")
    entries = []
    for i, item in enumerate(images):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise UserError(f"{source}: images[{i}] must have a 'path' (relative to the root): {fix}")
        bad = [k for k in item if k not in _IMAGE_KEYS]
        if bad:
            raise UserError(f"{source}: images[{i}] has unknown key '{bad[0]}'; valid keys: {', '.join(_IMAGE_KEYS)}")
        rel = PurePosixPath(item["path"])
        if (rel.is_absolute() or ".." in rel.parts or not item["path"].strip() or "\0" in item["path"]
                or not _encodable(item["path"])):
            raise UserError(f"{source}: images[{i}] path '{item['path']}' must be relative to the root, inside it")
        sha = item.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise UserError(f"{source}: images[{i}] sha256 must be 64 hex digits: {fix}")
        if sha is not None and any(c not in "0123456789abcdefABCDEF" for c in sha):
            raise UserError(f"{source}: images[{i}] sha256 must be 64 hex digits: {fix}")
        label = item.get("label")
        if label is not None and (not isinstance(label, (str, int)) or isinstance(label, bool)):
            raise UserError(f"{source}: images[{i}] label must be a class name, got {type(label).__name__}: {fix}")
        entries.append(SetImage(str(rel), sha, None if label is None else str(label)))
    for key, kinds, what in (("description", (str,), "a string"), ("selection", (dict,), "a mapping"),
                             ("root", (str,), "a string"), ("digest", (str,), "a string")):
        if data.get(key) is not None and not isinstance(data[key], kinds):
            raise UserError(f"{source}: '{key}' must be {what}, got {type(data[key]).__name__}: {fix}")
    if data.get("root") not in (None, SKIMAGE_ROOT):
        raise UserError(f"{source}: 'root' may only be '{SKIMAGE_ROOT}' (other roots are given at run time with "
                        f"--calib-root), got {data['root']!r}: {fix}")
    result = CalibrationSet(name, tuple(entries), str(data.get("description") or ""),
                            dict(data.get("selection") or {}), data.get("root"), source)
    if data.get("digest") and data["digest"] != result.digest:
        raise UserError(f"{source}: its digest does not match its image list (the file was edited): {fix}")
    return result


def _encodable(path: str) -> bool:
    """Whether the file system can name `path` (a lone surrogate cannot be)."""
    try:
        os.fsencode(path)
        return True
    except UnicodeEncodeError:
        return False


def dump_set(cs: CalibrationSet) -> str:
    """The set as YAML (a header comment says how to use it)."""
    header = (f"# Calibration set '{cs.name}' ({len(cs.images)} images): paths relative to the root given at run "
              f"time,\n# e.g. mnv4-deploy convert ... --int8 --calib {cs.name} --calib-root DIR "
              f"(or ${ROOT_ENV}=DIR).\n# Check the files: mnv4-deploy calib check {cs.name} --root DIR\n")
    data: dict[str, Any] = {"name": cs.name, "description": cs.description}
    if cs.root:
        data["root"] = cs.root
    data["selection"] = cs.selection
    data["digest"] = cs.digest
    data["images"] = [{k: v for k, v in (("path", im.path), ("sha256", im.sha256), ("label", im.label)) if v is not None}
                      for im in cs.images]
    return header + yaml.safe_dump(data, sort_keys=False, width=120)


def make_set(folder: str | Path, name: str, per_class: Optional[int] = None, images: Optional[int] = None,
             seed: int = 0, description: str = "") -> CalibrationSet:
    """Choose images from `folder` (class sub-folders: balanced per class), seeded, and hash each.

    `per_class`: that many from every class; `images`: that many in all, spread evenly over the classes (those
    that get one more are drawn with the seed). A flat folder is one class.
    """
    root = Path(folder).expanduser().resolve()
    found = scan_folder(root)
    if (per_class is None) == (images is None):
        raise UserError("give one of --per-class N or --images N")
    by_class: dict[str, list[Path]] = defaultdict(list)
    for i, p in enumerate(found.paths):
        label = found.classes[found.labels[i]] if found.labelled else ""  # type: ignore[index]
        by_class[label].append(p)
    classes = sorted(by_class)
    rng = random.Random(seed)
    if per_class is not None:
        quota = {c: per_class for c in classes}
    else:
        base, extra = divmod(images, len(classes))  # type: ignore[arg-type]
        lucky = set(rng.sample(classes, extra))
        quota = {c: base + (c in lucky) for c in classes}
    short = [c for c in classes if len(by_class[c]) < quota[c]]
    if short:
        raise UserError(f"{root}: class '{short[0]}' has {len(by_class[short[0]])} images, fewer than the "
                        f"{quota[short[0]]} asked for ({len(short)} such classes): ask for fewer")
    chosen: list[SetImage] = []
    for c in classes:
        for p in sorted(rng.sample(sorted(by_class[c]), quota[c])):
            chosen.append(SetImage(p.relative_to(root).as_posix(), sha256_of(p), c or None))
    selection = {"method": "per-class balanced" if found.labelled else "random", "seed": seed,
                 "source": f"{root.parent.name}/{root.name}", "classes": len(classes), "count": len(chosen)}
    if per_class is not None:
        selection["per_class"] = per_class
    return CalibrationSet(name, tuple(chosen), description or f"{len(chosen)} images from {root.name}", selection)


# ---------------------------------------------------------------- checking against a root
def resolve_root(cs: CalibrationSet, root: Optional[str | Path]) -> Path:
    """The folder the set's paths are relative to: the set's own fixed root, --calib-root/--root, or $MNV4_CALIB_ROOT."""
    if cs.root == SKIMAGE_ROOT:
        return skimage_photos()[0]
    given = root if root is not None else os.environ.get(ROOT_ENV)
    if not given:
        raise UserError(f"calibration set '{cs.name}' lists paths relative to a root folder: pass --calib-root DIR "
                        f"(--root DIR for calib check) or set {ROOT_ENV}")
    path = Path(given).expanduser()
    if not path.is_dir():
        raise UserError(f"calibration root '{given}' is not a folder: point --calib-root/{ROOT_ENV} at the folder "
                        f"the set '{cs.name}' lists its images under")
    return path


def check_set(cs: CalibrationSet, root: Path) -> tuple[list[str], dict[str, str]]:
    """(one line per missing or changed file, {path: sha256 of what is there now} for the files present).

    A path that leads out of the root through a symbolic link is refused (one line) before anything is read:
    the set file names what is hashed, and must not reach files elsewhere on the machine.
    """
    problems, actual = [], {}
    real_root = Path(os.path.realpath(root))
    for im in cs.images:
        p = root / im.path
        if not Path(os.path.realpath(p)).is_relative_to(real_root):
            raise UserError(f"calibration set '{cs.name}': '{im.path}' leads out of the root '{root}' through a "
                            "symbolic link: a set may only name files inside its root; remove the link or choose "
                            "another --calib-root/--root")
        try:
            if not p.is_file():
                problems.append(f"missing: {im.path}")
                continue
            actual[im.path] = sha256_of(p)
        except OSError as exc:  # a name too long, a file we may not read: not there for us
            problems.append(f"missing: {im.path} ({exc.strerror})")
            continue
        if im.sha256 and actual[im.path] != im.sha256:
            problems.append(f"changed: {im.path} (sha256 {actual[im.path][:12]}..., the set says {im.sha256[:12]}...)")
    return problems, actual


def verified_images(cs: CalibrationSet, root: Path, allow_changed: bool = False) -> dict[str, str]:
    """{path: sha256} of the set's files under `root`; a missing or changed file is one UserError line
    (a warning with `allow_changed`, and the digest then says what was really used)."""
    problems, actual = check_set(cs, root)
    if problems:
        line = (f"calibration set '{cs.name}': {len(problems)} of {len(cs.images)} images missing or changed under "
                f"'{root}' (e.g. {problems[0]})")
        missing = sum(p.startswith("missing") for p in problems)
        if not allow_changed or missing == len(cs.images):
            raise UserError(f"{line}: restore them (list: mnv4-deploy calib check {cs.name} --root {root}), "
                            "or pass --calib-allow-changed to calibrate on what is there")
        logger.warning(f"warning: {line}; going on (--calib-allow-changed): the manifest's digest is of the files used")
    return actual


# ---------------------------------------------------------------- what a run calibrates and verifies on
@dataclass
class CalibrationData:
    calibration: LoadedImages
    calibration_source: str
    held_back: LoadedImages
    held_back_source: str
    calibration_set: dict[str, Any]  # {name, digest, images}: the manifest's quantization.calibration_set


def load_calibration(calib: Optional[str | Path], root: Optional[str | Path], recipe: Any, pre: Any,
                     precision: str = "int8", allow_changed: bool = False, workers: int = 0) -> CalibrationData:
    """Calibration images and disjoint held-back verification images for a run.

    `calib`: a folder, a set name or set file, or None (the recipe's `quantization.calibration.set`, else the
    scikit-image photos).
    """
    c = recipe.quantization.calibration
    n_cal, n_ver, seed = c.images_for(*pre.input_size), recipe.verification.images, c.seed
    if calib is None and c.set:
        calib = c.set
    if calib is None or str(calib) == DEFAULT_SET:
        return _skimage_data(pre, n_cal if precision == "int8" else 8, n_ver, seed)
    if not is_set_reference(calib):
        return _folder_data(Path(calib), pre, c.images, n_cal, n_ver, seed, workers)
    cs = load_set(calib)
    if cs.root == SKIMAGE_ROOT:
        return _skimage_data(pre, n_cal if precision == "int8" else 8, n_ver, seed, cs)
    folder = resolve_root(cs, root)
    actual = verified_images(cs, folder, allow_changed)
    used = [im for im in cs.images if im.path in actual]
    if len(used) > n_cal:  # the recipe asks for fewer: a seeded subset, in the set's order
        keep = set(random.Random(seed).sample(range(len(used)), n_cal))
        used = [im for i, im in enumerate(used) if i in keep]
    labels = sorted({im.label for im in used if im.label is not None})
    index = {name: i for i, name in enumerate(labels)}
    labelled = all(im.label is not None for im in used)
    cal_set = ImageSet([folder / im.path for im in used], [index[im.label] for im in used] if labelled else None,
                       labels if labelled else None, f"{cs.name} ({folder})")
    cal = load_images(cal_set, pre, workers, "calibration images")
    digest = digest_of((im.path, actual[im.path]) for im in used)
    info = {"name": cs.name, "digest": digest, "images": len(used)}
    held, held_src = _held_back(folder, {im.path for im in cs.images}, pre, n_ver, seed, workers)
    if cal.unreadable:
        logger.warning(f"note: {cal.unreadable} images of calibration set '{cs.name}' could not be read")
    return CalibrationData(cal, f"calibration set '{cs.name}' {digest[:19]} ({len(cal)} images, {folder})",
                           held, held_src, info)


def _held_back(root: Path, exclude: set[str], pre: Any, n: int, seed: int, workers: int) -> tuple[LoadedImages, str]:
    """Verification images from the set's root that are not in the set; scikit-image crops if there are none."""
    try:
        found = scan_folder(root)
    except UserError:
        found = None
    if found is not None:
        keep = [i for i, p in enumerate(found.paths) if p.relative_to(root).as_posix() not in exclude]
        if keep:
            rest = found.subset(keep).sample(n, seed)
            return load_images(rest, pre, workers, "held-back images"), f"{root} (held back: not in the set, {min(n, len(keep))} images)"
    logger.info(f"note: '{root}' has no images outside the calibration set; verifying on scikit-image crops")
    ver, _ = default_calibration(pre, n, seed + 1)
    return ver, "scikit-image sample photos (random crops)"


def _folder_data(folder: Path, pre: Any, n_split: int, n_cal: int, n_ver: int, seed: int,
                 workers: int) -> CalibrationData:
    """The folder is split as for `n_split` calibration images and the first `n_cal` of them are used, so the
    held-back images do not depend on the input size's pixel cap (`Calibration.images_for`)."""
    found = scan_folder(folder)
    cal_set, ver_set = found.split(n_split, n_ver, seed)
    cal_set = cal_set.subset(list(range(min(n_cal, len(cal_set)))))
    cal = load_images(cal_set, pre, workers, "calibration images")
    ver = load_images(ver_set, pre, workers, "held-back images")
    unreadable = cal.unreadable + ver.unreadable
    if unreadable or found.skipped_files:
        logger.warning(f"note: skipped {unreadable} unreadable images and {found.skipped_files} non-image files in {folder}")
    root = Path(found.source)
    digest = digest_of((p.relative_to(root).as_posix(), sha256_of(p)) for p in cal_set.paths)
    info = {"name": root.resolve().name, "digest": digest, "images": len(cal_set)}
    return CalibrationData(cal, f"{folder} ({len(cal)} images)", ver, f"{folder} (held back, {len(ver)} images)", info)


def _skimage_data(pre: Any, n_cal: int, n_ver: int, seed: int,
                  cs: Optional[CalibrationSet] = None) -> CalibrationData:
    """Random crops of scikit-image's photos; the digest covers the photos' bytes and the crop draw."""
    folder, photos = skimage_photos()
    actual = {p.name: sha256_of(p) for p in photos}
    cs = cs or _shipped_default()
    if cs is not None:
        listed = {im.path: im.sha256 for im in cs.images}
        changed = sorted(n for n in actual if listed.get(n) not in (None, actual[n]))
        if changed:  # the installed scikit-image differs from the one the set was made with: say so, go on
            logger.warning(f"note: scikit-image's '{changed[0]}' differs from calibration set '{DEFAULT_SET}' "
                           f"({len(changed)} photos): the manifest's digest is of the photos used")
    cal, cal_src = default_calibration(pre, n_cal, seed)
    ver, _ = default_calibration(pre, n_ver, seed + 1)
    digest = digest_of(list(actual.items()) + [(f"random-crops n={n_cal} seed={seed} size={pre.input_size}", "")])
    info = {"name": DEFAULT_SET, "digest": digest, "images": len(cal)}
    return CalibrationData(cal, cal_src, ver, "scikit-image sample photos (other random crops)", info)


def _shipped_default() -> Optional[CalibrationSet]:
    named = find_named("calibration", DEFAULT_SET)
    return parse_set(named.read_text(), str(named)) if named is not None else None


def summary(cs: CalibrationSet) -> str:
    kinds = sorted({im.label for im in cs.images if im.label})
    classes = f"{len(kinds)} classes, " if kinds else ""
    return (f"{cs.name}: {len(cs.images)} images, {classes}"
            f"{'sha256 per image' if cs.hashed else 'names only (no hashes)'}, digest {cs.digest}")

