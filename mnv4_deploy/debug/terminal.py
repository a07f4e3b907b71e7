"""What `mnv4-deploy debug` prints: summary lines, the worst layers' table, the trace and the advice."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from . import advice as advice_mod
from . import layers as L
from . import trace as trace_mod

WORST = 8


def table(report: dict[str, Any], worst: int = WORST) -> str:
    """The worst layers, one line per artifact under each layer."""
    header = ("#", "layer", "op", "artifact", "scale/zp (sim | runtime)", "vs sim mean/max LSB", "differ",
              "local max", "vs float dB", "cosine", "alone dB", "")
    lines = []
    by_pos = {lab: {r["position"]: r for r in rows} for lab, rows in report["layers"].items()}
    for pos in report["worst"][:worst]:
        for lab, rows in by_pos.items():
            r = rows.get(pos)
            if r is None:
                continue
            if r.get("runtime_tensor") is None:
                lines.append((str(pos), _short(r["module"] or r["quantizer"]), str(r["producer"])[:14], lab,
                              f"{r['scale']:.4g}/{r['zero_point']} | -", "-", "-", "-", "-", "-",
                              _f(r.get("alone_sqnr_db")), "DROPPED"))
                continue
            vs, loc, fl = r["vs_simulation"], r["local"], r["vs_float"]
            lines.append((str(pos), _short(r["module"] or r["quantizer"]), str(r["producer"])[:14], lab,
                          f"{r['scale']:.4g}/{r['zero_point']} | {r['runtime_scale']:.4g}/{r['runtime_zero_point']}",
                          f"{vs['mean_lsb']:.3f}/{vs['max_lsb']:.0f}", f"{100 * vs['frac_differ']:.1f}%",
                          f"{loc['max_lsb']:.0f}", _f(fl["sqnr_db"]),
                          "-" if fl["cosine"] is None else f"{fl['cosine']:.4f}", _f(r.get("alone_sqnr_db")),
                          "DIVERGES" if r["diverged"] else ""))
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def _short(s: str, n: int = 34) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"debug of {', '.join(a['label'] for a in report['artifacts'])} on {report['images']['count']} images "
             f"({report['images']['source']})"]
    lines.append("rebuilt the int8 model: " + "; ".join(report["checks"]))
    for a in report["artifacts"]:
        if a["status"] != "compared":
            lines.append(f"{a['label']}: {a['status']}")
            continue
        lines.append(f"{a['label']}: {a['matched']}/{a['pytorch_quantizers']} quantized tensors matched; "
                     + L.describe_divergence(a["label"], a["first_divergence"]).split(": ", 1)[1])
    for p in report["side_by_side"]:
        lines.append(L.describe_part(p))
    return lines


def print_report(report: dict[str, Any], echo: Any) -> None:
    for line in summary_lines(report):
        echo(line)
    echo("")
    echo(f"worst layers (where a runtime leaves its simulation first, then the tensors int8 costs most; LSB = "
         "steps of the simulation's scale):")
    echo(table(report))
    for t in report["traces"]:
        echo("")
        echo(f"one-image trace: {t['image']} (float model top-1 {t['float_model_top1']})")
        for line in trace_mod.describe(t):
            echo(line)
    if report.get("advice"):
        echo("")
        for line in advice_mod.describe(report["advice"]):
            echo(line)
    echo("")
    out = Path(report["_out"])
    echo(f"wrote {out / 'debug.json'}" + (f" and {out / 'debug.html'}" if (out / "debug.html").exists() else "")
         + f" ({report['seconds']['total']:.1f} s)")
