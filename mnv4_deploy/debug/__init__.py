"""`mnv4-deploy debug`: where, layer by layer, int8 artifacts part from float, from their simulation, and
from each other.

    rebuild.py  the convert's PyTorch int8 model, rebuilt from the manifests (or a one-line refusal)
    cache.py    the rebuilt model kept in OUT/debug/rebuilt/: a second run skips calibration
    layers.py   per quantized tensor: runtime vs simulation, vs float, local vs accumulated; divergences
    trace.py    one image: the layer where its top-1 flips against float
    advice.py   what an int16 or float fallback of a site recovers, and the recipe snippet
    page.py     debug.html

The pairing of runtime and PyTorch tensors is the convert-time tensor-by-tensor check's
(`tensorwise.check(..., keep=True)`): one implementation.

debug.json (version 1):
  {"version": 1, "artifacts": [{"label", "folder", "target", "status", "images", "first_divergence",
   "runtime_quantized_tensors", ...}], "checks": [...], "images": {"source", "count", "names"},
   "float_reference": "...", "positions": [{"position", "module", "alone_sqnr_db"}],
   "layers": {label: [row per position: position, module, quantizer, producer, shape, scale, zero_point,
              runtime_tensor, runtime_op, runtime_scale, runtime_zero_point, matched_on, layout,
              vs_simulation {mean_lsb, max_lsb, frac_over_1lsb, frac_differ}, local {mean_lsb, max_lsb,
              frac_over_1lsb}, vs_float {sqnr_db, cosine, simulation_sqnr_db}, alone_sqnr_db, diverged, reasons]},
   "worst": [positions, worst first], "side_by_side": [{"artifacts": [a, b], "parted_at", "values_differ_from"}],
   "traces": [{"image", "float_model_top1", "simulation": {...}, "runtimes": {label: {...}}}],
   "advice": {"images", "all_int8", "sites": [{"module", "float", "int16", "traced_image", "recipe"}]},
   "seconds": {...}}
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from ..infra.stages import stage
from . import advice as advice_mod
from . import layers as L
from . import trace as trace_mod
from .rebuild import names_of, rebuild, user_images

logger = logging.getLogger(__name__)

DEFAULT_IMAGES = 64
TRACE_MAX = 4  # --images with at most this many images: each is traced


@dataclass
class DebugOptions:
    folders: list[Path]
    out: Optional[Path] = None
    images: list[Path] = field(default_factory=list)
    max_images: int = DEFAULT_IMAGES
    calib: Optional[Path] = None
    calib_root: Optional[Path] = None
    workers: int = 0
    progress: bool = False
    advice: int = 3  # worst sites to give fallback advice for (besides flip layers); 0: none
    html: bool = True


def default_out(folders: list[Path]) -> Path:
    """OUT/debug beside the artifact folders (OUT/<target>)."""
    return Path(folders[0]).resolve().parent / "debug"


def debug(opts: DebugOptions) -> dict[str, Any]:
    from ..infra.fileio import ensure_writable_dir, write_json, write_text
    from ..verify.fidelity import torch_logits

    if opts.max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {opts.max_images}")
    started = time.perf_counter()
    out = Path(opts.out) if opts.out is not None else default_out(opts.folders)
    ensure_writable_dir(out)
    seconds: dict[str, float] = {}
    with stage("debug_rebuild", "rebuilding the int8 model from the manifests"):
        rb = rebuild(opts.folders, out, opts.calib, opts.calib_root, opts.workers, opts.progress)
    seconds["rebuild"] = round(time.perf_counter() - started, 2)
    run = rb.run
    if opts.images:
        imgs = user_images(opts.images, run.loaded.preprocessing, opts.workers)
        x, names = imgs.x[:opts.max_images], names_of(imgs)[:opts.max_images]
        float_logits = torch_logits(run.loaded.model, x)
        source = ", ".join(str(p) for p in opts.images)
    else:
        ev = run.evals[0]
        idx = np.arange(len(ev.images.x))
        if len(idx) > opts.max_images:
            idx = np.linspace(0, len(idx) - 1, opts.max_images).round().astype(int)
        x, float_logits = ev.images.x[idx], ev.float_logits[idx]
        all_names = names_of(ev.images)
        names = [all_names[i] for i in idx]
        source = f"{ev.source} ({len(x)} of them, evenly spaced)"
    t0 = time.perf_counter()
    result = _layers(rb, x, opts)
    seconds["layers"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    quantized = rb.artifacts[0].request.quantized
    fg = result.pop("_float_graph")
    traced_idx = _traced(opts, fg, quantized, x, float_logits)
    traces = []
    with stage("debug_trace", f"tracing {len(traced_idx)} image(s) layer by layer"):
        for i in traced_idx:
            traces.append(_trace(rb, fg, x[i:i + 1], int(float_logits[i].argmax()), names[i]))
    seconds["trace"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    modules = [t["simulation"]["flip"]["module"] for t in traces if t["simulation"].get("flipped")]
    modules += [t2["flip"]["module"] for t in traces for t2 in t["runtimes"].values() if t2.get("flipped")]
    modules += [fg.modules[p] for p in result["worst_by_alone"][:opts.advice]]
    adv = None
    if opts.advice and modules:
        with stage("debug_advice", "fallback advice (int16 / float) for the worst and flip layers"):
            first = traces[0] if traces else None
            traced = (x[traced_idx[0]:traced_idx[0] + 1], first["simulation"]["float_top1"]) if first else None
            adv = advice_mod.advise(quantized, list(dict.fromkeys(modules)), x, float_logits, traced)
    seconds["advice"] = round(time.perf_counter() - t0, 2)
    seconds["total"] = round(time.perf_counter() - started, 2)
    report = {
        "version": 1,
        "artifacts": result["artifacts"],
        "checks": rb.checks,
        "images": {"source": source, "count": int(len(x)), "names": names},
        "float_reference": ("each quantizer's input in the PT2E graph converted without weight folding, every "
                            "quantize/dequantize an identity: the float model the quantizer calibrated (after the "
                            "recipe's equalization and bias correction)"),
        "threshold": result["threshold"],
        "positions": result["positions"],
        "layers": result["layers"],
        "worst": result["worst"],
        "side_by_side": result["side_by_side"],
        "traces": traces,
        "advice": adv,
        "seconds": seconds,
    }
    write_json(out / "debug.json", report)
    if opts.html:
        from .page import render

        write_text(out / "debug.html", render(report))
    report["_out"] = str(out)
    return report


def _layers(rb: Any, x: np.ndarray, opts: DebugOptions) -> dict[str, Any]:
    from ..verify import tensorwise

    threshold = tensorwise.FRACTION_THRESHOLD
    graphs: dict[int, L.FloatGraph] = {}
    for a in rb.artifacts:
        q = a.request.quantized
        if id(q) not in graphs:
            graphs[id(q)] = L.FloatGraph(q)
    first = graphs[id(rb.artifacts[0].request.quantized)]
    n_pos = len(first.positions)
    acc = {a.label: L.ArtifactLayers(a.label) for a in rb.artifacts}
    between: dict[tuple[str, str], dict[int, L.PairAcc]] = {}
    alone_sums: dict[int, list[float]] = {}
    scales = {p: v[0] for p, v in first.qparams.items()}
    size = L.chunk_size(*x.shape[2:4])
    labels = [a.label for a in rb.artifacts]
    chunks = list(range(0, len(x), size))
    with stage("debug_layers", f"{len(rb.artifacts)} artifact(s) layer by layer on {len(x)} images",
               total=len(chunks), unit="chunk") as bar:
        for start in chunks:
            xc = x[start:start + size]
            floats = {k: g.run(xc)[1] for k, g in graphs.items()}
            L.alone_sqnr(floats[id(rb.artifacts[0].request.quantized)], first.qparams, alone_sums)
            aligned: dict[str, dict[int, np.ndarray]] = {}
            for a in rb.artifacts:
                layers = acc[a.label]
                if layers.status != "compared":
                    continue
                result = tensorwise.check(a.target, a.path, a.request, xc, keep=True)
                if "table" not in result:
                    layers.status = result["summary"].get("status", "not compared")
                    continue
                position_of = {t.name: t.order for t in result["free"]}
                if len(result["free"]) != n_pos:
                    logger.warning(f"warning: [{a.label}] its simulation has {len(result['free'])} quantizers, the "
                                   f"float graph {n_pos}: positions matched in order")
                aligned[a.label] = layers.add(result, floats[id(a.request.quantized)], position_of)
                layers.images += len(xc)
            L.accumulate_between(between, labels, aligned, scales)
            bar.advance()
    alone = {p: L._sqnr(s[0], s[1]) for p, s in alone_sums.items()}
    rows = {label: L.rows_of(acc[label], threshold, n_pos, alone, first.modules) for label in labels}
    for a in rb.artifacts:  # a layer off only locally: did it compute on a transposed input?
        d = L.first_divergence(rows[a.label]) if acc[a.label].status == "compared" else None
        if d is None or d["runtime_tensor"] is None or not all("(local)" in r for r in d["reasons"]):
            continue
        j = L.diagnose_transposed(a, x[:size], d["position"], threshold)
        if j is not None:
            row = next(r for r in rows[a.label] if r["position"] == d["position"])
            row["reasons"].append(f"its input #{j} {first.modules[j]} arrives transposed (H and W swapped): fed "
                                  "that, the simulation computes what the runtime does")
    artifacts = []
    for a in rb.artifacts:
        layers = acc[a.label]
        d = L.first_divergence(rows[a.label]) if layers.status == "compared" else None
        artifacts.append({"label": a.label, "folder": str(a.folder), "target": a.target.name,
                          "status": layers.status, "images": layers.images,
                          "pytorch_quantizers": layers.pytorch_quantizers,
                          "runtime_quantized_tensors": layers.runtime_quantized,
                          "matched": sum(1 for r in rows[a.label] if r.get("runtime_tensor")),
                          "diverged_layers": sum(1 for r in rows[a.label] if r["diverged"]),
                          "first_divergence": d, "how_read": layers.info,
                          "simulation": a.target.simulation_semantics(a.request).to_dict()})
    compared = [lab for lab in labels if acc[lab].status == "compared"]
    worst = _worst(rows, compared, alone, n_pos)
    worst_by_alone = sorted((p for p in alone if alone[p] is not None), key=lambda p: alone[p])
    return {"artifacts": artifacts, "threshold": threshold, "layers": rows, "worst": worst,
            "worst_by_alone": worst_by_alone,
            "positions": [{"position": p, "module": first.modules[p], "quantizer": first.positions[p],
                           "alone_sqnr_db": alone.get(p)} for p in range(n_pos)],
            "side_by_side": L.side_by_side(compared, rows, between, threshold) if len(compared) > 1 else [],
            "_float_graph": first}


def _worst(rows: dict[str, list[dict[str, Any]]], labels: list[str], alone: dict[int, Optional[float]],
           n_pos: int) -> list[int]:
    """Positions, worst first: where a runtime leaves its simulation (graph order), then by local error, then
    by what quantizing the tensor alone costs (lowest SQNR first)."""
    def key(pos: int) -> tuple:
        rs = [r for lab in labels for r in rows[lab] if r["position"] == pos]
        diverged = any(r["diverged"] for r in rs)
        local = max((r.get("local", {}).get("frac_over_1lsb", 0.0) for r in rs), default=0.0)
        a = alone.get(pos)
        return (0 if diverged else 1, pos if diverged else 0, -local, a if a is not None else 1e9)

    return sorted(range(n_pos), key=key)


def _traced(opts: DebugOptions, fg: L.FloatGraph, quantized: Any, x: np.ndarray, float_logits: np.ndarray) -> list[int]:
    """Images to trace: every --images image when there are few; otherwise the first whose simulated top-1
    differs from float's (none when all agree)."""
    if opts.images and len(x) <= TRACE_MAX:
        return list(range(len(x)))
    sim = quantized.simulate(x)
    differ = np.nonzero(sim.argmax(1) != float_logits.reshape(len(x), -1).argmax(1))[0]
    return [int(differ[0])] if len(differ) else []


