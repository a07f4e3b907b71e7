"""One pipeline for every target and entry point:
load -> prepare -> quantize once -> export per target -> verify in the real runtime -> manifest."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .data import LoadedImages, default_calibration, load_images, scan_folder
from .errors import UserError
from .fileio import atomic_path, write_json
from .manifest import artifact_facts, build_manifest, tool_versions
from .models import LoadedModel, load_model
from .prepare import prepare
from .quantize import QuantizedModel, quantize
from .recipes import Recipe, load_recipe, options_for
from .targets import ExportRequest, get_target, parse_targets, target_names
from .verify import Fidelity, compare, measure_latency, run_batched, torch_logits

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ConvertSettings:
    """What `mnv4-deploy convert` was asked to do (the CLI's options, typed)."""

    model: str
    out: Path
    targets: str = "onnx"
    precision: str = "fp32"
    weights: str = "pretrained"
    num_classes: Optional[int] = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    calib: Optional[Path] = None
    val: Optional[Path] = None
    val_limit: Optional[int] = None
    recipe: Optional[str] = None
    # CLI flags that set fields of a target's Options (e.g. io_dtype for tflite), for every target that has them.
    target_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    latency_runs: int = 30
    progress: bool = True


@dataclass
class ArtifactResult:
    target: str
    precision: str
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]


@dataclass
class EvalData:
    """Images the artifacts are checked on, with the float model's logits computed once."""

    name: str  # 'held_back' (from the calibration folder) or 'val'
    source: str
    images: LoadedImages
    float_logits: np.ndarray
    simulated_logits: Optional[np.ndarray] = None


def _progress(settings: ConvertSettings) -> Optional[Callable]:
    if not settings.progress:
        return None
    from tqdm.auto import tqdm

    return lambda it, **kw: tqdm(it, leave=False, file=sys.stderr, **kw)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_data(settings: ConvertSettings, loaded: LoadedModel, recipe: Recipe) -> tuple[LoadedImages, str, LoadedImages, str]:
    """Calibration images and disjoint held-back images for verification."""
    pre = loaded.preprocessing
    n_cal, n_ver = recipe.quantization.calibration.images, recipe.verification.images
    seed = recipe.quantization.calibration.seed
    desc = "reading images" if settings.progress else ""
    if settings.calib is None:
        cal, cal_src = default_calibration(pre, n_cal if settings.precision == "int8" else 8, seed)
        ver, _ = default_calibration(pre, n_ver, seed + 1)
        return cal, cal_src, ver, "scikit-image sample photos (other random crops)"
    found = scan_folder(settings.calib)
    cal_set, ver_set = found.split(n_cal, n_ver, seed)
    cal = load_images(cal_set, pre, settings.workers, desc)
    ver = load_images(ver_set, pre, settings.workers, desc)
    unreadable = cal.unreadable + ver.unreadable
    if unreadable or found.skipped_files:
        log(f"note: skipped {unreadable} unreadable images and {found.skipped_files} non-image files in {settings.calib}")
    return cal, f"{settings.calib} ({len(cal)} images)", ver, f"{settings.calib} (held back, {len(ver)} images)"


def _installed(target: Any) -> bool:
    try:
        target.check_installed()
        return True
    except UserError as exc:
        log(f"note: skipping {target.name}: {exc}")
        return False


def _option_names(options_cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(options_cls)}


def _select_targets(settings: ConvertSettings) -> list[Any]:
    """The requested targets, checked: precision supported, toolchain installed, CLI target flags applicable."""
    targets = [get_target(n) for n in parse_targets(settings.targets)]
    if settings.targets.strip() == "all":  # 'all' = every target that is installed and supports the precision
        targets = [t for t in targets if settings.precision in t.precisions and _installed(t)]
        if not targets:
            raise UserError(f"no installed target supports {settings.precision}: pip install 'mnv4-deploy[all]'")
    for t in targets:
        if settings.precision not in t.precisions:
            raise UserError(f"target '{t.name}' does not support {settings.precision}: use {', '.join(t.precisions)}")
        t.check_installed()
    for key, value in settings.target_options.items():
        if value is not None and not any(key in _option_names(t.Options) for t in targets):
            owners = [n for n in target_names() if key in _option_names(get_target(n).Options)]
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} does not apply to {settings.targets}; it is an option of: {', '.join(owners)}")
    return targets


def apply_overrides(options: Any, overrides: dict[str, Any]) -> Any:
    """Set the given fields on a target's Options (frozen dataclass) where it has them."""
    names = _option_names(options)
    given = {k: v for k, v in overrides.items() if v is not None and k in names}
    return dataclasses.replace(options, **given) if given else options


