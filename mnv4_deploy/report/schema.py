"""report.json: a versioned schema where every number carries its unit and how it was obtained.

A metric is `{"value", "unit", "method", "how"}` with method one of
  measured, executed, emulated, simulated - where a runtime number came from (manifest.NUMBERS_KINDS; only
              measured cells carry a latency),
  estimated - from a model of hardware we did not run (the roofline),
  counted   - read from the artifact or the graph (sizes, MACs),
  derived   - arithmetic on other metrics (e.g. top-1 drop = float top-1 - top-1).
The `roofline` (estimated) and `sensitivity` (simulated) sections hold long per-layer lists, so they state
method and unit once per section instead of per number.
Accuracy metrics also carry `images` (the sample size) and `ci95` ([low, high], Wilson for a proportion,
Newcombe's paired interval for a drop against float); each built cell keeps, per evaluation set, the image
set's digest and its per-image top-1 predictions (compact), which the gate's paired test needs.

Version 2 holds a model zoo: `models` is a list of per-model sections (model, settings, roofline,
sensitivity) keyed by `key`, and cells are keyed by (model key, target, precision). A shard of a zoo run
records its place in `shard`; `report --merge` joins shards into one report.
The gate and the renderers only read this structure, so reports from older runs stay comparable as long as
SCHEMA_VERSION is unchanged.
"""
from __future__ import annotations

import datetime
import os
import zlib
import platform
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..infra.fileio import read_json
from ..infra.json_check import (ANY, COUNT, NUMBER, STR, Invalid, ListOf, MapOf, Nullable, Num, Obj, OneOf, Type,
                                check, describe)
from ..verify.manifest import NUMBERS_KINDS
from .roofline import DEVICES

SCHEMA = "mnv4-deploy/report"
SCHEMA_VERSION = 2
METHODS = (*NUMBERS_KINDS, "estimated", "counted", "derived")
EVAL_SETS = ("val", "held_back")


