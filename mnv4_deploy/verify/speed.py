"""int8 against the float users actually run: one runtime's float and int8 artifacts timed interleaved.

A latency measured alone says little about int8's worth: the machine's load drifts between two measurements,
and the float baseline must be the one the runtime runs by default on this host (OpenVINO computes a float IR
in bf16 on CPUs with bf16 support) as well as strict f32. So each runtime's variants are timed in alternating
blocks (ABBA order: noise hits all alike), batch 1 at the artifact's own input size, and int8 is quoted as a
ratio against both floats, each under the same runtime settings as its float:

  strict   int8 / fp32, both under the settings verification uses (OpenVINO: INFERENCE_PRECISION_HINT f32)
  default  int8 as shipped (its manifest's runtime settings) / the float the runtime runs when the user sets
           nothing (OpenVINO: its own hint, bf16 on such CPUs)

Where the runtime's default settings also change how the int8 artifact runs (OpenVINO computes an int8 IR's
float layers in bf16 by default), that variant is timed too (`int8_runtime_defaults`), so a report shows what
ignoring the manifest's settings costs.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Variant:
    """One artifact loaded one way: what it computes in, and the call to time."""

    label: str  # 'fp32', 'default float (bf16)', 'int8', 'int8 (runtime default)'
    computes_in: str  # the float precision of its non-int8 layers: 'fp32', 'bf16', ...
    run: Callable[[np.ndarray], Any]
    threads: Any = None
    times_ms: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        ms = sorted(self.times_ms)
        return {"median_ms": round(statistics.median(ms), 4), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 4),
                "runs": len(ms), "computes_in": self.computes_in, "threads": self.threads}


def interleave(variants: list[Variant], x: np.ndarray, blocks: int, per_block: int, warmup: int = 5) -> None:
    """Time every variant on `x` in alternating blocks (ABBA order) after a warm-up; appends to `times_ms`."""
    for v in variants:
        for _ in range(warmup):
            v.run(x)
    for b in range(blocks):
        for v in (variants if b % 2 == 0 else variants[::-1]):
            for _ in range(per_block):
                t0 = time.perf_counter()
                v.run(x)
                v.times_ms.append((time.perf_counter() - t0) * 1000.0)


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return round(a["median_ms"] / b["median_ms"], 3)


def compare_int8_speed(target: Any, fp32: tuple[Path, Any], int8: tuple[Path, Any], runs: int = 30,
                       x: Optional[np.ndarray] = None) -> dict[str, Any]:
    """One runtime's int8 artifact against its fp32 artifact, strict and as the runtime runs them by default.

    `fp32`, `int8`: (artifact path, ExportRequest) as the pipeline wrote them. `runs` timed calls per variant.
    """
    import dataclasses

    (fp32_path, fp32_req), (int8_path, int8_req) = fp32, int8
    variants = [Variant("fp32", "fp32", target.load(fp32_path, fp32_req)),
                Variant("int8", "fp32", target.load(int8_path, int8_req))]
    default_float = target.default_float()
    pinned = target.default_options(fp32_req.options) != fp32_req.options
    if pinned:  # verification pins a float precision the runtime would not pick by itself
        for label, path, req in ((f"float ({default_float}, the runtime's default)", fp32_path, fp32_req),
                                 ("int8 (the runtime's default float for its other layers)", int8_path, int8_req)):
            as_default = dataclasses.replace(req, options=target.default_options(req.options))
            variants.append(Variant(label, default_float, target.load(path, as_default)))
    for v in variants:
        v.threads = getattr(v.run, "threads", None)
    if x is None:
        shape = fp32_req.loaded.preprocessing.input_shape
        x = np.random.default_rng(0).standard_normal((1, *shape[1:])).astype(np.float32)
    per_block = max(1, min(10, runs // 6))
    interleave(variants, x, blocks=max(2, -(-runs // per_block)), per_block=per_block)
    s = {v.label: v.stats() for v in variants}
    strict = {"fp32": s["fp32"], "int8": s["int8"], "int8_over_float": _ratio(s["int8"], s["fp32"])}
    if not pinned:
        default = {"float": s["fp32"], "int8": s["int8"], "int8_over_float": strict["int8_over_float"],
                   "float_is": f"{default_float} (the runtime's default on this host)"}
        extra = {}
    else:
        f, i = variants[2].label, variants[3].label
        default = {"float": s[f], "int8": s["int8"], "int8_over_float": _ratio(s["int8"], s[f]),
                   "float_is": f"{default_float} (the runtime's default on this host)"}
        extra = {"int8_runtime_defaults": {"int8": s[i], "int8_over_float": _ratio(s[i], s[f]),
                                           "note": f"the int8 artifact under the runtime's default settings "
                                                   f"(its float layers in {default_float}), not as shipped"}}
    return {"target": target.name, "batch": 1, "input_shape": list(x.shape), "strict_f32": strict,
            "runtime_default": default, **extra, "how": "interleaved in alternating blocks, one process, batch 1"}
