"""One pipeline for every target and entry point:
load -> prepare -> quantize once -> export per target -> verify in the real runtime -> manifest."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .config.options import field_names
from .config.recipes import Recipe, load_recipe
from .errors import UserError, VerificationError
from .infra.fileio import ensure_writable_dir
from .infra.stages import clock, run_clock, stage
from .infra.transaction import Staging, TargetLocks, lock_targets, staged
from .infra.worker import Worker
from .infra.worker import start as start_worker
from .load.images import LoadedImages, load_images, scan_folder
from .load.models import LoadedModel, load_model
from .preparation.prepare import prepare
from .quantization.pt2e import QuantizedModel, quantize
from .targets import ExportRequest, check_recipe_targets, get_target, options_for, parse_targets, target_names
from .verify import tensorwise
from .verify.artifact_gate import gate_record
from .verify.fidelity import compare, run_batched, torch_logits
from .verify.latency import measure_latency
from .verify.manifest import NUMBERS_KINDS, PRECISIONS, artifact_facts, build_manifest, tool_versions
from .verify.predictions import evaluation_record
from .verify.simulations import Simulations

FAILED_MANIFEST = "manifest.failed.json"  # beside the artifact path when the verification gate refused it
logger = logging.getLogger(__name__)


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
    # None: the recipe's verification.gate; False: write artifacts that fail verification (manifest says so).
    verify_gate: Optional[bool] = None
    # calib may also name a calibration set (calibration/*.yaml) whose paths are relative to calib_root.
    calib_root: Optional[Path] = None
    calib_allow_changed: bool = False  # calibrate on a set whose files changed (the digest says what was used)
    val_labels: Optional[Path] = None  # ground truth for a flat --val folder (ImageNet's val split)

    def gate_enforced(self, recipe: Recipe) -> bool:
        """Whether an artifact that fails verification is refused: --[no-]verify-gate, else the recipe's gate."""
        return recipe.verification.gate if self.verify_gate is None else self.verify_gate

    def __post_init__(self) -> None:
        """Counts checked before any work: a 0 here used to fail only after the whole export."""
        for flag, value, low in (("--latency-runs", self.latency_runs, 1), ("--workers", self.workers, 0),
                                 ("--val-limit", self.val_limit, 1), ("--num-classes", self.num_classes, 1)):
            if value is not None and value < low:
                raise UserError(f"{flag} must be at least {low}, got {value}")
        from .load.preprocessing import Preprocessing

        Preprocessing().with_overrides(**self.preprocessing)  # --input-size, --mean, ... in range, before loading


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


def load_data(settings: ConvertSettings, loaded: LoadedModel, recipe: Recipe) -> tuple[LoadedImages, str, LoadedImages, str]:
    """Calibration images and disjoint held-back images for verification (a folder, a calibration set, or the
    scikit-image photos: mnv4_deploy/load/calibration_sets.py); the calibration images carry their set's name and digest."""
    from .load.calibration_sets import load_calibration

    data = load_calibration(settings.calib, settings.calib_root, recipe, loaded.preprocessing, settings.precision,
                            settings.calib_allow_changed, settings.workers)
    data.calibration.calibration_set = data.calibration_set
    return data.calibration, data.calibration_source, data.held_back, data.held_back_source


def _installed(target: Any) -> bool:
    try:
        target.check_installed()
        return True
    except UserError as exc:
        logger.warning(f"note: skipping {target.name}: {exc}")
        return False


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
        if value is not None and not any(key in field_names(t.Options) for t in targets):
            owners = [n for n in target_names() if key in field_names(get_target(n).Options)]
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} does not apply to {settings.targets}; it is an option of: {', '.join(owners)}")
    return targets


def apply_overrides(options: Any, overrides: dict[str, Any]) -> Any:
    """Set the given fields on a target's Options (frozen dataclass) where it has them."""
    names = field_names(options)
    given = {k: v for k, v in overrides.items() if v is not None and k in names}
    return dataclasses.replace(options, **given) if given else options


