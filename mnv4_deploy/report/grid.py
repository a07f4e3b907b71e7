"""Build (or reuse) every model x target x precision artifact through the one pipeline, and collect report cells.

`pipeline.convert` is called once per model and precision with every target that supports it, so an int8 run
calibrates the PT2E model once and all targets deploy that same quantized model. Artifacts land in
OUT/<model key>/<precision>/<target>/ (convert's own OUT/<target>/ layout, one folder per precision).

A zoo is a list of ReportSettings (one per model). `--shard i/n` builds a contiguous, deterministic slice of
the zoo's cell list (model, precision, target order), so cells of one model and precision mostly stay in one
shard and share their calibration; the CI system runs the shards in parallel, `merge_reports` joins them.

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
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..errors import MissingDependencyError, UserError, VerificationError
from ..infra import console
from ..infra.fileio import sha256_of, write_json
from ..pipeline import PRECISIONS, ArtifactResult, ConvertSettings, convert
from ..targets import check_recipe_targets, get_target, parse_targets
from . import roofline
from .schema import cell_from_manifest, cell_id, empty_cell, model_section, new_report

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
    key: str = ""  # the model's name in the zoo (default: the model name)

    @property
    def name(self) -> str:
        return self.key or self.base.model


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
        # manifests from before per-image predictions and intervals cannot feed the paired gate: rebuild them
        "report_format": 2,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(folder: Path, key: str) -> Optional[dict[str, Any]]:
    """The manifest in `folder` if it was built with `key` and its artifact is intact."""
    from ..verify.manifest import validate_manifest

    try:
        stored = json.loads((folder / KEY_FILE).read_text())
        manifest = validate_manifest(json.loads((folder / "manifest.json").read_text()), str(folder))
    except (OSError, json.JSONDecodeError, UserError):  # unreadable or edited: rebuild it
        return None
    artifact = folder / manifest["artifact"]["file"]
    if not isinstance(stored, dict) or stored.get("key") != key or not artifact.exists():
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


class GridBuilder:
    """Walks the grid; one convert call per precision (one quantization shared by all targets)."""

    def __init__(self, rs: ReportSettings, convert_fn: Callable[..., list[ArtifactResult]] = convert,
                 only: Optional[set[tuple[str, str]]] = None, root: Optional[Path] = None):
        self.rs, self.convert = rs, convert_fn
        self.out = Path(rs.base.out)
        self.root = Path(root) if root is not None else self.out  # paths in cells are relative to this
        self.only = only  # (precision, target) pairs of this shard; None: all

    def _built_cell(self, r: ArtifactResult, key: str, status: str) -> dict[str, Any]:
        write_json(r.manifest_path.parent / KEY_FILE, {"key": key, "artifact_sha256": r.manifest["artifact"]["sha256"]})
        return cell_from_manifest(r.manifest, status, _rel(r.path, self.root), _rel(r.manifest_path, self.root),
                                  model=self.rs.name)

    def _convert(self, names: list[str], precision: str, keys: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Build `names` at `precision` in one convert call; a failing target becomes a 'failed' cell."""
        s = dataclasses.replace(self.rs.base, targets=",".join(names), precision=precision, out=self.out / precision)
        failed: dict[str, dict[str, Any]] = {}

        model = self.rs.name

        def on_error(target: str, exc: Exception) -> None:  # the other targets go on with the same int8 model
            if isinstance(exc, VerificationError):  # the artifact was built and measured, and refused
                logger.warning(f"[{target}] {precision} failed verification: {exc}")
            else:
                logger.error(f"[{target}] {precision} FAILED:\n{''.join(traceback.format_exception(exc)).rstrip()}")
            failed[target] = empty_cell(target, precision, "failed", _first_line(exc), model)

        try:
            results = self.convert(s, on_target_error=on_error)
        except UserError:
            raise
        except Exception as exc:  # before any export (loading, calibration): every target of this precision fails
            logger.error(f"{precision} FAILED before export:\n{traceback.format_exc().rstrip()}")
            return {n: empty_cell(n, precision, "failed", _first_line(exc), model) for n in names}
        built = {r.target: self._built_cell(r, keys[r.target], "built") for r in results}
        return built | failed

    def run(self) -> list[dict[str, Any]]:
        from ..config.recipes import load_recipe

        base = self.rs.base
        recipe = check_recipe_targets(load_recipe(base.recipe))
        recipe_dict = recipe.to_dict() | {"source": recipe.source}
        targets = parse_targets(base.targets)
        grid = [(p, t) for p in self.rs.precisions for t in targets if self.only is None or (p, t) in self.only]
        bar = _bar(len(grid), base.progress)
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        model = self.rs.name
        for precision in self.rs.precisions:
            pending, keys = [], {}
            for name in targets:
                if (precision, name) not in grid:
                    continue
                target = get_target(name)
                if precision not in target.precisions:
                    cells[(name, precision)] = empty_cell(
                        name, precision, "skipped",
                        f"{name} does not support {precision} (supports {', '.join(target.precisions)})", model)
                    bar(f"{name} {precision}: skipped")
                    continue
                try:
                    target.check_installed()
                except MissingDependencyError as exc:
                    cells[(name, precision)] = empty_cell(name, precision, "skipped", str(exc), model)
                    bar(f"{name} {precision}: not installed")
                    continue
                keys[name] = cell_key(base, recipe_dict, name, precision)
                folder = self.out / precision / name
                manifest = _reusable(folder, keys[name]) if self.rs.reuse else None
                if manifest is not None:
                    cells[(name, precision)] = cell_from_manifest(
                        manifest, "reused", _rel(folder / manifest["artifact"]["file"], self.root),
                        _rel(folder / "manifest.json", self.root), "same manifest hash: not rebuilt", model)
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

    bar = tqdm(total=total, desc="report", unit="cell", file=console.stderr(), position=0)

    def tick(msg: Optional[str]) -> None:
        if msg is None:
            bar.close()
        else:
            bar.set_postfix_str(msg)
            bar.update(1)
    return tick


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'2/4' -> (2, 4): the second of four shards (1-based, as CI matrices count)."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 1/4 (the first of four shards), got '{text}'") from None
    if not 1 <= i <= n:
        raise UserError(f"--shard {text}: I must be between 1 and N")
    return i, n


