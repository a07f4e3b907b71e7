"""Rebuild, from artifacts' manifests, the PyTorch int8 model they were exported from (or refuse in one line).

`debug` compares an artifact with its PyTorch simulation, so that simulation must be the very model the
convert exported: the same weights (sha256), the same recipe (all of it), the same calibration images (the
set's digest) and the same preprocessing. The manifest records all of these; the run is rebuilt with the
pipeline's own functions (`start_run`, `ptq_for`, `export_request`), so nothing here re-implements convert.

Checked before any slow work: the artifact's sha256 (transaction.check_artifact), int8 precision, a PTQ
model (a QAT model came out of training, which cannot be replayed), the weights file and its sha256, every
artifact from the same convert. Checked after loading: the calibration set's digest, and where the held-back
images are the ones the manifest verified on, the float model's top-1 on them (random and pretrained weights
have no file to hash; their predictions must reproduce).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import UserError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class Artifact:
    """One int8 artifact folder (OUT/<target>/) as `debug` uses it."""

    folder: Path
    manifest: dict[str, Any]
    target: Any
    path: Path
    label: str  # how tables name it: the target, or the folder where two share a target
    request: Any = None  # ExportRequest, once rebuilt


@dataclass
class Rebuilt:
    run: Any  # pipeline.Run (model, recipe, calibration and held-back images, float logits)
    artifacts: list[Artifact]
    checks: list[str]  # what was checked, for debug.json


def read_artifact(folder: Path) -> Artifact:
    """The folder's manifest and artifact, checked (sha256, int8, PTQ), or one UserError line."""
    from ..verify.manifest import read_manifest
    from ..targets import get_target
    from ..infra.transaction import check_artifact

    folder = Path(folder)
    if folder.name.startswith("manifest") and folder.suffix == ".json":
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not an artifact folder: give OUT/<target> as `mnv4-deploy convert` wrote it")
    if not (folder / MANIFEST).is_file():
        failed = " (it holds only manifest.failed.json: the verification gate refused that artifact)" \
            if (folder / "manifest.failed.json").is_file() else ""
        raise UserError(f"'{folder}' has no {MANIFEST}{failed}: give OUT/<target> as `mnv4-deploy convert` wrote it")
    m = check_artifact(folder, MANIFEST, read_manifest)
    if m["precision"] != "int8":
        raise UserError(f"'{folder}' holds a {m['precision']} artifact: debug compares int8 artifacts with their "
                        "PyTorch simulation (convert with --int8)")
    q = m.get("quantization") or {}
    if q.get("method") == "qat":
        raise UserError(f"'{folder}' comes from `mnv4-deploy qat`: its int8 model came out of fine-tuning, which "
                        "debug cannot rebuild from the manifest (debug works on `convert --int8` artifacts)")
    if q.get("method") != "pt2e" or not isinstance(q.get("calibration_set"), dict) or not m.get("recipe"):
        raise UserError(f"'{folder}/{MANIFEST}' does not say how its int8 model was made (quantization method, "
                        "calibration set, recipe): rebuild it with this version's `mnv4-deploy convert`")
    target = get_target(m["target"])
    target.check_installed()
    return Artifact(folder, m, target, folder / m["artifact"]["file"], m["target"])


def facts(a: Artifact) -> dict[str, Any]:
    """What the convert's int8 model depends on, as its manifest records it."""
    m = a.manifest
    inp = m.get("input") or {}
    recipe = {k: v for k, v in m["recipe"].items() if k not in ("source", "targets")}
    return {"model": m["model"].get("name"), "weights": m["model"].get("weights_sha256") or m["model"].get("weights"),
            "classes": m["model"].get("num_classes"), "recipe": recipe,
            "calibration set": m["quantization"]["calibration_set"].get("digest"),
            "normalization": inp.get("normalization"), "resize": inp.get("resize"),
            "input size": _input_size(m)}


def _same_convert(artifacts: Sequence[Artifact]) -> None:
    """Every artifact from one convert: same model, weights, recipe, calibration set and preprocessing."""
    first = artifacts[0]
    ref = facts(first)
    for a in artifacts[1:]:
        got = facts(a)
        for key, value in ref.items():
            if got[key] != value:
                raise UserError(f"'{first.folder}' and '{a.folder}' come from different converts (their {key} "
                                "differs): debug them one at a time")


def _input_size(m: dict[str, Any]) -> list[int]:
    inp = m.get("input") or {}
    shape = list(inp.get("shape") or [])
    if len(shape) != 4:
        raise UserError(f"the manifest's input shape {shape} is not [1, C, H, W] or [1, H, W, C]")
    return shape[1:3] if inp.get("layout") == "NHWC" else shape[2:4]