@dataclass
class LoadedRun:
    """A convert/qat run after loading: checked targets, the prepared model, its data and float logits."""

    settings: ConvertSettings
    recipe: Recipe
    targets: list[Any]
    loaded: LoadedModel
    calibration: LoadedImages
    calibration_source: str
    evals: list[EvalData]
    locks: Optional[TargetLocks] = None  # OUT/<target>/ of every target, held from the start (infra/transaction.py)

    def release(self) -> None:
        """Let other runs write the output folders again."""
        if self.locks is not None:
            self.locks.release()


def start_run(settings: ConvertSettings, lock: bool = True) -> LoadedRun:
    """Check the request, load and prepare the model, read calibration/held-back/val images.

    `lock`: take the output folders' locks (every process but a torchrun job's writer passes False)."""
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown precision '{settings.precision}': use one of {', '.join(PRECISIONS)}")
    recipe = check_recipe_targets(load_recipe(settings.recipe))
    targets = _select_targets(settings)
    ensure_writable_dir(settings.out)
    if settings.weights == "pretrained":  # out of reach (offline, not cached): say so now, not after a minute
        from .load.hub import require_pretrained

        require_pretrained(settings.model)
    names = [t.name for t in targets] if lock else []
    locks = lock_targets(settings.out, names)  # before the slow work: a second run into OUT is refused now
    try:
        return _load_run(settings, recipe, targets, locks)
    except BaseException:
        locks.release()
        raise


def _load_run(settings: ConvertSettings, recipe: Recipe, targets: list[Any], locks: TargetLocks) -> LoadedRun:
    """start_run's slow part (model, images, float logits), done while the output folders are locked."""
    with stage("load_model", f"loading {settings.model}"):
        loaded = load_model(settings.model, settings.weights, settings.num_classes, settings.preprocessing)
        prepare(loaded.model)
    logger.info(f"model: {loaded.name} ({loaded.weights}), input {loaded.preprocessing.input_size}, {loaded.num_classes} classes")

    with stage("read_images", "reading images", shown=False):
        cal, cal_src, ver, ver_src = load_data(settings, loaded, recipe)
        val = None
        if settings.val is not None:
            val_set = scan_folder(settings.val, labels_file=settings.val_labels)
            if settings.val_limit:
                val_set = val_set.sample(settings.val_limit, seed=0)
            val = load_images(val_set, loaded.preprocessing, settings.workers, "val images")
    batch = recipe.verification.batch_size
    with stage("float_logits", "float model on the evaluation images"):
        evals = [EvalData("held_back", ver_src, ver, torch_logits(loaded.model, ver.x, batch))]
        if val is not None:
            evals.append(EvalData("val", f"{settings.val} ({len(val)} images)", val,
                                  torch_logits(loaded.model, val.x, batch)))
    return LoadedRun(settings, recipe, targets, loaded, cal, cal_src, evals, locks)


def convert(settings: ConvertSettings,
            on_target_error: Optional[Callable[[str, Exception], None]] = None) -> list[ArtifactResult]:
    """Run the whole pipeline for each requested target; return one result per artifact.

    `on_target_error(target, exc)`, when given, receives a target's export/verification failure and the other
    targets go on with the same quantized model (the report grid uses this); by default the error propagates.
    """
    with run_clock(settings.progress):
        return _convert(settings, on_target_error)


def _convert(settings: ConvertSettings,
             on_target_error: Optional[Callable[[str, Exception], None]]) -> list[ArtifactResult]:
    run = start_run(settings)
    try:
        return deploy(run, ptq_for(run), on_target_error)
    finally:
        run.release()