@dataclass
class Run:
    """A convert/qat run after loading: checked targets, the prepared model, its data and float logits."""

    settings: ConvertSettings
    recipe: Recipe
    targets: list[Any]
    loaded: LoadedModel
    calibration: LoadedImages
    calibration_source: str
    evals: list[EvalData]
    progress: Optional[Callable]


def start_run(settings: ConvertSettings) -> Run:
    """Check the request, load and prepare the model, read calibration/held-back/val images."""
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown precision '{settings.precision}': use one of {', '.join(PRECISIONS)}")
    recipe = load_recipe(settings.recipe)
    targets = _select_targets(settings)
    loaded = load_model(settings.model, settings.weights, settings.num_classes, settings.preprocessing)
    prepare(loaded.model)
    log(f"model: {loaded.name} ({loaded.weights}), input {loaded.preprocessing.input_size}, {loaded.num_classes} classes")

    cal, cal_src, ver, ver_src = load_data(settings, loaded, recipe)
    batch = recipe.verification.batch_size
    evals = [EvalData("held_back", ver_src, ver, torch_logits(loaded.model, ver.x, batch))]
    if settings.val is not None:
        val_set = scan_folder(settings.val)
        if settings.val_limit:
            val_set = val_set.sample(settings.val_limit, seed=0)
        val = load_images(val_set, loaded.preprocessing, settings.workers, "reading val" if settings.progress else "")
        evals.append(EvalData("val", f"{settings.val} ({len(val)} images)", val, torch_logits(loaded.model, val.x, batch)))
    return Run(settings, recipe, targets, loaded, cal, cal_src, evals, _progress(settings))


def convert(settings: ConvertSettings,
            on_target_error: Optional[Callable[[str, Exception], None]] = None) -> list[ArtifactResult]:
    """Run the whole pipeline for each requested target; return one result per artifact.

    `on_target_error(target, exc)`, when given, receives a target's export/verification failure and the other
    targets go on with the same quantized model (the report grid uses this); by default the error propagates.
    """
    run = start_run(settings)
    quantized: Optional[QuantizedModel] = None
    if settings.precision == "int8":
        log(f"quantizing with recipe '{run.recipe.name}' on {run.calibration_source}")
        quantized = quantize(run.loaded.model, run.calibration, run.recipe, run.calibration_source, run.progress)
        if quantized.calibration.get("fallback"):
            from .sensitivity import fallback_line

            log(fallback_line(quantized.calibration["fallback"]))
    return deploy(run, quantized, on_target_error)


def deploy(run: Run, quantized: Optional[QuantizedModel],
           on_target_error: Optional[Callable[[str, Exception], None]] = None) -> list[ArtifactResult]:
    """Export the (PTQ- or QAT-) quantized model, or the float model, to every target and verify each."""
    settings, recipe, evals = run.settings, run.recipe, run.evals
    simulated: dict[int, np.ndarray] = {}
    results = []
    for target in run.targets:
        log(f"[{target.name}] exporting {settings.precision}")
        options = apply_overrides(options_for(recipe, target.name), settings.target_options)
        deployed = quantized.for_target(target.int16_activations) if quantized is not None else None
        if deployed is not None:
            # The fake-quant simulation is slow in PyTorch; the held-back images suffice to catch a runtime
            # that disagrees with it (a converter that re-quantizes or drops a quantizer). Targets without
            # int16 activations deploy (and are compared with) the int16 fallback's float variant.
            if id(deployed) not in simulated:
                simulated[id(deployed)] = deployed.simulate(evals[0].images.x, recipe.verification.batch_size)
            evals[0].simulated_logits = simulated[id(deployed)]
        request = ExportRequest(run.loaded, settings.precision, options, deployed, run.calibration)
        try:
            results.append(export_and_verify(target, request, recipe, evals, settings))
        except Exception as exc:
            if on_target_error is None or isinstance(exc, UserError):
                raise
            on_target_error(target.name, exc)
    return results


