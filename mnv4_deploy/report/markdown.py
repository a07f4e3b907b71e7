"""report.md: one table per question, short enough for a CI job summary or a pull-request comment."""
from __future__ import annotations

from typing import Any, Optional

from .gate import GateResult
from .roofline import DEVICES
from .schema import value


def _pct(v: Optional[float], digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: Optional[float], fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def cells_table(report: dict[str, Any]) -> list[str]:
    """The main table: one row per target x precision."""
    return _table(*cells_rows(report))


def cells_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (shared by Markdown and HTML)."""
    rows = []
    for c in report["cells"]:
        if c["status"] not in ("built", "reused"):
            rows.append([c["target"], c["precision"], c["status"], "–", "–", "–", "–", "–", "–", "–", c.get("note", "")])
            continue
        m = c["metrics"]
        agree_key = "val.top1_agreement" if "val.top1_agreement" in m else "held_back.top1_agreement"
        ev = agree_key.split(".")[0]
        lat = f"{m['latency_median']['value']:.2f} / {m['latency_p90']['value']:.2f}"
        note = [c.get("note", "")] if c.get("note") else []
        if c.get("numbers") == "simulated":
            note.append("simulated (no runtime on this host)")
        if value(c, "tensorwise.flagged"):
            note.append(f"{value(c, 'tensorwise.flagged')} layer(s) disagree with the int8 simulation "
                        "(manifest verification.tensorwise)")
        drop = value(c, "val.top1_drop")
        rows.append([
            c["target"], c["precision"], c["status"],
            f"{m['size']['value'] / 1e6:.2f}", lat,
            _pct(value(c, "val.top1")), "–" if drop is None else f"{drop:+.2f}",
            _pct(value(c, agree_key)) + ("" if ev == "val" else " (held-back)"),
            _num(value(c, f"{ev}.cosine"), ".4f"), _num(value(c, f"{ev}.sqnr_db"), ".1f"), "; ".join(note),
        ])
    return (["target", "precision", "status", "size MB", "latency ms (median / p90)", "val top-1",
             "drop vs float (pp)", "agreement with float", "cosine", "SQNR dB", "notes"], rows)


def roofline_table(report: dict[str, Any]) -> list[str]:
    roof = report.get("roofline")
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
    lines = ["", f"**Estimated** latency on the paper's hardware (roofline, {roof['macs']['value'] / 1e6:.1f} M MACs; "
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


def gate_lines(gate: GateResult, baseline_name: str = "baseline") -> list[str]:
    th = gate.thresholds
    lat = "off" if th.max_latency_regression is None else f"{100 * th.max_latency_regression:g}%"
    head = "PASSED" if gate.passed else f"FAILED: {len(gate.regressions)} regression(s)"
    lines = ["", f"### Regression gate vs `{baseline_name}`: {head}", "",
             f"Limits: top-1 drop ≤ {th.max_drop:g} pp, agreement drop ≤ {th.agreement:g} pp, "
             f"median latency increase ≤ {lat}.", ""]
    for w in gate.warnings:
        lines.append(f"> warning: {w}")
    if gate.warnings:
        lines.append("")

    def row(c: Any) -> list[str]:
        if c.check == "present":
            return [f"{c.target}/{c.precision}", "artifact", "built", c.note or "missing", "–", "–", "❌ regression"]
        fmt = (lambda v: "–" if v is None else f"{v:.2f}%") if c.unit == "pp" else (lambda v: "–" if v is None else f"{v:.2f} ms")
        change = "–" if c.change is None else (f"{0.0 - c.change:+.2f} pp" if c.unit == "pp" else f"{c.change + 0.0:+.1f}%")
        limit = "–" if c.limit is None else (f"-{c.limit:g} pp" if c.unit == "pp" else f"+{c.limit:g}%")
        verdict = "❌ regression" if c.failed else ("ok" + (f" ({c.note})" if c.note else ""))
        return [f"{c.target}/{c.precision}", c.check, fmt(c.baseline), fmt(c.new), change, limit, verdict]

    header = ["cell", "check", "baseline", "new", "change", "limit", "result"]
    if gate.regressions:
        lines += _table(header, [row(c) for c in gate.regressions])
        lines.append("")
    others = [c for c in gate.checks if not c.failed]
    if others:
        lines += ["<details><summary>checks that passed</summary>", ""]
        lines += _table(header, [row(c) for c in others])
        lines += ["", "</details>"]
    if not gate.checks:
        lines.append("No cells in common with the baseline.")
    return lines


def render(report: dict[str, Any], gate: Optional[GateResult] = None, baseline_name: str = "baseline") -> str:
    model = report.get("model", {})
    s = report.get("settings", {})
    host = report.get("host", {})
    lines = [f"## mnv4-deploy report: {model.get('name', '?')}", ""]
    facts = [f"weights `{model.get('weights', '?')}`", f"input {s.get('input_size', '?')}",
             f"recipe `{s.get('recipe', '?')}`"]
    if s.get("val"):
        facts.append(f"val: {s['val']}" + (f" ({s['val_limit']} images)" if s.get("val_limit") else ""))
    facts.append(f"host {host.get('hostname', '?')} ({host.get('cpu_count', '?')} CPUs, "
                 f"load {host.get('load_average_1m', '?')} at the end of the run)")
    lines += ["; ".join(facts) + ".", ""]
    lines += cells_table(report)
    lines += ["", "Latency and accuracy are measured in each target's runtime on this host unless marked simulated; "
              "drop and agreement are against the float PyTorch model on the same images."]
    lines += roofline_table(report)
    lines += sensitivity_lines(report)
    if gate is not None:
        lines += gate_lines(gate, baseline_name)
    return "\n".join(lines) + "\n"


def sensitivity_lines(report: dict[str, Any], top: int = 5) -> list[str]:
    sens = report.get("sensitivity")
    if not sens or not sens.get("layers"):
        return []
    worst = sorted(sens["layers"], key=lambda layer: layer["sqnr_db"])[:top]
    lines = ["", f"Most int8-sensitive layers (simulated: only that layer int8, {sens['images']} images; "
                 "lower SQNR = more sensitive):", ""]
    return lines + _table(["layer", "logits SQNR dB", "top-1 agreement"],
                          [[f"`{w['name']}`", f"{w['sqnr_db']:.1f}", _pct(w["top1_agreement"])] for w in worst])