def ptq_for(run: LoadedRun) -> Callable[[Any], Optional[QuantizedModel]]:
    """`quantized_for(target)` of a PTQ run (convert, and `debug` rebuilding a convert's int8 model)."""
    settings = run.settings
    quantizations: dict[Any, QuantizedModel] = {}

    def quantized_for(target: Any) -> Optional[QuantizedModel]:
        """PTQ once per quantizer: every target that keeps the shared PT2E quantizer shares one model."""
        if settings.precision != "int8":
            return None
        key = target.quantizer_key()
        if key not in quantizations:
            logger.info(f"quantizing with recipe '{run.recipe.name}' on {run.calibration_source}")
            with stage("quantize", "quantizing", shown=False):
                quantizations[key] = quantize(run.loaded.model, run.calibration, run.recipe, run.calibration_source,
                                              quantizer=target.build_quantizer(run.recipe.quantization))
            if quantizations[key].calibration.get("fallback"):
                from .quantization.sensitivity import fallback_line

                logger.info(fallback_line(quantizations[key].calibration["fallback"]))
        return quantizations[key]

    return quantized_for


def export_request(run: LoadedRun, target: Any, quantized: Optional[QuantizedModel]) -> ExportRequest:
    """What `target` exports: the recipe's options with the command's flags, the model it deploys (targets
    without int16 activations deploy the int16 fallback's float variant)."""
    options = apply_overrides(options_for(run.recipe, target.name), run.settings.target_options)
    deployed = quantized.for_target(target.int16_activations) if quantized is not None else None
    return ExportRequest(run.loaded, run.settings.precision, options, deployed, run.calibration)


def deploy(run: LoadedRun, quantized_for: Callable[[Any], Optional[QuantizedModel]],
           on_target_error: Optional[Callable[[str, Exception], None]] = None) -> list[ArtifactResult]:
    """Export the (PTQ- or QAT-) quantized model, or the float model, to every target and verify each.

    `quantized_for(target)` gives the int8 model a target deploys (None for float artifacts). Targets whose export
    is self-contained (`Target.exports_in_worker`: TFLite, ExecuTorch) may export in a forked worker process
    (infra/worker.py, `_worker_targets` says which) while this process exports and verifies the others; their
    artifacts are verified here once the worker hands them over. Latencies are timed once the worker is done (nothing else runs then), and each
    folder is committed in the user's order; an artifact the gate refuses ends the run at once.
    """
    settings, recipe = run.settings, run.recipe
    # The PyTorch simulation's logits on the held-back images (they suffice to catch a runtime that re-quantizes
    # or drops a quantizer), computed while each target exports and shared by the targets deploying one model.
    simulations = Simulations(recipe.verification.batch_size)
    enforced = settings.gate_enforced(recipe)
    results: dict[str, ArtifactResult] = {}

    def failed(target: Any, exc: Exception) -> None:
        if on_target_error is None or isinstance(exc, UserError):
            raise exc
        on_target_error(target.name, exc)

    with contextlib.ExitStack() as held:  # staging folders, removed at the end unless committed
        def staging_for(target: Any) -> Staging:
            return held.enter_context(staged(Path(settings.out) / target.name, target.artifact_name))

        offloaded: dict[str, tuple[ExportRequest, Staging]] = {}
        for target in _worker_targets(run.targets):
            try:  # quantized (and staged) here, before the fork: the worker inherits the model
                offloaded[target.name] = (export_request(run, target, quantized_for(target)), staging_for(target))
            except Exception as exc:
                failed(target, exc)
        by_name = {t.name: t for t in run.targets}
        worker = start_worker([(name, functools.partial(export_artifact, by_name[name], request, staging.artifact))
                               for name, (request, staging) in offloaded.items()])
        verified: dict[str, tuple[ExportRequest, Staging, dict[str, Any], Verified]] = {}
        try:
            order = [t for t in run.targets if worker is None or t.name not in offloaded] + \
                    ([by_name[name] for name in offloaded] if worker is not None else [])  # in the worker's order
            for target in order:
                try:
                    # quantizing (once, shared) is a stage of the run, not of the target that first needs it
                    request, staging = offloaded.get(target.name) or (
                        export_request(run, target, quantized_for(target)), staging_for(target))
                    with stage(target.name, shown=False):
                        export_info, v = _export_and_check(run, target, request, staging, simulations, worker,
                                                           enforced)
                        if not v.verification["gate"]["passed"] and enforced:  # refused now, not after the others
                            finish_artifact(target, request, recipe, settings, staging, export_info, v, enforced)
                        verified[target.name] = (request, staging, export_info, v)
                except Exception as exc:
                    failed(target, exc)
        finally:
            simulations.close()
            if worker is not None:
                worker.close()  # before its staging folders are removed; at once if the run was interrupted
        for target in run.targets:  # nothing else runs now: the latencies are timed on a quiet machine
            if target.name in verified:
                request, staging, export_info, v = verified[target.name]
                try:
                    with stage(target.name, shown=False):
                        results[target.name] = finish_artifact(target, request, recipe, settings, staging,
                                                                export_info, v, enforced)
                except Exception as exc:
                    failed(target, exc)
    return [results[t.name] for t in run.targets if t.name in results]