def export_and_verify(target: Any, request: ExportRequest, recipe: Recipe, evals: Sequence[EvalData],
                      settings: ConvertSettings) -> ArtifactResult:
    out_dir = Path(settings.out) / target.name
    final = out_dir / target.artifact_name
    # Export and verify inside the temporary location: only a verified artifact is renamed into place.
    with atomic_path(final) as tmp:
        export_info = target.export(request, tmp)
        runner = target.load(tmp, request)
        verification: dict[str, Any] = {"numbers": "measured" if runner.measured else "simulated"}
        batch = recipe.verification.batch_size
        for ev in evals:
            logits = run_batched(runner, ev.images.x, batch, runner.max_batch)
            entry = {"source": ev.source, "vs_float": compare(logits, ev.float_logits, ev.images.labels).to_dict()}
            if ev.simulated_logits is not None:
                entry["vs_pytorch_simulation"] = compare(logits, ev.simulated_logits).to_dict()
            verification[ev.name] = entry
        one = evals[0].images.x[:1]
        verification["latency"] = measure_latency(runner, one, runs=settings.latency_runs).to_dict()
        tensor_table = None
        if request.precision == "int8":
            verification["tensorwise"], tensor_table = tensorwise_check(target, tmp, request, evals[0].images.x)
        described = target.describe(tmp)
        spec = target.input_spec(tmp, request)
        facts = artifact_facts(tmp)
    loaded = request.loaded
    manifest = build_manifest(
        model=loaded.describe(),
        target=target.name,
        precision=request.precision,
        recipe=recipe.to_dict() | {"source": recipe.source},
        quantization=request.quantized.calibration if request.quantized else None,
        export=export_info,
        artifact=facts,
        input=spec,
        output={"name": "logits", "shape": [1, loaded.num_classes], "dtype": "float32", "meaning": "class logits"},
        structure=described,
        verification=verification,
        tool_versions=tool_versions(target.tool_versions()),
    )
    manifest_path = out_dir / "manifest.json"
    write_json(manifest_path, manifest)
    if tensor_table is not None:
        write_json(out_dir / "tensorwise.json", tensor_table)
    return ArtifactResult(target.name, request.precision, final, manifest_path, manifest)


def tensorwise_check(target: Any, path: Path, request: ExportRequest,
                     x: np.ndarray) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Every quantized activation of the artifact, from its runtime, against the PyTorch simulation.

    Returns the manifest's summary and the full table (for tensorwise.json beside the manifest). A flagged
    layer is a warning, never a failure; neither is an error in the check itself.
    """
    from . import tensorwise

    try:
        result = tensorwise.check(target, path, request, x[:tensorwise.IMAGES])
    except Exception as exc:  # the check must not cost the user a verified artifact
        log(f"warning: [{target.name}] tensor-by-tensor check failed: {type(exc).__name__}: {exc}")
        return {"status": f"error: {type(exc).__name__}: {exc}"}, None
    summary = result["summary"]
    line = tensorwise.warning_line(target.name, summary)
    if line:
        log(line)
    if "table" not in result:
        return summary, None
    summary["table"] = "tensorwise.json"
    return summary, {"target": target.name, "summary": summary, "tensors": result["table"]}


def sensitivity_report(settings: ConvertSettings, images: int = 128,
                       budget: Optional[float] = None) -> dict[str, Any]:
    """Calibrate with the recipe, then measure each quantizer's effect on held-back images.

    With `budget` (a top-1 agreement), also which activations a fallback would take out of int8 to reach it
    on the same images: what to put in a recipe's `quantization.fallback`.
    """
    from .sensitivity import analyse, choose_fallback

    recipe = load_recipe(settings.recipe)
    loaded = load_model(settings.model, settings.weights, settings.num_classes, settings.preprocessing)
    prepare(loaded.model)
    cal, cal_src, ver, ver_src = load_data(settings, loaded, recipe)
    quantized = quantize(loaded.model, cal, recipe, cal_src, _progress(settings))
    x = ver.x[:images]
    float_logits = torch_logits(loaded.model, x)
    result = analyse(quantized.prepared, x, float_logits, _progress(settings))
    if budget is not None:
        sites = sum(1 for r in result["sites"] if r["kind"] == "activation")
        chosen = choose_fallback(quantized.prepared, x, float_logits, budget, max_sites=sites)
        result["fallback"] = {"budget_agreement": budget, "activation_sites": sites,
                              "reached": chosen["agreement_history"][-1] >= budget} | chosen
    return {"model": loaded.describe(), "recipe": recipe.name, "calibration": quantized.calibration,
            "evaluated_on": ver_src} | result


def summary_table(results: Sequence[ArtifactResult]) -> str:
    """A short plain-text table: one row per artifact and evaluation set."""
    header = ("target", "precision", "eval", "images", "size MB", "cosine", "SQNR dB", "top1 agree",
              "top1 float", "top1 model", "latency ms")
    rows = []
    for r in results:
        v = r.manifest["verification"]
        for name in ("held_back", "val"):
            if name not in v:
                continue
            f = Fidelity(**v[name]["vs_float"])
            pct = lambda a: "-" if a is None else f"{100 * a:.2f}%"
            rows.append((r.target, r.precision + ("" if v["numbers"] == "measured" else " (simulated)"), name,
                         str(f.images), f"{r.manifest['artifact']['size_bytes'] / 1e6:.2f}", f"{f.cosine:.4f}",
                         f"{f.sqnr_db:.1f}", pct(f.top1_agreement), pct(f.reference_top1), pct(f.top1),
                         f"{v['latency']['median_ms']:.2f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
