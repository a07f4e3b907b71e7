"""One image: the layer where its top-1 decision flips against float.

The float graph (`layers.FloatGraph`) is run with the int8 values of positions 0..k-1 injected and everything
after them in float, for every k: decision(0) is float, decision(N) is the whole int8 prefix. The flip layer is
the position from which the decision stays away from float's (the first one it leaves float's is reported too;
a decision may flip and flip back). The int8 values come from the simulation, and from each runtime (its own
tensors, matched and aligned by tensorwise), so "why is this image wrong in int8" is answered per runtime.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np


def decisions(fg: Any, x1: np.ndarray, values: dict[int, np.ndarray]) -> list[int]:
    """Top-1 with positions < k quantized (their `values`), the rest float, for k = 0..N (one batch)."""
    logits = fg.prefix_logits(x1, values)
    return [int(v) for v in np.asarray(logits).reshape(len(logits), -1).argmax(1)]


def flip(dec: list[int], modules: list[str]) -> dict[str, Any]:
    """Where the decision leaves float's for good (and where it first leaves it)."""
    ref = dec[0]
    if dec[-1] == ref:
        first = next((k for k, d in enumerate(dec) if d != ref), None)
        return {"flipped": False, "float_top1": ref, "int8_top1": dec[-1],
                "first_left_at": None if first is None else _at(first - 1, modules)}
    settle = len(dec) - 1
    while settle > 0 and dec[settle - 1] != ref:
        settle -= 1
    first = next(k for k, d in enumerate(dec) if d != ref)
    return {"flipped": True, "float_top1": ref, "int8_top1": dec[-1], "flip": _at(settle - 1, modules),
            "first_left_at": _at(first - 1, modules)}


def _at(pos: int, modules: list[str]) -> dict[str, Any]:
    return {"position": pos, "module": modules[pos] if 0 <= pos < len(modules) else "?"}


def trace_image(fg: Any, x1: np.ndarray, simulation: dict[int, np.ndarray],
                runtimes: dict[str, dict[int, np.ndarray]], runtime_top1: dict[str, Optional[int]],
                model_float_top1: int, name: str) -> dict[str, Any]:
    """The trace of one image: simulation and every runtime, decision by decision."""
    sim = decisions(fg, x1, simulation)
    out = {"image": name, "float_model_top1": model_float_top1,
           "simulation": flip(sim, fg.modules) | {"decisions": sim}, "runtimes": {}}
    for label, values in runtimes.items():
        dec = decisions(fg, x1, values)
        out["runtimes"][label] = flip(dec, fg.modules) | {"decisions": dec, "runtime_top1": runtime_top1.get(label)}
    return out


def describe(t: dict[str, Any]) -> list[str]:
    lines = []
    for label, f in [("simulation", t["simulation"]), *t["runtimes"].items()]:
        own = f" (runtime's own top-1 {f['runtime_top1']})" if f.get("runtime_top1") is not None else ""
        if f["flipped"]:
            lines.append(f"  {label}: top-1 {f['float_top1']} -> {f['int8_top1']}{own}; flips at "
                         f"#{f['flip']['position']} {f['flip']['module']}"
                         + (f" (first leaves float at #{f['first_left_at']['position']})"
                            if f["first_left_at"]["position"] != f["flip"]["position"] else ""))
        else:
            lines.append(f"  {label}: keeps float's top-1 {f['float_top1']}{own}")
    return lines