def _worker_targets(targets: Sequence[Any]) -> list[Any]:
    """The targets whose exports go to the worker process, longest first: of those that allow it, each goes there
    while the worker has less work than this process (`Target.work_seconds`), so the two finish together."""
    here = sum(t.work_seconds for t in targets if not t.exports_in_worker)
    there, chosen = 0.0, []
    for t in sorted((t for t in targets if t.exports_in_worker), key=lambda t: -t.work_seconds):
        if there < here:
            chosen.append(t)
            there += t.work_seconds
        else:
            here += t.work_seconds
    return chosen


def _export_and_check(run: LoadedRun, target: Any, request: ExportRequest, staging: Staging,
                      simulations: Simulations, worker: Optional[Worker],
                      enforced: bool) -> tuple[dict[str, Any], Verified]:
    """Export one target's artifact into `staging` (or take it from the worker) and verify it."""
    deployed = request.quantized
    simulated = None
    if deployed is not None and target.deploys_simulated_model(request):
        semantics = target.simulation_semantics(request)
        if target.verifies_every_image(request):
            simulations.start(deployed, semantics, run.evals[0].images.x)
        simulated = simulations.reference(deployed, semantics)
    if worker is not None and target.name in worker.names:
        with stage("export_wait", f"[{target.name}] exporting {request.precision} (in the export worker)"):
            export_info, worker_seconds = worker.result(target.name)
        c = clock()
        if c is not None:  # the export's own stages, timed in the worker
            for name, seconds in worker_seconds.items():
                c.add(f"{target.name}/{name}", seconds)
    else:
        export_info = export_artifact(target, request, staging.artifact)
    return export_info, verify_artifact(target, request, staging.artifact, run.recipe, run.evals, enforced, simulated)


def _measure(runner: Any, evals: Sequence[EvalData], batch: int,
             simulated: Optional[np.ndarray]) -> tuple[dict[str, Any], np.ndarray]:
    """The artifact's outputs on every evaluation set, compared with float; the first set (the held-back images)
    also with `simulated`, the PyTorch simulation's logits on it. Returns the manifest entries and the first
    set's logits, which the gate judges."""
    verification: dict[str, Any] = {}
    first = None
    for i, ev in enumerate(evals):
        logits = run_batched(runner, ev.images.x, batch, runner.max_batch)
        entry = {"source": ev.source, "vs_float": compare(logits, ev.float_logits, ev.images.labels).to_dict()}
        entry |= evaluation_record(logits, ev.float_logits, ev.images)  # digest, per-image top-1, 95% intervals
        if i == 0:
            first = logits
            if simulated is not None:
                entry["vs_pytorch_simulation"] = compare(logits, simulated).to_dict()
        verification[ev.name] = entry
    return verification, first