def metric(value: Any, unit: str, method: str, how: str = "", images: Optional[int] = None,
           ci95: Optional[list[float]] = None) -> dict[str, Any]:
    """One number with its unit and provenance (and, for an accuracy, its sample size and 95% interval)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method}")
    out: dict[str, Any] = {"value": value, "unit": unit, "method": method}
    if how:
        out["how"] = how
    if images is not None:
        out["images"] = images
    if ci95 is not None:
        out["ci95"] = [round(float(v), 6) for v in ci95]
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
                       note: str = "", model: str = "") -> dict[str, Any]:
    """A report cell whose numbers are copied from the artifact's manifest (never recomputed)."""
    v = manifest["verification"]
    runtime = v.get("numbers", "measured")
    lat = v["latency"]
    shape = (manifest.get("input") or {}).get("shape")
    how_lat = (f"wall clock per call, batch {lat['batch']}, median of {lat['runs']} runs after warm-up, "
               f"threads={lat.get('threads') or 'runtime default'}" + (f", input {shape}" if shape else ""))
    metrics: dict[str, Any] = {
        "size": metric(manifest["artifact"]["size_bytes"], "bytes", "counted", "artifact size on disk")}
    if lat.get("median_ms") is not None:  # only the real runtime is timed (an emulator's clock means nothing)
        metrics["latency_median"] = metric(lat["median_ms"], "ms", runtime, how_lat)
        metrics["latency_p90"] = metric(lat["p90_ms"], "ms", runtime, how_lat.replace("median", "90th percentile"))
    evaluation: dict[str, Any] = {}
    for name in EVAL_SETS:
        if name not in v:
            continue
        f = v[name]["vs_float"]
        n = f["images"]
        ci = v[name].get("ci95", {})
        src = v[name].get("source", name)
        metrics[f"{name}.top1_agreement"] = metric(f["top1_agreement"], "fraction", runtime,
                                                   f"argmax equals the float PyTorch model's, {src}", n,
                                                   ci.get("top1_agreement"))
        metrics[f"{name}.cosine"] = metric(f["cosine"], "cosine", runtime, "mean per-image logits cosine vs float", n)
        metrics[f"{name}.sqnr_db"] = metric(f["sqnr_db"], "dB", runtime, "logits SQNR vs float", n)
        if f.get("top1") is not None:
            metrics[f"{name}.top1"] = metric(f["top1"], "fraction", runtime, f"top-1 accuracy, {src}", n, ci.get("top1"))
            metrics[f"{name}.top5"] = metric(f["top5"], "fraction", runtime, f"top-5 accuracy, {src}", n, ci.get("top5"))
            metrics[f"{name}.float_top1"] = metric(f["reference_top1"], "fraction", "measured",
                                                   f"float PyTorch model top-1, {src}", n, ci.get("reference_top1"))
            drop_ci = ci.get("top1_drop")
            metrics[f"{name}.top1_drop"] = metric(
                round(100.0 * (f["reference_top1"] - f["top1"]), 3), "percentage points", "derived",
                "float top-1 minus top-1 on the same images (95% interval: paired, Newcombe)", n,
                None if drop_ci is None else [100.0 * drop_ci[0], 100.0 * drop_ci[1]])
        sim = v[name].get("vs_pytorch_simulation")
        if sim:
            from ..verify.significance import wilson_interval

            metrics[f"{name}.sim_agreement"] = metric(
                sim["top1_agreement"], "fraction", runtime, "argmax equals the PyTorch int8 simulation's", n,
                list(wilson_interval(round(sim["top1_agreement"] * sim["images"]), sim["images"])))
        if "predictions" in v[name]:
            evaluation[name] = {"image_set": v[name]["image_set"], "predictions": v[name]["predictions"]}
    tw = v.get("tensorwise") or {}
    if tw.get("status") == "compared":
        metrics["tensorwise.flagged"] = metric(
            tw["flagged"] + len(tw["unmatched_pytorch"]), "layers", runtime,
            f"quantized activations that disagree with the PyTorch simulation or are missing in the runtime "
            f"({tw['matched']}/{tw['pytorch_quantizers']} matched; {tw['flag_rule']})", tw["images"])
    cell = {
        "model": model or manifest.get("model", {}).get("name", ""),
        "target": manifest["target"],
        "precision": manifest["precision"],
        "status": status,
        "note": note,
        "numbers": runtime,
        "artifact": {"path": artifact, "manifest": manifest_path, "sha256": manifest["artifact"]["sha256"],
                     "export": manifest.get("export", {}).get("method")},
        "input_shape": shape,
        "tool_versions": manifest.get("tool_versions", {}),
        "metrics": metrics,
        "evaluation": evaluation,
    }
    calib = (manifest.get("quantization") or {}).get("calibration_set")
    if calib:
        cell["calibration_set"] = calib
    int8 = (manifest.get("structure") or {}).get("int8_compute")
    if int8:
        cell["int8_compute"] = int8
    placement = (manifest.get("structure") or {}).get("placement")  # an NPU target: which nodes it runs
    if placement:
        cell["placement"] = {k: placement.get(k) for k in ("nodes_on_htp", "nodes_seen_by_qnn", "left_off_htp")}
    return cell


def empty_cell(target: str, precision: str, status: str, note: str, model: str = "") -> dict[str, Any]:
    """A cell that has no artifact: skipped (unsupported / not installed) or failed."""
    return {"model": model, "target": target, "precision": precision, "status": status, "note": note, "metrics": {}}


def cell_id(cell: dict[str, Any]) -> str:
    """'model/target/precision': a cell's name in messages, shards and the gate."""
    return f"{cell.get('model', '')}/{cell['target']}/{cell['precision']}"


