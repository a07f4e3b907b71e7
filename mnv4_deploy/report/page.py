"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) for people, not CI."""
from __future__ import annotations

import json
from html import escape
from typing import Any, Optional

from . import svg
from .markdown import GATE_HEADER, cells_rows, gate_lines, gate_row, model_keys
from .regression_gate import GateResult
from .roofline import DEVICES, OP_TYPES
from .schema import interval, section, value
from .speed_section import SPEED_NOTE, speed_table

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}
.fail{color:#b00;font-weight:bold}.pass{color:#070;font-weight:bold}figure{margin:1.5em 0}figcaption{font-size:12px;color:#555}
code{background:#f4f4f4;padding:1px 3px}.est{color:#a60}"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(svg_text: str, caption: str) -> str:
    return f"<figure>{svg_text}<figcaption>{escape(caption)}</figcaption></figure>"


def accuracy_latency_plot(report: dict[str, Any], model: Optional[str] = None) -> str:
    """Accuracy (with its 95% interval as an error bar) against measured latency, one point per artifact."""
    # only the real runtime is timed: a simulation's, executor's or emulator's clock says nothing about the device
    ok = [c for c in report["cells"] if c["status"] in ("built", "reused") and "latency_median" in c["metrics"]
          and (model is None or c.get("model") == model)]
    use_top1 = bool(ok) and all(value(c, "val.top1") is not None for c in ok)
    points, errors, ref = [], [], None
    for c in ok:
        if use_top1:
            key = "val.top1"
            ref = value(c, "val.float_top1")
        else:
            key = "val.top1_agreement" if value(c, "val.top1_agreement") is not None else "held_back.top1_agreement"
        ci = interval(c, key)
        points.append((c["metrics"]["latency_median"]["value"], round(100 * value(c, key), 3), c["precision"],
                       c["target"]))
        errors.append(None if ci is None else (round(100 * ci[0], 3), round(100 * ci[1], 3)))
    ylabel = "val top-1 (%), 95% interval" if use_top1 else "top-1 agreement with float (%), 95% interval"
    return svg.scatter(points, "Accuracy vs latency (measured on this host)", "median latency, batch 1 (ms)", ylabel,
                       hline=(round(100 * ref, 3), "float PyTorch") if ref is not None else None,
                       errors=errors, bounds=(0.0, 100.0))


def size_plot(report: dict[str, Any], model: Optional[str] = None) -> str:
    ok = [c for c in report["cells"] if c["status"] in ("built", "reused") and (model is None or c.get("model") == model)]
    targets = list(dict.fromkeys(c["target"] for c in ok))
    precisions = list(dict.fromkeys(c["precision"] for c in ok))
    values = {(c["target"], c["precision"]): round(c["metrics"]["size"]["value"] / 1e6, 3) for c in ok}
    return svg.grouped_bars(targets, precisions, values, "Artifact size per target", "size (MB)")


def roofline_plots(roof: Optional[dict[str, Any]]) -> list[str]:
    if not roof:
        return []
    out = []
    precs = list(roof["precisions"])
    devices = list(DEVICES)
    values = {(DEVICES[d][0], p): roof["precisions"][p]["estimated_cost"]["value"][d] for p in precs for d in devices}
    out.append(_figure(svg.grouped_bars([DEVICES[d][0] for d in devices], precs, values,
                                        "ESTIMATED cost on the paper's hardware (roofline)", "MB-eq (normalised)"),
                       "Estimated, not measured: sum over layers of max(MACs/PeakMACs, bytes/PeakMemBW) with the "
                       "paper's ridge points; PeakMemBW normalised to 1, so compare precisions within one device."))
    precision = "int8" if "int8" in roof["precisions"] else precs[0]
    entry = roof["precisions"][precision]
    out.append(_figure(svg.stacked_shares(entry["op_type_share"]["value"], {d: DEVICES[d][0] for d in devices},
                                          OP_TYPES, f"ESTIMATED cost share per op type ({precision}), by ridge point"),
                       "Like the MNv4 paper's Figure 3: as the ridge point grows, memory-heavy ops "
                       "(fully connected, pointwise at low resolution) cost relatively more than MAC-heavy ones."))
    layers = roof["layers"]
    kinds = [layer["op_type"] for layer in layers]
    names = [f"{layer['name']} {layer['shape']}" for layer in layers]
    for d in (devices[0], devices[-1]):
        out.append(_figure(svg.layer_bars(entry["layer_cost"]["value"][d], kinds, names,
                                          f"ESTIMATED per-layer cost, {precision}, {DEVICES[d][0]} (RP {DEVICES[d][1]})",
                                          "MB-eq", OP_TYPES),
                           "Per-layer roofline cost in network order (hover a bar for the layer and its shape)."))
    return out


def model_html(report: dict[str, Any], sec: dict[str, Any]) -> list[str]:
    """One model's section: facts, cells with intervals, plots with error bars, roofline, sensitivity."""
    key, model, s = sec["key"], sec.get("model", {}), sec.get("settings", {})
    header, rows = cells_rows(report, key)
    parts = [f'<section class="model" id="model-{escape(key)}"><h2>Model {escape(key)}</h2>',
             f"<p><code>{escape(str(model.get('name', key)))}</code>, weights <code>{escape(str(model.get('weights')))}</code>"
             f" (sha256 {escape(str(model.get('weights_sha256'))[:12])}…), input {escape(str(s.get('input_size')))} "
             f"({escape(str(s.get('input_size_source', '?')))}), recipe <code>{escape(str(s.get('recipe')))}</code>.</p>",
             "<h3>Artifacts (measured in each target's runtime)</h3>", _table(header, rows)]
    ok = [c for c in report["cells"] if c["status"] in ("built", "reused") and c.get("model") == key]
    if ok:
        parts.append(_figure(accuracy_latency_plot(report, key),
                             "Each point is an artifact, its bar the 95% interval of the accuracy (Wilson, n images); "
                             "outlined points and the dashed line form the Pareto front (nothing else is both faster "
                             "and more accurate). The y-axis is never zoomed so far that the intervals fill it. "
                             "Only cells timed in the target's real runtime on this host are shown (not simulated, executed or emulated ones)."))
        parts.append(_figure(size_plot(report, key), "Artifact size on disk."))
    if sec.get("speed"):
        header, rows = speed_table(sec["speed"])
        parts += ["<h3>int8 against the float each runtime runs (measured, interleaved)</h3>",
                  f"<p>{escape(SPEED_NOTE)}</p>", _table(header, [[c.strip("*") for c in r] for r in rows])]
    roof = sec.get("roofline")
    parts.append('<h3 class="est">Estimated latency on the paper\'s hardware (not measured)</h3>')
    if roof:
        size = roof.get("input_size", {})
        at = f" At input {size.get('value')} ({size.get('source')})." if size else ""
        parts.append(f"<p>{escape(roof['method'])}.{escape(at)} Unit: "
                     f"{escape(roof['precisions'][next(iter(roof['precisions']))]['estimated_cost']['unit'])}.</p>")
        parts.append(_table(["precision"] + [f"{n} (RP {rp})" for n, rp in DEVICES.values()],
                            [[p] + [f"{e['estimated_cost']['value'][k]:.3f}"
                                    + (f" (×{e['relative_to_fp32']['value'][k]:.2f} vs fp32)" if "relative_to_fp32" in e else "")
                                    for k in DEVICES] for p, e in roof["precisions"].items()]))
    parts += roofline_plots(roof)
    sens = sec.get("sensitivity")
    if sens and sens.get("layers"):
        op = {layer["name"]: layer["op_type"] for layer in (roof or {}).get("layers", [])}
        names = [layer["name"] for layer in sens["layers"]]
        parts.append("<h3>Per-layer int8 sensitivity (simulated)</h3>")
        parts.append(_figure(svg.layer_bars([max(0.0, min(layer["sqnr_db"], 99.0)) for layer in sens["layers"]],
                                            [op.get(n, "other") for n in names], names,
                                            "Per-layer int8 sensitivity: logits SQNR with only this layer int8",
                                            "SQNR dB (lower = more sensitive)", OP_TYPES + ("other",)),
                             f"{sens['method']} ({sens['images']} images)."))
    parts.append("<h3>Provenance</h3><pre>" + escape(json.dumps({"model": model, "settings": s}, indent=2)) + "</pre>")
    return parts + ["</section>"]


def render(report: dict[str, Any], gate: Optional[GateResult] = None, baseline_name: str = "baseline") -> str:
    keys = model_keys(report)
    title = keys[0] if len(keys) == 1 else f"{len(keys)} models"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mnv4-deploy report: {escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>mnv4-deploy report: {escape(title)}</h1>",
        f"<p>created {escape(str(report.get('created')))} on {escape(str(report.get('host', {}).get('hostname')))}"
        + (f", merged from {len(report['merged_from'])} shards" if report.get("merged_from") else "")
        + (f", shard {report['shard']['index']}/{report['shard']['count']}" if report.get("shard") else "")
        + ". Accuracies carry their image count and 95% interval; a drop whose interval covers 0 is within noise.</p>",
    ]
    if len(keys) > 1:
        parts.append("<ul>" + "".join(f'<li><a href="#model-{escape(k)}">{escape(k)}</a></li>' for k in keys) + "</ul>")
    if gate is not None:
        cls, word = ("pass", "PASSED") if gate.passed else ("fail", f"FAILED ({len(gate.regressions)} regressions)")
        parts.append(f'<h2>Regression gate vs {escape(baseline_name)}: <span class="{cls}">{word}</span></h2>')
        lines = gate_lines(gate, baseline_name)
        parts.append("<p>" + escape(lines[3]) + "</p>")
        parts += [f"<p><b>warning:</b> {escape(w)}</p>" for w in gate.warnings]
        parts.append(_table(GATE_HEADER, [gate_row(c) for c in gate.regressions + [c for c in gate.checks if not c.failed]]))
    for key in keys:
        parts += model_html(report, section(report, key))
    parts.append("<h2>Provenance</h2><pre>" + escape(json.dumps(
        {"host": report.get("host"), "tool_versions": report.get("tool_versions"),
         "merged_from": report.get("merged_from"), "shard": report.get("shard")}, indent=2)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
