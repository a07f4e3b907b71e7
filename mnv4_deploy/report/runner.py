"""Build (or reuse) every target x precision artifact through the one pipeline, and collect report cells.

`pipeline.convert` is called once per precision with every target that supports it, so an int8 run
calibrates the PT2E model once and all targets deploy that same quantized model. Artifacts land in
OUT/<precision>/<target>/ (convert's own OUT/<target>/ layout, one folder per precision).

Reuse: beside each manifest we write `report-key.json` holding a hash of everything that decides the
artifact and its numbers (model, weights sha256, recipe, target, precision, preprocessing, data and latency
settings, mnv4-deploy version). A later run with the same key whose artifact still has the manifest's sha256
reuses the cell instead of rebuilding it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import MissingDependencyError, UserError, VerificationError
from ..fileio import sha256_of, write_json
from ..pipeline import PRECISIONS, ArtifactResult, ConvertSettings, convert
from ..targets import get_target, parse_targets
from . import roofline
from .schema import cell_from_manifest, empty_cell, new_report

KEY_FILE = "report-key.json"


logger = logging.getLogger(__name__)

@dataclass
class ReportSettings:
    """What `mnv4-deploy report` was asked to build: a convert template plus the grid."""

    base: ConvertSettings  # model, weights, preprocessing, data, recipe; targets/precision/out are set per cell
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    reuse: bool = True
    roofline: bool = True
    sensitivity: bool = True  # per-layer int8 sensitivity (PyTorch simulation, a few seconds)


def parse_precisions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if text.strip() == "all":
        names = list(PRECISIONS)
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise UserError(f"--precisions takes a comma list of {', '.join(PRECISIONS)} (or 'all'), got '{text}'")
    return list(dict.fromkeys(names))


def _weights_id(weights: str) -> str:
    path = Path(weights).expanduser()
    return f"sha256:{sha256_of(path)}" if path.is_file() else weights


def cell_key(s: ConvertSettings, recipe: dict[str, Any], target: str, precision: str) -> str:
    """Hash of everything that decides an artifact and its verification numbers."""
    from .. import __version__

    parts = {
        "model": s.model, "weights": _weights_id(s.weights), "num_classes": s.num_classes,
        "preprocessing": s.preprocessing, "recipe": recipe, "target": target, "precision": precision,
        "calib": str(s.calib) if s.calib else None, "val": str(s.val) if s.val else None, "val_limit": s.val_limit,
        "latency_runs": s.latency_runs, "target_options": s.target_options, "mnv4_deploy": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(folder: Path, key: str) -> Optional[dict[str, Any]]:
    """The manifest in `folder` if it was built with `key` and its artifact is intact."""
    try:
        stored = json.loads((folder / KEY_FILE).read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    artifact = folder / manifest.get("artifact", {}).get("file", "")
    if stored.get("key") != key or not artifact.exists():
        return None
    return manifest if sha256_of(artifact) == manifest["artifact"]["sha256"] else None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Runner:
    """Walks the grid; one convert call per precision (one quantization shared by all targets)."""

    def __init__(self, rs: ReportSettings, convert_fn: Callable[..., list[ArtifactResult]] = convert):
        self.rs, self.convert = rs, convert_fn
        self.out = Path(rs.base.out)

    def _built_cell(self, r: ArtifactResult, key: str, status: str) -> dict[str, Any]:
        write_json(r.manifest_path.parent / KEY_FILE, {"key": key, "artifact_sha256": r.manifest["artifact"]["sha256"]})
        return cell_from_manifest(r.manifest, status, _rel(r.path, self.out), _rel(r.manifest_path, self.out))

    def _convert(self, names: list[str], precision: str, keys: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Build `names` at `precision` in one convert call; a failing target becomes a 'failed' cell."""
        s = dataclasses.replace(self.rs.base, targets=",".join(names), precision=precision, out=self.out / precision)
        failed: dict[str, dict[str, Any]] = {}

        def on_error(target: str, exc: Exception) -> None:  # the other targets go on with the same int8 model
            if isinstance(exc, VerificationError):  # the artifact was built and measured, and refused
                logger.warning(f"[{target}] {precision} failed verification: {exc}")
            else:
                logger.error(f"[{target}] {precision} FAILED:\n{''.join(traceback.format_exception(exc)).rstrip()}")
            failed[target] = empty_cell(target, precision, "failed", _first_line(exc))

        try:
            results = self.convert(s, on_target_error=on_error)
        except UserError:
            raise
        except Exception as exc:  # before any export (loading, calibration): every target of this precision fails
            logger.error(f"{precision} FAILED before export:\n{traceback.format_exc().rstrip()}")
            return {n: empty_cell(n, precision, "failed", _first_line(exc)) for n in names}
        built = {r.target: self._built_cell(r, keys[r.target], "built") for r in results}
        return built | failed

    def run(self) -> list[dict[str, Any]]:
        from ..recipes import load_recipe

        base = self.rs.base
        recipe = load_recipe(base.recipe)
        recipe_dict = recipe.to_dict() | {"source": recipe.source}
        targets = parse_targets(base.targets)
        grid = [(p, t) for p in self.rs.precisions for t in targets]
        bar = _bar(len(grid), base.progress)
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        for precision in self.rs.precisions:
            pending, keys = [], {}
            for name in targets:
                target = get_target(name)
                if precision not in target.precisions:
                    cells[(name, precision)] = empty_cell(
                        name, precision, "skipped", f"{name} does not support {precision} (supports {', '.join(target.precisions)})")
                    bar(f"{name} {precision}: skipped")
                    continue
                try:
                    target.check_installed()
                except MissingDependencyError as exc:
                    cells[(name, precision)] = empty_cell(name, precision, "skipped", str(exc))
                    bar(f"{name} {precision}: not installed")
                    continue
                keys[name] = cell_key(base, recipe_dict, name, precision)
                folder = self.out / precision / name
                manifest = _reusable(folder, keys[name]) if self.rs.reuse else None
                if manifest is not None:
                    cells[(name, precision)] = cell_from_manifest(
                        manifest, "reused", _rel(folder / manifest["artifact"]["file"], self.out),
                        _rel(folder / "manifest.json", self.out), "same manifest hash: not rebuilt")
                    bar(f"{name} {precision}: reused")
                else:
                    pending.append(name)
            if pending:
                logger.info(f"building {precision}: {', '.join(pending)}")
                for name, cell in self._convert(pending, precision, keys).items():
                    cells[(name, precision)] = cell
                    bar(f"{name} {precision}: {cell['status']}")
        bar(None)
        return [cells[(t, p)] for p, t in grid]