def _weights(m: dict[str, Any]) -> str:
    """The --weights the convert used, checked against the manifest's sha256 when it is a file."""
    from ..infra.fileio import sha256_of

    model = m["model"]
    weights = str(model.get("weights") or "")
    if weights == "random" or weights.startswith("pretrained"):
        return "random" if weights == "random" else "pretrained"
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"the weights the artifact was made from, '{weights}', are not there any more: debug "
                        "rebuilds its PyTorch model from them")
    expected = model.get("weights_sha256")
    actual = sha256_of(path)
    if expected and actual != expected:
        raise UserError(f"weights changed: '{weights}' has sha256 {actual[:12]}... now, the artifact was made from "
                        f"{expected[:12]}...; debug needs the same weights to rebuild its simulation")
    return weights


_SET_SOURCE = re.compile(r"^calibration set '.*' sha256:[0-9a-f]+ \(\d+ images, (?P<root>.*)\)$")
_FOLDER_SOURCE = re.compile(r"^(?P<folder>.*) \(\d+ images\)$")


def _calibration(m: dict[str, Any], calib: Optional[Path], calib_root: Optional[Path]) -> tuple[Any, Any]:
    """(--calib, --calib-root) that give the convert's calibration images again: from the manifest's record of
    the set and where it was read, unless the user gives them."""
    from ..load.calibration_sets import DEFAULT_SET, shipped_sets

    if calib is not None:
        return calib, calib_root
    q = m["quantization"]
    name, source = q["calibration_set"].get("name"), str(q.get("source") or "")
    if name == DEFAULT_SET:
        return DEFAULT_SET, None
    found = _SET_SOURCE.match(source)
    if found and name in shipped_sets():
        return name, calib_root or Path(found["root"])
    found = _FOLDER_SOURCE.match(source)
    if found and Path(found["folder"]).is_dir():
        return Path(found["folder"]), None
    raise UserError(f"cannot tell where calibration set '{name}' was read from ({source!r}): give --calib "
                    "(and --calib-root) as the convert did")


def _target_options(artifacts: Sequence[Artifact]) -> dict[str, Any]:
    """Target flags the convert was given (--io-dtype, --activation-dtype, ...), as far as the export facts
    record them (only fields that are CLI flags, with a valid value; the recipe's options hold the rest)."""
    from ..config.options import flag_fields

    out: dict[str, Any] = {}
    for a in artifacts:
        export = a.manifest.get("export") or {}
        for f in flag_fields(a.target.Options):
            if f.name not in export:
                continue
            value = export[f.name]
            choices = f.metadata.get("choices")
            if isinstance(value, str) and choices and value not in choices and value.lower() in choices:
                value = value.lower()  # e.g. layout 'NCHW' in the export facts, 'nchw' as an option
            if choices and value not in choices:
                continue
            if not isinstance(value, (str, int, float, bool)):
                continue
            out[f.name] = value
    return out


def rebuild(folders: Sequence[Path], work: Path, calib: Optional[Path] = None, calib_root: Optional[Path] = None,
            workers: int = 0, progress: bool = False) -> Rebuilt:
    """Read and check every artifact, then rebuild the convert's run and int8 model(s) (or one UserError line)."""
    from ..infra.fileio import write_text
    import json

    import yaml

    from ..pipeline import ConvertSettings, export_request, start_run
    from .cache import cached_ptq

    if not folders:
        raise UserError("give at least one artifact folder (OUT/<target>)")
    artifacts = [read_artifact(Path(f)) for f in folders]
    seen: dict[str, int] = {}
    for a in artifacts:
        seen[a.target.name] = seen.get(a.target.name, 0) + 1
    for a in artifacts:
        if seen[a.target.name] > 1:
            a.label = f"{a.target.name}:{a.folder.parent.name}/{a.folder.name}"
    _same_convert(artifacts)
    m = artifacts[0].manifest
    checks = [f"artifact sha256 matches its manifest ({', '.join(a.label for a in artifacts)})"]
    weights = _weights(m)
    if weights not in ("random", "pretrained"):
        checks.append(f"weights sha256 {m['model']['weights_sha256'][:12]}... ({weights})")
    recipe_file = work / "recipe.yaml"  # the manifest's recipe, as the convert ran it
    recipe_data = {k: v for k, v in m["recipe"].items() if k != "source"}
    write_text(recipe_file, yaml.safe_dump(recipe_data, sort_keys=False))
    calib_arg, root = _calibration(m, calib, calib_root)
    inp = m.get("input") or {}
    norm, resize = inp.get("normalization") or {}, inp.get("resize") or {}
    pre = {"input_size": _input_size(m), "mean": norm.get("mean"), "std": norm.get("std"),
           "crop_pct": resize.get("crop_pct"), "interpolation": resize.get("interpolation")}
    settings = ConvertSettings(model=m["model"]["name"], out=work, targets=",".join(dict.fromkeys(
        a.target.name for a in artifacts)), precision="int8", weights=weights,
        num_classes=m["model"].get("num_classes"), preprocessing=pre, calib=calib_arg, calib_root=root,
        recipe=str(recipe_file), target_options=_target_options(artifacts), workers=workers, progress=progress)
    run = start_run(settings, lock=False)
    if not _covers(json.loads(json.dumps(run.recipe.to_dict())), recipe_data):
        raise UserError("the manifest's recipe does not read back as the same recipe in this version "
                        "(a field was added or renamed): rebuild the artifact with this version's convert")
    checks.append(f"recipe '{run.recipe.name}' as recorded in the manifest")
    want = m["quantization"]["calibration_set"]
    got = run.calibration.calibration_set or {}
    if got.get("digest") != want.get("digest"):
        raise UserError(f"calibration set differs: '{got.get('name')}' now has digest {str(got.get('digest'))[:19]} "
                        f"({got.get('images')} images), the artifact was calibrated on '{want.get('name')}' "
                        f"{str(want.get('digest'))[:19]} ({want.get('images')} images); give --calib/--calib-root "
                        "of the original images")
    checks.append(f"calibration set '{want.get('name')}' digest {want.get('digest', '')[:19]}")
    checks += _check_float_predictions(run, m)
    quantized_for = cached_ptq(run, work, facts(artifacts[0]))
    for a in artifacts:
        a.request = export_request(run, a.target, quantized_for(a.target))
        if not a.target.deploys_simulated_model(a.request):
            raise UserError(f"'{a.folder}' does not deploy the shared PT2E int8 model (weights-only int8, or a "
                            "target-native quantizer): there is no layer-by-layer simulation to compare it with")
    return Rebuilt(run, artifacts, checks)