def plan(zoo: Sequence[ReportSettings]) -> list[tuple[str, str, str]]:
    """Every cell of the zoo, (model key, precision, target), in a fixed order: the list shards split."""
    names = [rs.name for rs in zoo]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"the zoo lists '{dup[0]}' twice: give each entry a distinct name (YAML key 'name')")
    return [(rs.name, p, t) for rs in zoo for p in rs.precisions for t in parse_targets(rs.base.targets)]


def shard_of(cells: Sequence[tuple[str, str, str]], shard: Optional[tuple[int, int]]) -> list[tuple[str, str, str]]:
    """Shard i of n: the i-th of n contiguous, near-equal slices of the plan (stable for a given zoo)."""
    if shard is None:
        return list(cells)
    i, n = shard
    return list(cells[(i - 1) * len(cells) // n:i * len(cells) // n])


def _plan_id(cell: tuple[str, str, str]) -> str:
    return f"{cell[0]}/{cell[2]}/{cell[1]}"


def build_report(zoo: ReportSettings | Sequence[ReportSettings],
                 convert_fn: Callable[..., list[ArtifactResult]] = convert,
                 shard: Optional[tuple[int, int]] = None, out: Optional[Path] = None) -> dict[str, Any]:
    """Run the zoo's grid (or one shard of it) and assemble report.json's content: cells in plan order, and a
    section per model (roofline estimates, sensitivity, provenance) written by the shard holding its first cell."""
    from ..targets import target_names
    from ..verify.manifest import tool_versions

    zoo = [zoo] if isinstance(zoo, ReportSettings) else list(zoo)
    root = Path(out) if out is not None else Path(zoo[0].base.out)
    full = plan(zoo)
    mine = shard_of(full, shard)
    if not mine:
        logger.warning(f"shard {shard[0]}/{shard[1]} has no cells: the zoo has only {len(full)}")
    cells: list[dict[str, Any]] = []
    sections = []
    for rs in zoo:
        wanted = {(p, t) for k, p, t in mine if k == rs.name}
        if not wanted:
            continue
        parse_precisions(",".join(rs.precisions))
        if out is not None:
            rs = dataclasses.replace(rs, base=dataclasses.replace(rs.base, out=root / rs.name))
        built = GridBuilder(rs, convert_fn, only=wanted, root=root).run()
        cells += built
        if next(c for c in full if c[0] == rs.name) in mine:  # this shard owns the model's section
            sections.append(_model_section(rs, built, root))
    extra: dict[str, str] = {}
    for name in target_names():
        extra.update(get_target(name).tool_versions())
    import platform

    for c in cells:  # a merged report's cells come from several CI machines; latency compares on one host
        c["host"] = platform.node()
    order = {_plan_id(c): i for i, c in enumerate(full)}
    cells.sort(key=lambda c: order[cell_id(c)])
    shard_info = None if shard is None else {"index": shard[0], "count": shard[1], "plan": list(order),
                                             "settings": {rs.name: run_settings(rs) for rs in zoo}}
    return new_report(sections, cells, tool_versions(extra), shard_info)


def _model_section(rs: ReportSettings, cells: Optional[list[dict[str, Any]]] = None,
                   root: Optional[Path] = None) -> dict[str, Any]:
    """Provenance, roofline estimates (at the artifacts' input size), sensitivity, and int8 against float timed
    interleaved per runtime (for the targets whose fp32 and int8 cells `cells` holds) of one zoo model."""
    from ..load.models import load_model
    from ..preparation.prepare import prepare

    base = rs.base
    loaded = load_model(base.model, base.weights, base.num_classes, base.preprocessing)
    prepare(loaded.model)
    model = loaded.describe()
    if loaded.weights == "random":
        model["note"] = "random weights (seed 0, the same in every run): fidelity numbers are not meaningful"
    size = list(loaded.preprocessing.input_size)
    size_source = "--input-size" if (base.preprocessing or {}).get("input_size") else "the model's native size"
    roof = None
    if rs.roofline:
        logger.info(f"roofline: recording layer shapes of {rs.name} at {size}")
        roof = roofline.estimate(roofline.record_layers(loaded.model, loaded.preprocessing.input_shape), rs.precisions)
        roof["input_size"] = {"value": size, "source": size_source}
    sens = None
    if rs.sensitivity and "int8" in rs.precisions:
        from .sensitivity_section import recipe_sensitivity, report_section

        logger.info(f"sensitivity of {rs.name}: the recipe's int8 model, one quantizer at a time")
        sens = report_section(recipe_sensitivity(dataclasses.replace(base, precision="int8"), images=64))
    settings = {
        "model": base.model, "weights": base.weights, "num_classes": loaded.num_classes,
        "input_size": size, "input_size_source": size_source, "preprocessing": loaded.preprocessing.to_dict(),
        "recipe": base.recipe or "ptq-int8 (default)", "targets": parse_targets(base.targets),
        "precisions": rs.precisions, "calib": str(base.calib) if base.calib else None,
        "val": str(base.val) if base.val else None, "val_limit": base.val_limit, "latency_runs": base.latency_runs,
    }
    speed = None
    if cells and root is not None:
        from ..config.recipes import load_recipe
        from .speed_section import speed_rows

        speed = speed_rows(cells, root, loaded, load_recipe(base.recipe), base.target_options, base.latency_runs)
    return model_section(rs.name, model, settings, roof, sens, speed)


def run_settings(rs: ReportSettings) -> dict[str, Any]:
    """What decides a zoo model's numbers, as a shard records it: shards built with different settings (another
    input size, weights or recipe) are different runs and must not be merged."""
    s = rs.base
    return json.loads(json.dumps({
        "model": s.model, "weights": _weights_id(s.weights), "num_classes": s.num_classes,
        "preprocessing": s.preprocessing, "recipe": s.recipe, "targets": parse_targets(s.targets),
        "precisions": rs.precisions, "val_limit": s.val_limit, "latency_runs": s.latency_runs,
        "target_options": s.target_options, "verify_gate": s.verify_gate}, default=str))


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """The first setting two shards disagree on, as 'input_size: [32] vs [48]'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'settings'}: {json.dumps(a)[:60]} vs {json.dumps(b)[:60]}"


def _same_run(reports: Sequence[dict[str, Any]], sources: Sequence[str]) -> None:
    """Refuse shards whose recorded settings, or whose cells' input shapes, differ for a model."""
    settings = [(r["shard"].get("settings"), src) for r, src in zip(reports, sources)]
    recorded = [(s, src) for s, src in settings if s is not None]
    for s, src in recorded[1:]:
        first, first_src = recorded[0]
        if s != first:
            raise UserError(f"the shards come from different runs: {first_src} and {src} differ in "
                            f"{_first_difference(first, s)}: merge the shards of one `report --shard i/n` matrix")
    shapes: dict[str, tuple[list[int], str]] = {}  # shards written before settings were recorded
    for r, src in zip(reports, sources):
        for c in r["cells"]:
            if not c.get("input_shape"):
                continue
            dims = sorted(c["input_shape"])  # NCHW and NHWC artifacts of one run have the same dimensions
            seen = shapes.setdefault(c.get("model", ""), (dims, src))
            if seen[0] != dims:
                raise UserError(f"the shards come from different runs: model '{c.get('model', '')}' has input "
                                f"dimensions {seen[0]} in {seen[1]} but {dims} in {src}: merge the shards of one "
                                "`report --shard i/n` matrix")


def merge_reports(reports: Sequence[dict[str, Any]], sources: Sequence[str]) -> dict[str, Any]:
    """Join the shards of one zoo run into one report; refuses shards of different runs, duplicates or gaps."""
    shards = [r.get("shard") for r in reports]
    if any(s is None for s in shards):
        bad = sources[shards.index(None)]
        raise UserError(f"{bad} is not a shard (built without --shard): merge only the shards of one run")
    plans = {tuple(s["plan"]) for s in shards}
    counts = {s["count"] for s in shards}
    if len(plans) > 1 or len(counts) > 1:
        raise UserError("the shards come from different runs (their zoo or shard count differ): "
                         "merge the shards of one `report --shard i/n` matrix")
    _same_run(reports, sources)
    n = counts.pop()
    seen: dict[int, str] = {}
    for s, src in zip(shards, sources):
        if s["index"] in seen:
            raise UserError(f"shard {s['index']}/{n} given twice ({seen[s['index']]} and {src})")
        seen[s["index"]] = src
    missing = sorted(set(range(1, n + 1)) - set(seen))
    if missing:
        raise UserError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing: pass every shard's report.json")
    full = list(plans.pop())
    cells = {cell_id(c): c for r in reports for c in r["cells"]}
    lost = [c for c in full if c not in cells]
    if lost:
        raise UserError(f"the shards lack cell(s) {', '.join(lost[:3])}: rebuild those shards")
    sections: dict[str, dict[str, Any]] = {}
    for r in reports:
        for m in r["models"]:
            sections.setdefault(m["key"], m)
    keys = list(dict.fromkeys(c.split("/")[0] for c in full))
    tools: dict[str, str] = {}
    for r in reports:
        tools.update(r.get("tool_versions", {}))
    merged = new_report([sections[k] for k in keys if k in sections], [cells[c] for c in full], tools)
    merged["merged_from"] = [{"source": src, "shard": f"{s['index']}/{n}", "host": r.get("host", {}).get("hostname"),
                              "created": r.get("created")} for r, s, src in zip(reports, shards, sources)]
    return merged