def _bar(total: int, enabled: bool) -> Callable[[Optional[str]], None]:
    """A progress bar over grid cells (one tick per target x precision); `None` closes it."""
    if not enabled:
        return lambda msg: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="report", unit="cell", file=sys.stderr, position=0)

    def tick(msg: Optional[str]) -> None:
        if msg is None:
            bar.close()
        else:
            bar.set_postfix_str(msg)
            bar.update(1)
    return tick


def build_report(rs: ReportSettings, convert_fn: Callable[..., list[ArtifactResult]] = convert) -> dict[str, Any]:
    """Run the grid and assemble report.json's content (cells + roofline estimates + provenance)."""
    from ..manifest import tool_versions
    from ..models import load_model
    from ..prepare import prepare
    from ..targets import target_names

    base = rs.base
    parse_precisions(",".join(rs.precisions))
    cells = Runner(rs, convert_fn).run()
    loaded = load_model(base.model, base.weights, base.num_classes, base.preprocessing)
    prepare(loaded.model)
    model = loaded.describe()
    if loaded.weights == "random":
        model["note"] = "random weights: each convert run draws new ones; fidelity numbers are not meaningful"
    roof = None
    if rs.roofline:
        logger.info("roofline: recording layer shapes")
        roof = roofline.estimate(roofline.record_layers(loaded.model, loaded.preprocessing.input_shape), rs.precisions)
    sens = None
    if rs.sensitivity and "int8" in rs.precisions:
        from .sensitivity import recipe_sensitivity, report_section

        logger.info("sensitivity: the recipe's int8 model, one quantizer at a time")
        sens = report_section(recipe_sensitivity(dataclasses.replace(base, precision="int8"), images=64))
    extra: dict[str, str] = {}
    for name in target_names():
        t = get_target(name)
        extra.update(t.tool_versions())
    settings = {
        "model": base.model, "weights": base.weights, "num_classes": loaded.num_classes,
        "input_size": list(loaded.preprocessing.input_size), "preprocessing": loaded.preprocessing.to_dict(),
        "recipe": base.recipe or "ptq-int8 (default)", "targets": parse_targets(base.targets),
        "precisions": rs.precisions, "calib": str(base.calib) if base.calib else None,
        "val": str(base.val) if base.val else None, "val_limit": base.val_limit, "latency_runs": base.latency_runs,
    }
    return new_report(model, settings, cells, roof, tool_versions(extra)) | {"sensitivity": sens}