def model_section(key: str, model: dict[str, Any], settings: dict[str, Any], roofline: Optional[dict[str, Any]],
                  sensitivity: Optional[dict[str, Any]] = None,
                  speed: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """One model of the zoo: what it is, how it was asked for, its estimated (roofline) costs, and int8 against
    float timed interleaved per runtime (report/speed_section.py)."""
    return {"key": key, "model": model, "settings": settings, "roofline": roofline, "sensitivity": sensitivity,
            "speed": speed}


def new_report(models: list[dict[str, Any]], cells: list[dict[str, Any]], tools: dict[str, str],
               shard: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "tool_versions": tools,
        "models": models,
        "shard": shard,
        "methods": {
            **NUMBERS_KINDS,
            "estimated": "roofline model of hardware not run here (normalised units)",
            "counted": "read from the artifact or the graph",
            "derived": "arithmetic on other metrics",
        },
        "cells": cells,
    }


# ---------------------------------------------------------------- what a report.json must hold
REGENERATE = "regenerate it with `mnv4-deploy report`"
OK_STATUS = ("built", "reused")
# Per unit, the range a metric's value must lie in: plots and the gate do arithmetic on these.
_UNIT_RANGES: dict[str, Num] = {
    "fraction": Num(0, 1), "ms": Num(0, 1e9), "bytes": Num(0, 1e15), "percentage points": Num(-100, 100),
    "layers": Num(0, 1e9)}


def _metric_rule(m: dict[str, Any], path: str) -> None:
    rng = _UNIT_RANGES.get(m["unit"])
    if rng is not None:
        rng.check(m["value"], f"{path}.value")
    ci = m.get("ci95")
    if ci is not None and not ci[0] <= ci[1]:
        raise Invalid(f"{path}.ci95", f"must be [low, high] with low <= high, got {ci}")


METRIC = Obj({"value": NUMBER, "unit": STR, "method": OneOf(*METHODS)},
             {"how": STR, "images": COUNT, "ci95": ListOf(Num(-100, 100), length=2)}, _metric_rule)
MAX_IMAGES = 10 ** 8
ENCODED = Obj({"encoding": OneOf("zlib+base64"), "dtype": OneOf("uint8", "uint16", "uint32"),
               "count": Num(0, MAX_IMAGES, integer=True), "data": STR})
EVALUATION = Obj({"image_set": Obj({"digest": STR, "images": Num(1, MAX_IMAGES, integer=True)}),
                  "predictions": Obj({"top1": ENCODED, "float_top1": ENCODED}, {"labels": Nullable(ENCODED)})})


def _cell_rule(cell: dict[str, Any], path: str) -> None:
    if cell["status"] in OK_STATUS:
        for key in ("size", "held_back.top1_agreement"):
            if key not in cell["metrics"]:
                raise Invalid(f"{path}.metrics.{key}", f"is missing (a {cell['status']} cell has it)")
    if ("latency_median" in cell["metrics"]) != ("latency_p90" in cell["metrics"]):
        raise Invalid(f"{path}.metrics", "must hold latency_median and latency_p90 together")
    for name in cell.get("evaluation") or {}:
        if name not in EVAL_SETS:
            raise Invalid(f"{path}.evaluation.{name}", f"is not an evaluation set ({', '.join(EVAL_SETS)})")


CELL = Obj({"model": STR, "target": STR, "precision": STR, "status": OneOf(*OK_STATUS, "skipped", "failed"),
            "metrics": MapOf(METRIC)},
           {"note": STR, "numbers": OneOf(*NUMBERS_KINDS), "artifact": Type(dict), "input_shape": Nullable(ListOf(COUNT)),
            "tool_versions": Type(dict), "evaluation": MapOf(EVALUATION), "host": Nullable(STR),
            "calibration_set": Obj(optional={"name": ANY, "digest": ANY}), "int8_compute": Type(dict),
            "placement": Obj({"nodes_on_htp": ANY, "nodes_seen_by_qnn": ANY,
                              "left_off_htp": ListOf(Obj({"node": ANY, "op": ANY, "reason": ANY}))})},
           _cell_rule)
_PER_DEVICE = lambda item: MapOf(item, keys=tuple(DEVICES))  # noqa: E731
_COST = Num(0, 1e12)
PRECISION_COSTS = Obj({"estimated_cost": Obj({"value": _PER_DEVICE(_COST), "unit": STR}),
                       "op_type_share": Obj({"value": _PER_DEVICE(MapOf(Num(0, 1)))}),
                       "memory_bound_layers": Obj({"value": _PER_DEVICE(COUNT)}),
                       "layer_cost": Obj({"value": _PER_DEVICE(ListOf(_COST))})},
                      {"relative_to_fp32": Obj({"value": _PER_DEVICE(Num(0, 1e12))})})


def _roofline_rule(roof: dict[str, Any], path: str) -> None:
    n = len(roof["layers"])
    for precision, entry in roof["precisions"].items():
        for device, costs in entry["layer_cost"]["value"].items():
            if len(costs) != n:
                raise Invalid(f"{path}.precisions.{precision}.layer_cost.value.{device}",
                              f"must hold one cost per layer ({n}), got {len(costs)}")


ROOFLINE = Obj({"method": STR, "macs": Obj({"value": Num(0, 1e18)}),
                "layers": ListOf(Obj({"name": STR, "op_type": STR, "shape": ANY})),
                "precisions": MapOf(PRECISION_COSTS, min_len=1)},
               {"input_size": Type(dict)}, _roofline_rule)
SENSITIVITY = Obj({"method": STR, "layers": ListOf(Obj({"name": STR, "sqnr_db": NUMBER, "top1_agreement": Num(0, 1)}))})
_TIMING = Obj({"median_ms": Num(0, 1e7), "p90_ms": Num(0, 1e7), "runs": COUNT}, {"computes_in": STR, "threads": ANY})
SPEED_ROW = Obj({"target": STR, "strict_f32": Obj({"fp32": _TIMING, "int8": _TIMING, "int8_over_float": Num(0, 1e4)}),
                 "runtime_default": Obj({"float": _TIMING, "int8": _TIMING, "int8_over_float": Num(0, 1e4),
                                         "float_is": STR})},
                {"batch": COUNT, "input_shape": ANY, "how": STR, "int8_runtime_defaults": Type(dict)})
MODEL_SECTION = Obj({"key": STR, "model": Type(dict), "settings": Type(dict)},
                    {"roofline": Nullable(ROOFLINE), "sensitivity": Nullable(SENSITIVITY),
                     "speed": Nullable(ListOf(SPEED_ROW))})


def _shard_rule(shard: dict[str, Any], path: str) -> None:
    if shard["index"] > shard["count"]:
        raise Invalid(f"{path}.index", f"must be at most the shard count {shard['count']}, got {shard['index']}")
    if len(set(shard["plan"])) != len(shard["plan"]):
        raise Invalid(f"{path}.plan", "lists a cell twice")


SHARD = Obj({"index": Num(1, integer=True), "count": Num(1, integer=True), "plan": ListOf(STR)},
            {"settings": MapOf(Type(dict))}, _shard_rule)


def _report_rule(report: dict[str, Any], path: str) -> None:
    keys = [m["key"] for m in report["models"]]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise Invalid(f"models[{i}].key", f"'{key}' names a second section of the same model")
    seen: set[str] = set()
    for i, cell in enumerate(report["cells"]):
        cid = cell_id(cell)
        if cid in seen:
            raise Invalid(f"cells[{i}]", f"repeats the cell {cid}")
        seen.add(cid)


REPORT_SCHEMA = Obj({"models": ListOf(MODEL_SECTION), "cells": ListOf(CELL)},
                    {"created": STR, "host": Obj(optional={"hostname": Nullable(STR)}), "tool_versions": Type(dict),
                     "shard": Nullable(SHARD), "methods": Type(dict), "gate": Type(dict),
                     "merged_from": ListOf(Obj({"host": ANY}))}, _report_rule)


def _agrees_with_predictions(cell: dict[str, Any], source: str) -> None:
    """A summary number that its own per-image predictions contradict means the file was edited: refuse it
    (the gate judges the predictions, so an edited summary would otherwise pass unnoticed)."""
    from ..verify.predictions import decode_classes

    for name, ev in (cell.get("evaluation") or {}).items():
        n = ev["image_set"]["images"]
        decoded = {}
        for which in ("top1", "float_top1", "labels"):  # other keys a newer version may add are not read
            enc = ev["predictions"].get(which)
            if enc is None:
                continue
            if enc["count"] != n:
                raise UserError(f"{source}: cell {cell_id(cell)}: the {name} predictions '{which}' hold "
                                f"{enc['count']} images, its image set {n}: {REGENERATE}")
            try:
                decoded[which] = decode_classes(enc)
            except (ValueError, zlib.error) as exc:  # binascii.Error is a ValueError
                raise UserError(f"{source}: cell {cell_id(cell)}: the {name} predictions '{which}' cannot be "
                                f"decoded ({exc}): {REGENERATE}") from None
            if len(decoded[which]) != n:
                raise UserError(f"{source}: cell {cell_id(cell)}: the {name} predictions '{which}' hold "
                                f"{len(decoded[which])} images, its image set {n}: {REGENERATE}")
        pred, ref, labels = decoded["top1"], decoded["float_top1"], decoded.get("labels")
        derived = {f"{name}.top1_agreement": float((pred == ref).mean())}
        if labels is not None:
            top1, float_top1 = float((pred == labels).mean()), float((ref == labels).mean())
            derived |= {f"{name}.top1": top1, f"{name}.float_top1": float_top1,
                        f"{name}.top1_drop": 100.0 * (float_top1 - top1)}
        for key, actual in derived.items():
            m = cell["metrics"].get(key)
            if m is None:
                continue
            tolerance = 0.01 if key.endswith("top1_drop") else 1e-4  # the stored numbers are rounded
            if not abs(m["value"] - actual) <= tolerance or m.get("images", n) != n:
                raise UserError(f"{source}: cell {cell_id(cell)}: '{key}' says {m['value']:.5g} on "
                                f"{m.get('images', n)} images, but its per-image predictions give {actual:.5g} on "
                                f"{n}: the file contradicts itself (edited?); {REGENERATE}")


def validate(report: Any, source: str = "report") -> dict[str, Any]:
    """Check the structure the gate and renderers rely on (REPORT_SCHEMA), and that the summary numbers agree
    with the per-image predictions they were computed from; a wrong file is a user mistake (one line)."""
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise UserError(f"{source} is not an mnv4-deploy report.json (no \"schema\": \"{SCHEMA}\"): "
                        "pass a file written by `mnv4-deploy report`")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{source} has report schema version {describe(version) if isinstance(version, (dict, list)) else str(version)[:40]}, this mnv4-deploy reads "
                        f"{SCHEMA_VERSION}: regenerate it with this version of `mnv4-deploy report`")
    check(report, REPORT_SCHEMA, source, REGENERATE)
    for cell in report["cells"]:
        _agrees_with_predictions(cell, source)
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


def interval(cell: dict[str, Any], key: str) -> Optional[tuple[float, float]]:
    """A metric's 95% interval, or None when it has none."""
    ci = cell.get("metrics", {}).get(key, {}).get("ci95")
    return None if ci is None else (ci[0], ci[1])


def section(report: dict[str, Any], key: str) -> dict[str, Any]:
    """The model section named `key` (an empty one when the report has none)."""
    for m in report.get("models", []):
        if m.get("key") == key:
            return m
    return model_section(key, {"name": key}, {}, None)