def _covers(now: Any, recorded: Any) -> bool:
    """`now` has every value `recorded` has (keys this version added since take their defaults)."""
    if isinstance(recorded, dict):
        return isinstance(now, dict) and all(k in now and _covers(now[k], v) for k, v in recorded.items())
    return now == recorded


def _check_float_predictions(run: Any, m: dict[str, Any]) -> list[str]:
    """Where the held-back images are those the manifest verified on (same digest), the rebuilt float model must
    give the manifest's float top-1 on every one of them: weights without a file to hash (random, pretrained)
    and the preprocessing are checked by what they compute."""
    from ..verify.predictions import decode_classes, image_set_digest

    entry = (m.get("verification") or {}).get("held_back") or {}
    stored = (entry.get("image_set") or {}).get("digest")
    ev = run.evals[0]
    if not stored or stored != image_set_digest(ev.images):
        logger.info("note: the held-back images differ from those the manifest verified on; the float model's "
                    "predictions could not be checked against it")
        return ["held-back images: not those the manifest verified on (float predictions not checked)"]
    try:
        want = decode_classes(entry["predictions"]["float_top1"])
    except (KeyError, TypeError, ValueError):
        return []
    if len(want) != len(ev.float_logits):
        return []
    got = ev.float_logits.reshape(len(want), -1).argmax(1)
    differ = int((got != want).sum())
    if differ:
        raise UserError(f"the rebuilt float model predicts {differ} of {len(want)} held-back images differently from "
                        f"the model the artifact was made from (weights '{m['model'].get('weights')}' changed?)")
    return [f"float model reproduces the manifest's top-1 on its {len(want)} held-back images"]


def user_images(paths: Sequence[Path], pre: Any, workers: int = 0) -> Any:
    """--images: files and folders (flat or class sub-folders), preprocessed as the model's input."""
    from ..load.images import ImageSet, LoadedImages, load_images, scan_folder

    sets = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            sets.append(scan_folder(p))
        elif p.is_file():
            sets.append(ImageSet([p], None, None, str(p.parent)))
        else:
            raise UserError(f"--images '{p}' is neither an image file nor a folder")
    files = [f for s in sets for f in s.paths]
    loaded = load_images(ImageSet(files, None, None, "--images"), pre, workers, "images")
    if loaded.unreadable or not len(loaded.x):
        raise UserError(f"--images: {loaded.unreadable} of {len(files)} images could not be read"
                        + (f" (e.g. '{loaded.unreadable_example}')" if loaded.unreadable_example else ""))
    return dataclasses.replace(loaded, labels=None) if isinstance(loaded, LoadedImages) else loaded


def names_of(images: Any) -> list[str]:
    files = getattr(images, "files", None)
    if files is not None and len(files.paths) == len(images.x):
        return [Path(p).name for p in files.paths]
    return [f"image {i}" for i in range(len(images.x))]


def subset(x: np.ndarray, n: int) -> np.ndarray:
    """At most `n` images, evenly spaced (held-back images come class by class)."""
    if len(x) <= n:
        return x
    return x[np.linspace(0, len(x) - 1, n).round().astype(int)]