def _within_limit(runner: Any, evals: Sequence[EvalData],
                  simulated: Any) -> tuple[Sequence[EvalData], Any]:
    """A runner too slow for every image (an emulator, `Runner.max_images`) is verified on that many images of
    each set, evenly spaced (held-back images come class by class); each set's source says so."""
    n = runner.max_images
    pick = lambda total: np.linspace(0, total - 1, n).round().astype(int)  # noqa: E731
    out = []
    for ev in evals:
        im, total = ev.images, len(ev.images)
        if not n or total <= n:
            out.append(ev)
            continue
        idx = pick(total)
        sub = dataclasses.replace(im, x=im.x[idx], labels=None if im.labels is None else im.labels[idx],
                                  uint8=None if im.uint8 is None else im.uint8[idx],
                                  files=None if im.files is None else im.files.subset(idx.tolist()))
        note = f"{ev.source}; {n} of its {total} images, evenly spaced ({runner.numbers}: {runner.max_images_reason})"
        out.append(EvalData(ev.name, note, sub, ev.float_logits[idx]))
    if isinstance(simulated, np.ndarray) and n and len(simulated) > n:
        simulated = simulated[pick(len(simulated))]
    return out, simulated


@dataclass
class Verified:
    """An artifact checked in its runtime, not yet timed: the manifest's verification record so far."""

    runner: Any
    first_image: np.ndarray  # the image latency is timed on
    verification: dict[str, Any]
    tensor_table: Optional[dict[str, Any]]


def export_artifact(target: Any, request: ExportRequest, path: Path) -> dict[str, Any]:
    """Write `target`'s artifact at `path`; the facts its manifest records about the conversion."""
    started = time.perf_counter()
    with stage("export", f"[{target.name}] exporting {request.precision}"):
        export_info = target.export(request, path)
    export_info.setdefault("seconds", round(time.perf_counter() - started, 2))  # conversion time, per target
    return export_info


def verify_artifact(target: Any, request: ExportRequest, path: Path, recipe: Recipe, evals: Sequence[EvalData],
                    enforced: bool,
                    simulated: Union[np.ndarray, Callable[[np.ndarray], np.ndarray], None] = None) -> Verified:
    """Load the artifact at `path` in its runtime, compare it with float (and the PyTorch simulation) on `evals`,
    judge it with the recipe's gate and, for int8, compare it tensor by tensor."""
    name = target.name
    with stage("load", f"[{name}] loading the artifact in its runtime", shown=False):
        runner = target.load(path, request)
    evals, simulated = _within_limit(runner, evals, simulated)
    if callable(simulated):
        with stage("simulate", f"[{name}] PyTorch simulation of the int8 model"):
            simulated = simulated(evals[0].images.x)
    batch = recipe.verification.batch_size
    verification: dict[str, Any] = {"numbers": runner.numbers}
    # a simulation runner is the simulation itself: comparing it with the simulation would prove nothing
    images = sum(len(ev.images) for ev in evals)
    with stage("verify", f"[{name}] verifying in the runtime ({images} images)"):
        measured, logits = _measure(runner, evals, batch, None if runner.numbers == "simulated" else simulated)
    verification |= measured
    if simulated is not None and runner.numbers != "simulated":
        verification["simulation"] = target.simulation_semantics(request).to_dict()
    judged = evals[0].name
    verification["gate"] = gate_record(request.precision, recipe.verification, judged, verification[judged],
                                       logits, enforced)
    tensor_table = None
    if request.precision == "int8":
        with stage("tensorwise", f"[{name}] tensor by tensor against the simulation"):
            verification["tensorwise"], tensor_table = tensorwise.run(target, path, request, evals[0].images.x)
    return Verified(runner, evals[0].images.x[:1], verification, tensor_table)