def _trace(rb: Any, fg: L.FloatGraph, x1: np.ndarray, model_float_top1: int, name: str) -> dict[str, Any]:
    from ..verify import tensorwise

    quantized = rb.artifacts[0].request.quantized
    sim = {t.order: t.dequantized().astype(np.float32) for t in tensorwise.torch_quantized(quantized.simulation_module(), x1)}
    runtimes: dict[str, dict[int, np.ndarray]] = {}
    own: dict[str, Optional[int]] = {}
    for a in rb.artifacts:
        result = tensorwise.check(a.target, a.path, a.request, x1, keep=True)
        if "pairs" not in result:
            continue
        runtimes[a.label] = {p.torch.order: p.aligned.astype(np.float32) for p in result["pairs"]}
        try:
            own[a.label] = int(np.asarray(a.target.load(a.path, a.request)(x1)).reshape(-1).argmax())
        except Exception as exc:  # noqa: BLE001 - the runtime's own decision is a bonus, never the point
            logger.info(f"note: [{a.label}] could not run the artifact on the traced image: {exc}")
            own[a.label] = None
    return trace_mod.trace_image(fg, x1, sim, runtimes, own, model_float_top1, name)


from .terminal import WORST, print_report, summary_lines, table  # noqa: E402,F401 (the package's API)
