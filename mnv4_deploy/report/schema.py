"""report.json: a versioned schema where every number carries its unit and how it was obtained.

A metric is `{"value", "unit", "method", "how"}` with method one of
  measured  - run in the target's real runtime on this host,
  simulated - computed by a PyTorch simulation (e.g. CoreML on Linux), not the real runtime,
  estimated - from a model of hardware we did not run (the roofline),
  counted   - read from the artifact or the graph (sizes, MACs),
  derived   - arithmetic on other metrics (e.g. top-1 drop = float top-1 - top-1).
The `roofline` (estimated) and `sensitivity` (simulated) sections hold long per-layer lists, so they state
method and unit once per section instead of per number.
Cells are keyed by (target, precision); the gate and the renderers only read this structure, so reports
from older runs stay comparable as long as SCHEMA_VERSION is unchanged.
"""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..fileio import read_json

SCHEMA = "mnv4-deploy/report"
SCHEMA_VERSION = 1
METHODS = ("measured", "simulated", "estimated", "counted", "derived")
EVAL_SETS = ("val", "held_back")


def metric(value: Any, unit: str, method: str, how: str = "", images: Optional[int] = None) -> dict[str, Any]:
    """One number with its unit and provenance."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method}")
    out: dict[str, Any] = {"value": value, "unit": unit, "method": method}
    if how:
        out["how"] = how
    if images is not None:
        out["images"] = images
    return out


def host_info() -> dict[str, Any]:
    """Where the measured numbers come from: latencies only compare on the same host."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        # other work on the machine inflates latency; recorded so a noisy baseline can be recognised
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def cell_from_manifest(manifest: dict[str, Any], status: str, artifact: str, manifest_path: str,
                       note: str = "") -> dict[str, Any]:
    """A report cell whose numbers are copied from the artifact's manifest (never recomputed)."""
    v = manifest["verification"]
    runtime = v.get("numbers", "measured")
    lat = v["latency"]
    how_lat = (f"wall clock per call, batch {lat['batch']}, median of {lat['runs']} runs after warm-up, "
               f"threads={lat.get('threads') or 'runtime default'}")
    metrics: dict[str, Any] = {
        "size": metric(manifest["artifact"]["size_bytes"], "bytes", "counted", "artifact size on disk"),
        "latency_median": metric(lat["median_ms"], "ms", runtime, how_lat),
        "latency_p90": metric(lat["p90_ms"], "ms", runtime, how_lat.replace("median", "90th percentile")),
    }
    for name in EVAL_SETS:
        if name not in v:
            continue
        f = v[name]["vs_float"]
        n = f["images"]
        src = v[name].get("source", name)
        metrics[f"{name}.top1_agreement"] = metric(f["top1_agreement"], "fraction", runtime,
                                                   f"argmax equals the float PyTorch model's, {src}", n)
        metrics[f"{name}.cosine"] = metric(f["cosine"], "cosine", runtime, "mean per-image logits cosine vs float", n)
        metrics[f"{name}.sqnr_db"] = metric(f["sqnr_db"], "dB", runtime, "logits SQNR vs float", n)
        if f.get("top1") is not None:
            metrics[f"{name}.top1"] = metric(f["top1"], "fraction", runtime, f"top-1 accuracy, {src}", n)
            metrics[f"{name}.top5"] = metric(f["top5"], "fraction", runtime, f"top-5 accuracy, {src}", n)
            metrics[f"{name}.float_top1"] = metric(f["reference_top1"], "fraction", "measured",
                                                   f"float PyTorch model top-1, {src}", n)
            metrics[f"{name}.top1_drop"] = metric(round(100.0 * (f["reference_top1"] - f["top1"]), 3),
                                                  "percentage points", "derived", "float top-1 minus top-1", n)
        sim = v[name].get("vs_pytorch_simulation")
        if sim:
            metrics[f"{name}.sim_agreement"] = metric(sim["top1_agreement"], "fraction", runtime,
                                                      "argmax equals the PyTorch int8 simulation's", n)
    tw = v.get("tensorwise") or {}
    if tw.get("status") == "compared":
        metrics["tensorwise.flagged"] = metric(
            tw["flagged"] + len(tw["unmatched_pytorch"]), "layers", runtime,
            f"quantized activations that disagree with the PyTorch simulation or are missing in the runtime "
            f"({tw['matched']}/{tw['pytorch_quantizers']} matched; {tw['flag_rule']})", tw["images"])
    return {
        "target": manifest["target"],
        "precision": manifest["precision"],
        "status": status,
        "note": note,
        "numbers": runtime,
        "artifact": {"path": artifact, "manifest": manifest_path, "sha256": manifest["artifact"]["sha256"],
                     "export": manifest.get("export", {}).get("method")},
        "tool_versions": manifest.get("tool_versions", {}),
        "metrics": metrics,
    }


def empty_cell(target: str, precision: str, status: str, note: str) -> dict[str, Any]:
    """A cell that has no artifact: skipped (unsupported / not installed) or failed."""
    return {"target": target, "precision": precision, "status": status, "note": note, "metrics": {}}


def new_report(model: dict[str, Any], settings: dict[str, Any], cells: list[dict[str, Any]],
               roofline: Optional[dict[str, Any]], tools: dict[str, str]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "tool_versions": tools,
        "model": model,
        "settings": settings,
        "methods": {
            "measured": "run in the target's real runtime on this host",
            "simulated": "PyTorch simulation, not the target runtime (e.g. CoreML on Linux)",
            "estimated": "roofline model of hardware not run here (normalised units)",
            "counted": "read from the artifact or the graph",
            "derived": "arithmetic on other metrics",
        },
        "cells": cells,
        "roofline": roofline,
    }


def validate(report: Any, source: str = "report") -> dict[str, Any]:
    """Check the structure the gate and renderers rely on; a wrong file is a user mistake."""
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise UserError(f"{source} is not an mnv4-deploy report.json (no \"schema\": \"{SCHEMA}\"): "
                        "pass a file written by `mnv4-deploy report`")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{source} has report schema version {version}, this mnv4-deploy reads {SCHEMA_VERSION}: "
                        "regenerate it with this version of `mnv4-deploy report`")
    cells = report.get("cells")
    if not isinstance(cells, list):
        raise UserError(f"{source} has no \"cells\" list: regenerate it with `mnv4-deploy report`")
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not {"target", "precision", "status", "metrics"} <= set(cell):
            raise UserError(f"{source}: cell {i} lacks target/precision/status/metrics: regenerate the report")
        for key, m in cell["metrics"].items():
            if not isinstance(m, dict) or not {"value", "unit", "method"} <= set(m) or m["method"] not in METHODS:
                raise UserError(f"{source}: metric '{key}' of {cell['target']}/{cell['precision']} lacks "
                                "value/unit/method: regenerate the report")
    return report


def load_report(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    data = read_json(path, "report", "give a report.json written by `mnv4-deploy report`")
    return validate(data, str(path))


def value(cell: dict[str, Any], key: str) -> Optional[float]:
    m = cell.get("metrics", {}).get(key)
    return None if m is None else m["value"]