def finish_artifact(target: Any, request: ExportRequest, recipe: Recipe, settings: ConvertSettings,
                    staging: Staging, export_info: dict[str, Any], verified: Verified,
                    enforced: bool) -> ArtifactResult:
    """Time the verified artifact, write its manifest and swap its folder in, or refuse it (the gate failed).

    The artifact, its manifest and tensorwise.json replace the folder together (infra/transaction.py). A refused
    artifact leaves the previous folder as it was, with a `manifest.failed.json` (what was measured and why it
    failed) beside it, and raises VerificationError; with the gate off it is written and its manifest says it
    failed.
    """
    name, runner, one = target.name, verified.runner, verified.first_image
    verification = dict(verified.verification)
    with stage("latency", f"[{name}] timing {settings.latency_runs} runs", shown=False):
        latency = (measure_latency(runner, one, runs=settings.latency_runs, threads=runner.threads).to_dict()
                   if runner.timed else {"batch": 1, "median_ms": None, "p90_ms": None, "runs": 0,
                                         "threads": runner.threads, "input_shape": list(one.shape),
                                         "not_measured": f"{runner.numbers}: {NUMBERS_KINDS[runner.numbers]}"})
    # the manifest's key order as before: latency after the gate, the tensor-by-tensor summary last
    tensorwise_summary = verification.pop("tensorwise", None)
    verification["latency"] = latency
    if tensorwise_summary is not None:
        verification["tensorwise"] = tensorwise_summary
    with stage("describe", f"[{name}] describing the artifact", shown=False):
        manifest = _manifest(target, request, recipe, export_info, staging.artifact, verification)
    gate = verification["gate"]
    if not gate["passed"]:
        summary = f"[{target.name}] {request.precision}: " + "; ".join(gate["failures"])
        if enforced:
            failed = staging.refuse(FAILED_MANIFEST, manifest)
            raise VerificationError(f"{summary} (not written; numbers in {failed}; "
                                    "--no-verify-gate keeps it anyway)")
        logger.warning(f"warning: {summary}; written anyway (--no-verify-gate), its manifest says it failed")
    manifest_path = staging.write_json("manifest.json", manifest)
    if verified.tensor_table is not None:
        staging.write_json("tensorwise.json", verified.tensor_table)
    staging.commit()
    return ArtifactResult(target.name, request.precision, staging.folder / target.artifact_name, manifest_path,
                          manifest)


def export_and_verify(target: Any, request: ExportRequest, recipe: Recipe, evals: Sequence[EvalData],
                      settings: ConvertSettings,
                      simulated: Union[np.ndarray, Callable[[np.ndarray], np.ndarray], None] = None) -> ArtifactResult:
    """Export into a staging folder, verify there, and swap it in as OUT/<target>/ only when the gate passes
    (`finish_artifact`), all in the calling thread. `simulated`: the PyTorch simulation's logits on the
    held-back images, or a function giving them for the images verified."""
    enforced = settings.gate_enforced(recipe)
    with staged(Path(settings.out) / target.name, target.artifact_name) as staging:
        export_info = export_artifact(target, request, staging.artifact)
        verified = verify_artifact(target, request, staging.artifact, recipe, evals, enforced, simulated)
        return finish_artifact(target, request, recipe, settings, staging, export_info, verified, enforced)


def _quantization_facts(request: ExportRequest) -> Optional[dict[str, Any]]:
    """How the int8 model was calibrated, with the calibration set's name and digest (what reports compare)."""
    if request.quantized is None:
        return None
    facts = dict(request.quantized.calibration)
    if request.calibration is not None and request.calibration.calibration_set is not None:
        facts["calibration_set"] = request.calibration.calibration_set
    return facts


def _manifest(target: Any, request: ExportRequest, recipe: Recipe, export_info: dict[str, Any], path: Path,
              verification: dict[str, Any]) -> dict[str, Any]:
    loaded = request.loaded
    return build_manifest(
        model=loaded.describe(),
        target=target.name,
        precision=request.precision,
        recipe=recipe.to_dict() | {"source": recipe.source},
        quantization=_quantization_facts(request),
        export=export_info,
        artifact=artifact_facts(path),
        input=target.input_spec(path, request),
        output={"name": "logits", "shape": [1, loaded.num_classes], "dtype": "float32", "meaning": "class logits"},
        structure=target.describe(path, request),
        verification=verification,
        tool_versions=tool_versions(target.tool_versions()),
        timings=_timings(target.name),
    )


def _timings(target: str) -> dict[str, Any]:
    """Seconds per stage for the manifest: the run's shared stages (load, read images, quantize ...) and this
    target's own (export, verify, tensor by tensor ...), as far as they have run (the manifest is the last)."""
    c = clock()
    if c is None:
        return {}
    return {"run": c.rounded(exclude_prefixes=tuple(target_names())), "target": c.under(target)}
