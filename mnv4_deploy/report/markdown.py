"""report.md: one table per question, short enough for a CI job summary or a pull-request comment."""
from __future__ import annotations

from typing import Any, Optional

from ..verify.manifest import NUMBERS_KINDS
from .regression_gate import GateResult
from .roofline import DEVICES
from .schema import interval, section, value
from .speed_section import SPEED_NOTE, speed_table


def _pct(v: Optional[float], digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: Optional[float], fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def cells_table(report: dict[str, Any], model: Optional[str] = None) -> list[str]:
    """The main table: one row per target x precision (of one model, or of all)."""
    return _table(*cells_rows(report, model))


def pct_ci(cell: dict[str, Any], key: str) -> str:
    """'22.95% (21.14-24.86)': a proportion with its 95% interval."""
    v, ci = value(cell, key), interval(cell, key)
    if v is None:
        return "–"
    return _pct(v) + ("" if ci is None else f" ({100 * ci[0]:.2f}–{100 * ci[1]:.2f})")


def drop_ci(cell: dict[str, Any], key: str) -> str:
    """'+0.10 (-0.42, +0.62), within noise': a paired difference in points, noise marked."""
    v, ci = value(cell, key), interval(cell, key)
    if v is None:
        return "–"
    if ci is None:
        return f"{v:+.2f}"
    noise = ", within noise" if ci[0] <= 0.0 <= ci[1] else ""
    return f"{v:+.2f} ({ci[0]:+.2f}, {ci[1]:+.2f}){noise}"


def int8_compute(cell: dict[str, Any]) -> str:
    """What the runtime executed in int8 (from the target's manifest), or '-' when it does not say."""
    ic = cell.get("int8_compute")
    return "-" if not ic else f"int8 compute: {ic.get('int8')} of {ic.get('total')}"


def cells_rows(report: dict[str, Any], model: Optional[str] = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (shared by Markdown and HTML)."""
    rows = []
    for c in report["cells"]:
        if model is not None and c.get("model") != model:
            continue
        if c["status"] not in ("built", "reused"):
            rows.append([c["target"], c["precision"], c["status"]] + ["–"] * 9 + [c.get("note", "")])
            continue
        m = c["metrics"]
        agree_key = "val.top1_agreement" if "val.top1_agreement" in m else "held_back.top1_agreement"
        ev = agree_key.split(".")[0]
        lat = (f"{m['latency_median']['value']:.2f} / {m['latency_p90']['value']:.2f}" if "latency_median" in m
               else "not timed")
        note = [c.get("note", "")] if c.get("note") else []
        if c.get("numbers", "measured") != "measured":
            note.append(f"{c['numbers']}: {NUMBERS_KINDS[c['numbers']]}")
        if c.get("placement"):
            p = c["placement"]
            note.append(f"on HTP: {p['nodes_on_htp']}/{p['nodes_seen_by_qnn']} nodes" + "".join(
                f"; left off HTP: {r['node']} ({r['op']}): {r['reason']}" for r in p["left_off_htp"][:3]))
        if value(c, "tensorwise.flagged"):
            note.append(f"{value(c, 'tensorwise.flagged')} layer(s) disagree with the int8 simulation "
                        "(manifest verification.tensorwise)")
        images = m[agree_key].get("images")
        rows.append([
            c["target"], c["precision"], c["status"],
            f"{m['size']['value'] / 1e6:.2f}", lat, "–" if images is None else f"{images}" + ("" if ev == "val" else " (held-back)"),
            pct_ci(c, "val.top1"), drop_ci(c, "val.top1_drop"), pct_ci(c, agree_key), int8_compute(c),
            _num(value(c, f"{ev}.cosine"), ".4f"), _num(value(c, f"{ev}.sqnr_db"), ".1f"), "; ".join(note),
        ])
    return (["target", "precision", "status", "size MB", "latency ms (median / p90)", "images",
             "val top-1 (95% CI)", "drop vs float, pp (95% CI)", "agreement with float (95% CI)", "int8 compute",
             "cosine", "SQNR dB", "notes"], rows)


def roofline_table(roof: Optional[dict[str, Any]]) -> list[str]:
    if not roof:
        return []
    keys = list(DEVICES)
    header = ["precision"] + [f"{DEVICES[k][0]} (RP {DEVICES[k][1]})" for k in keys]
    rows = []
    for precision, entry in roof["precisions"].items():
        cost = entry["estimated_cost"]["value"]
        rel = entry.get("relative_to_fp32", {}).get("value", {})
        bound = entry["memory_bound_layers"]["value"]
        rows.append([precision] + [
            f"{cost[k]:.2f}" + (f" (×{rel[k]:.2f})" if k in rel else "") + f", {bound[k]}/{len(roof['layers'])} mem-bound"
            for k in keys])
    size = roof.get("input_size", {})
    at = f"at input {size.get('value')} ({size.get('source')}); " if size else ""
    lines = ["", f"**Estimated** latency on the paper's hardware (roofline, {at}{roof['macs']['value'] / 1e6:.1f} M MACs; "
             "unit: MB-eq = time to move 1 MB at the device's peak bandwidth, normalised; ×: relative to fp32; "
             "not measured):", ""]
    lines += _table(header, rows)
    # Figure 3 of the paper: where the time goes, per op type, as the ridge point grows.
    precision = "int8" if "int8" in roof["precisions"] else next(iter(roof["precisions"]))
    shares = roof["precisions"][precision]["op_type_share"]["value"]
    types = list(next(iter(shares.values())))
    lines += ["", f"Estimated cost share per op type ({precision}):", ""]
    lines += _table(["op type"] + [DEVICES[k][0] for k in keys],
                    [[t] + [_pct(shares[k].get(t, 0.0), 1) for k in keys] for t in types])
    return lines


GATE_HEADER = ["cell", "check", "baseline", "new", "change (95% CI)", "paired test", "limit", "result"]


def gate_row(c: Any) -> list[str]:
    """One gate check as a table row (Markdown and HTML)."""
    if c.check == "present":
        return [c.cell, "artifact", "built", c.note or "missing", "–", "–", "–", "❌ regression"]
    if c.unit == "pp":
        fmt = lambda v: "–" if v is None else f"{v:.2f}%"
        change = "–" if c.change is None else f"{0.0 - c.change:+.2f} pp"
        if c.ci95 is not None:
            change += f" ({0.0 - c.ci95[1]:+.2f}, {0.0 - c.ci95[0]:+.2f})"
        detail = (f"p={c.p_value:.2g}, {c.lost} lost / {c.gained} gained of {c.images}, "
                  + ("no drop detectable (too few images)" if c.detectable is None
                     else f"detectable ≥ {c.detectable:.2f} pp"))
        limit = f"-{c.limit:g} pp"
    else:
        fmt = lambda v: "–" if v is None else f"{v:.2f} ms"
        change = "–" if c.change is None else f"{c.change + 0.0:+.1f}%"
        detail, limit = "–", "–" if c.limit is None else f"+{c.limit:g}%"
    if c.failed:
        verdict = "❌ regression"
    elif c.within_noise:
        verdict = "ok (within noise)"
    elif c.unit == "pp" and c.change is not None and c.change > 0 and not c.significant:
        verdict = "ok (not significant)"
    else:
        verdict = "ok" + (f" ({c.note})" if c.note and c.unit != "pp" else "")
    check = c.check + (f" ({c.note})" if c.unit == "pp" and c.note else "")
    return [c.cell, check, fmt(c.baseline), fmt(c.new), change, detail, limit, verdict]


def gate_lines(gate: GateResult, baseline_name: str = "baseline") -> list[str]:
    th = gate.thresholds
    lat = "off" if th.max_latency_regression is None else f"{100 * th.max_latency_regression:g}%"
    head = "PASSED" if gate.passed else f"FAILED: {len(gate.regressions)} regression(s)"
    lines = ["", f"### Regression gate vs `{baseline_name}`: {head}", "",
             f"Limits: top-1 drop ≤ {th.max_drop:g} pp, agreement drop ≤ {th.agreement:g} pp, "
             f"median latency increase ≤ {lat}. An accuracy drop regresses only when it is also significant: "
             f"one-sided exact McNemar test on the images that changed, α = {th.alpha:g} Holm-corrected over "
             f"{gate.tests} test(s). \"detectable\" is the smallest drop these images could show as significant "
             f"(at α/{max(gate.tests, 1)}).", ""]
    for w in gate.warnings:
        lines.append(f"> warning: {w}")
    if gate.warnings:
        lines.append("")

    header = GATE_HEADER
    if gate.regressions:
        lines += _table(header, [gate_row(c) for c in gate.regressions])
        lines.append("")
    others = [c for c in gate.checks if not c.failed]
    if others:
        lines += ["<details><summary>checks that passed</summary>", ""]
        lines += _table(header, [gate_row(c) for c in others])
        lines += ["", "</details>"]
    if not gate.checks:
        lines.append("No cells in common with the baseline.")
    return lines


def model_lines(report: dict[str, Any], sec: dict[str, Any], level: str = "###") -> list[str]:
    """One model's section: facts, its cells with intervals, roofline estimates and sensitivity."""
    model, s = sec.get("model", {}), sec.get("settings", {})
    facts = [f"weights `{model.get('weights', s.get('weights', '?'))}`",
             f"input {s.get('input_size', '?')} ({s.get('input_size_source', '?')})",
             f"recipe `{s.get('recipe', '?')}`"]
    if s.get("val"):
        facts.append(f"val: {s['val']}" + (f" ({s['val_limit']} images)" if s.get("val_limit") else ""))
    lines = [f"{level} {sec['key']}" + (f" (`{model['name']}`)" if model.get("name") not in (None, sec["key"]) else ""),
             "", "; ".join(facts) + ".", ""]
    lines += cells_table(report, sec["key"])
    lines += speed_lines(sec)
    lines += roofline_table(sec.get("roofline"))
    lines += sensitivity_lines(sec)
    return lines


def speed_lines(sec: dict[str, Any]) -> list[str]:
    """int8 against strict f32 and against the runtime's default float, timed interleaved (speed_section.py)."""
    if not sec.get("speed"):
        return []
    return ["", SPEED_NOTE, ""] + _table(*speed_table(sec["speed"]))


def model_keys(report: dict[str, Any]) -> list[str]:
    """Every model of the report, in its cells' order (a shard may hold cells of a model whose section is
    in another shard)."""
    return list(dict.fromkeys([m["key"] for m in report.get("models", [])] + [c.get("model", "") for c in report["cells"]]))


def render(report: dict[str, Any], gate: Optional[GateResult] = None, baseline_name: str = "baseline") -> str:
    host = report.get("host", {})
    keys = model_keys(report)
    title = keys[0] if len(keys) == 1 else f"{len(keys)} models"
    lines = [f"## mnv4-deploy report: {title}", ""]
    shard = report.get("shard")
    facts = [f"host {host.get('hostname', '?')} ({host.get('cpu_count', '?')} CPUs, "
             f"load {host.get('load_average_1m', '?')} at the end of the run)"]
    if shard:
        facts.append(f"shard {shard['index']}/{shard['count']} ({len(report['cells'])} of {len(shard['plan'])} cells)")
    if report.get("merged_from"):
        facts.append(f"merged from {len(report['merged_from'])} shards on "
                     f"{', '.join(sorted({str(m['host']) for m in report['merged_from']}))}")
    lines += ["; ".join(facts) + ".", "",
              "Accuracies are proportions over the images counted in `images`; brackets give 95% intervals "
              "(Wilson; the drop vs float is paired, Newcombe), and a drop whose interval covers 0 is marked "
              "*within noise*. Latency and accuracy are measured in each target's runtime on this host unless "
              "marked simulated; drop and agreement are against the float PyTorch model on the same images.", ""]
    for key in keys:
        lines += model_lines(report, section(report, key), "###" if len(keys) > 1 else "####") + [""]
    if gate is not None:
        lines += gate_lines(gate, baseline_name)
    return "\n".join(lines) + "\n"


def sensitivity_lines(sec: dict[str, Any], top: int = 5) -> list[str]:
    sens = sec.get("sensitivity")
    if not sens or not sens.get("layers"):
        return []
    worst = sorted(sens["layers"], key=lambda layer: layer["sqnr_db"])[:top]
    lines = ["", f"Most int8-sensitive layers (simulated: only that layer int8, {sens['images']} images; "
                 "lower SQNR = more sensitive):", ""]
    return lines + _table(["layer", "logits SQNR dB", "top-1 agreement"],
                          [[f"`{w['name']}`", f"{w['sqnr_db']:.1f}", _pct(w["top1_agreement"])] for w in worst])
