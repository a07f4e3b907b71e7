"""debug.html: error along the depth of the network per runtime, the first divergence marked, the one-image
trace, the worst layers; one self-contained page (inline SVG, no script, no network)."""
from __future__ import annotations

import math
from html import escape
from typing import Any, Optional, Sequence

from ..report.svg import PALETTE

W, H = 900, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 34, 50


def depth_chart(report: dict[str, Any], key: str, title: str, ylabel: str, log: bool) -> str:
    """One line per runtime along the quantizer positions; each runtime's first divergence marked."""
    n = max(1, len(report["positions"]))
    series = []
    for i, (label, rows) in enumerate(report["layers"].items()):
        pts = []
        for r in rows:
            v = _value(r, key)
            if v is not None and (not log or v > 0):
                pts.append((r["position"], v))
        series.append((label, PALETTE[i % len(PALETTE)], pts))
    values = [v for _, _, pts in series for _, v in pts]
    if not values:
        return f"<p>{escape(title)}: no values.</p>"
    lo, hi = min(values), max(values)
    if log:
        lo, hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        hi = hi if hi > lo else lo + 1
    else:
        lo, hi = min(0.0, lo), (hi if hi > lo else lo + 1)
    sx = lambda p: LEFT + p / max(1, n - 1) * (W - LEFT - RIGHT)  # noqa: E731
    sy = lambda v: H - BOTTOM - (((math.log10(v) if log else v) - lo) / (hi - lo)) * (H - TOP - BOTTOM)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="{escape(title)}" font-family="sans-serif" font-size="11">',
             f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#888"/>']
    ticks = range(int(lo), int(hi) + 1) if log else _lin_ticks(lo, hi)
    for t in ticks:
        v = 10 ** t if log else t
        y = sy(v)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    for p in range(0, n, max(1, n // 10)):
        parts.append(f'<text x="{sx(p):.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{p}</text>')
    parts.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">quantized tensor '
                 f'(graph order, input to logits)</text>')
    parts.append(f'<text x="14" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2})">{escape(ylabel)}</text>')
    first = {a["label"]: a.get("first_divergence") for a in report["artifacts"]}
    for k, (label, color, pts) in enumerate(series):
        if len(pts) > 1:  # earlier lines wider: where runtimes agree, each still shows beside the one on top
            d = " ".join(f"{sx(p):.1f},{sy(v):.1f}" for p, v in pts)
            width = 1.6 + 1.6 * (len(series) - 1 - k)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="{width:.1f}" '
                         f'stroke-linejoin="round"/>')
        y = TOP + 8 + 16 * k
        parts.append(f'<line x1="{W - RIGHT + 10}" y1="{y}" x2="{W - RIGHT + 30}" y2="{y}" stroke="{color}" '
                     f'stroke-width="2"/><text x="{W - RIGHT + 34}" y="{y + 4}">{escape(label)}</text>')
        fd = first.get(label)
        if fd is not None:
            x = sx(fd["position"])
            parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="{color}" '
                         f'stroke-dasharray="5,3" stroke-width="1.5"/>'
                         f'<text x="{x + 3:.1f}" y="{TOP + 12 + 12 * k}" fill="{color}">{escape(label)} diverges '
                         f'#{fd["position"]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _lin_ticks(lo: float, hi: float) -> Sequence[float]:
    """Round ticks (a 1, 2 or 5 step) covering about five intervals of [lo, hi]."""
    raw = (hi - lo) / 5
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _value(r: dict[str, Any], key: str) -> Optional[float]:
    if key == "sim_mean_lsb":
        return (r.get("vs_simulation") or {}).get("mean_lsb")
    if key == "float_sqnr":
        return (r.get("vs_float") or {}).get("sqnr_db")
    return None


def _trace_chart(t: dict[str, Any]) -> str:
    """Decision per prefix: a strip per runtime, green where it is float's top-1, red where not."""
    rows = [("simulation", t["simulation"]), *t["runtimes"].items()]
    n = len(t["simulation"]["decisions"])
    w, row_h, left = 900, 22, 120
    cell = (w - left - 20) / max(1, n)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{row_h * len(rows) + 30}" role="img" '
             f'aria-label="one-image trace" font-family="sans-serif" font-size="11">']
    for k, (label, f) in enumerate(rows):
        y = 8 + k * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        for i, d in enumerate(f["decisions"]):
            color = "#2ca02c" if d == f["float_top1"] else "#d62728"
            parts.append(f'<rect x="{left + i * cell:.1f}" y="{y}" width="{cell + 0.5:.1f}" height="{row_h - 6}" '
                         f'fill="{color}"><title>int8 through #{i - 1}: top-1 {d}</title></rect>')
        if f.get("flipped"):
            x = left + (f["flip"]["position"] + 1) * cell
            parts.append(f'<line x1="{x:.1f}" y1="{y - 2}" x2="{x:.1f}" y2="{y + row_h - 4}" stroke="black" '
                         f'stroke-width="2"/>')
    parts.append(f'<text x="{left}" y="{row_h * len(rows) + 24}">left: all float; right: int8 through the last '
                 f'quantizer (green: float\'s top-1, red: another class; black bar: flip layer)</text></svg>')
    return "".join(parts)


def render(report: dict[str, Any]) -> str:
    arts = ", ".join(a["label"] for a in report["artifacts"])
    body = [f"<h1>mnv4-deploy debug: {escape(arts)}</h1>",
            f"<p>{report['images']['count']} images: {escape(report['images']['source'])}</p>",
            "<h2>Where each runtime leaves its simulation</h2><ul>"]
    from .layers import describe_divergence, describe_part

    for a in report["artifacts"]:
        text = a["status"] if a["status"] != "compared" else describe_divergence(a["label"], a["first_divergence"])
        cls = "bad" if a.get("first_divergence") else "ok"
        body.append(f'<li class="{cls}">{escape(text)}</li>')
    body.append("</ul>")
    if report["side_by_side"]:
        body.append("<h2>Side by side</h2><ul>" + "".join(f"<li>{escape(describe_part(p))}</li>"
                                                          for p in report["side_by_side"]) + "</ul>")
    body.append("<h2>Error along the depth</h2>")
    body.append(depth_chart(report, "sim_mean_lsb", "runtime vs its simulation: mean |difference| (LSB, log scale)",
                            "mean LSB (log)", log=True))
    body.append(depth_chart(report, "float_sqnr", "runtime vs float: SQNR per tensor (dB)", "SQNR dB", log=False))
    for t in report["traces"]:
        from .trace import describe

        body.append(f"<h2>One-image trace: {escape(t['image'])}</h2>")
        body.append("<pre>" + escape("\n".join(describe(t))) + "</pre>")
        body.append(_trace_chart(t))
    from .terminal import table

    body.append("<h2>Worst layers</h2><pre>" + escape(table(report)) + "</pre>")
    if report.get("advice"):
        from .advice import describe as advice_lines

        body.append("<h2>Fallback advice</h2><pre>" + escape("\n".join(advice_lines(report["advice"]))) + "</pre>")
        if report["advice"]["sites"]:
            body.append("<pre>" + escape(report["advice"]["sites"][0]["recipe"]) + "</pre>")
    body.append("<p>Rebuilt from the manifests: " + escape("; ".join(report["checks"])) + "</p>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:1em auto;color:#222}li.bad{color:#b00}"
             "li.ok{color:#070}pre{background:#f6f6f6;padding:6px;overflow-x:auto;font-size:11px}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mnv4-deploy debug</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
