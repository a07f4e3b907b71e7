"""The report's speed table: each runtime's int8 artifact against its float ones, timed interleaved.

The cells' own latencies come from separate convert runs (minutes apart, under whatever load the machine had);
a ratio between two of them would mix machine noise into int8's worth. This section times a runtime's fp32 and
int8 artifacts in one interleaved run (mnv4_deploy/verify/speed.py), strict f32 and as the runtime runs them
by default on this host (OpenVINO: bf16 on CPUs with bf16 support).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..targets import ExportRequest, get_target, options_for

logger = logging.getLogger(__name__)
TIMED = ("built", "reused")


def speed_rows(cells: list[dict[str, Any]], root: Path, loaded: Any, recipe: Any,
               target_options: dict[str, Any], runs: int) -> list[dict[str, Any]]:
    """One row per target whose fp32 and int8 cells were both built (or reused) and timed in its runtime."""
    from ..pipeline import apply_overrides
    from ..verify.speed import compare_int8_speed

    by_target: dict[str, dict[str, dict[str, Any]]] = {}
    for c in cells:
        if c["status"] in TIMED and "latency_median" in c["metrics"]:
            by_target.setdefault(c["target"], {})[c["precision"]] = c
    rows = []
    for name, cells_of in by_target.items():
        if not {"fp32", "int8"} <= set(cells_of):
            continue
        target = get_target(name)
        options = apply_overrides(options_for(recipe, name), target_options)
        pair = [(root / cells_of[p]["artifact"]["path"], ExportRequest(loaded, p, options)) for p in ("fp32", "int8")]
        logger.info(f"[{name}] timing fp32 and int8 interleaved ({runs} runs each)")
        rows.append(compare_int8_speed(target, pair[0], pair[1], runs=runs))
    return rows


def speed_table(rows: Optional[list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for markdown and HTML: strict f32 and the runtime's default float side by side."""
    header = ["runtime", "threads", "fp32 ms", "int8 ms", "int8 / fp32", "default float", "float ms", "int8 ms",
              "int8 / default float", "int8 under the runtime's defaults / default float"]
    out = []
    for r in rows or []:
        s, d = r["strict_f32"], r["runtime_default"]
        out.append([r["target"], str(s["fp32"].get("threads")), f"{s['fp32']['median_ms']:.2f}",
                    f"{s['int8']['median_ms']:.2f}", f"{s['int8_over_float']:.2f}", d["float_is"].split(" ")[0],
                    f"{d['float']['median_ms']:.2f}",
                    f"{d['int8']['median_ms']:.2f}", f"**{d['int8_over_float']:.2f}**",
                    f"{r['int8_runtime_defaults']['int8_over_float']:.2f}" if r.get("int8_runtime_defaults") else "same"])
    return header, out


SPEED_NOTE = ("int8 against float, each runtime's artifacts timed interleaved in one run (batch 1, this host): "
              "strict f32 as verification runs them, and as the runtime runs them when the user sets nothing "
              "(OpenVINO picks bf16 on CPUs with bf16 support), with int8 run as its manifest says (OpenVINO: "
              "INFERENCE_PRECISION_HINT f32 for its few float layers); the last column runs int8 under the "
              "runtime's defaults instead. Below 1 means int8 is faster.")
