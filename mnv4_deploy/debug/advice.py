"""What to do about a bad layer: what an int16 or a float fallback of that site recovers, and the recipe
snippet that does it.

Measured as the recipe's own sensitivity analysis measures it (mnv4_deploy/sensitivity.py, on the calibrated
graph's switchable quantizers, `sites.SiteToggler`): top-1 agreement with the float model on the debug images,
with its 95% Wilson interval, with every quantizer on, then with the site's activation left float, then with it
widened to int16 (`sites.widen_sites`: same calibrated range, 256x finer grid). A site is named by its module
path; every activation quantizer of that module is taken out together, as `quantization.fallback.layers` does.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def activation_layers(prepared: Any) -> list[tuple[str, str]]:
    """(observer name, module path) of every activation quantizer call of the calibrated graph, in graph order:
    the same order as the converted graph's activation quantizers."""
    from ..quantization.quantizer_sites import find_sites

    kinds = {s.name: s for s in find_sites(prepared)}
    out = []
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target in kinds and kinds[node.target].kind == "activation":
            out.append((node.target, kinds[node.target].layer))
    return out


def _agreement(logits: np.ndarray, float_logits: np.ndarray) -> tuple[float, list[float]]:
    from ..verify.significance import wilson_interval

    n = len(logits)
    agree = int((logits.reshape(n, -1).argmax(1) == float_logits.reshape(n, -1).argmax(1)).sum())
    return round(agree / n, 4), [round(v, 4) for v in wilson_interval(agree, n)]


def advise(quantized: Any, modules: Sequence[str], x: np.ndarray, float_logits: np.ndarray,
           traced: Optional[tuple[np.ndarray, int]] = None) -> dict[str, Any]:
    """For each module path: agreement with float with all quantizers, with its activations float, int16.

    `traced`: (one image, float top-1): its decision under each fallback too."""
    from ..quantization.quantizer_sites import SiteToggler, widen_sites

    prepared = quantized.prepared
    sites = activation_layers(prepared)
    tog = SiteToggler(prepared)
    tog.set_enabled(lambda n: True)
    base = tog.logits(x)
    agree, ci = _agreement(base, float_logits)
    out: dict[str, Any] = {"images": len(x), "all_int8": {"top1_agreement": agree, "ci95": ci}, "sites": []}
    for module in dict.fromkeys(modules):
        names = sorted({n for n, layer in sites if layer == module})
        if not names:
            continue
        row: dict[str, Any] = {"module": module, "observers": names}
        tog.set_enabled(lambda n: n not in names)
        fl = tog.logits(x)
        row["float"] = dict(zip(("top1_agreement", "ci95"), _agreement(fl, float_logits)))
        wide = SiteToggler(widen_sites(prepared, names))
        wide.set_enabled(lambda n: True)
        w16 = wide.logits(x)
        row["int16"] = dict(zip(("top1_agreement", "ci95"), _agreement(w16, float_logits)))
        if traced is not None:
            x1, ref = traced
            row["traced_image"] = {"float_top1": ref,
                                   "all_int8_top1": int(tog_top1(tog, x1, lambda n: True)),
                                   "float_fallback_top1": int(tog_top1(tog, x1, lambda n: n not in names)),
                                   "int16_fallback_top1": int(wide.logits(x1).reshape(-1).argmax())}
        row["recipe"] = snippet(module, "int16") 
        row["recipe_float"] = snippet(module, "float")
        out["sites"].append(row)
    tog.set_enabled(lambda n: True)
    return out


def tog_top1(tog: Any, x1: np.ndarray, enabled: Any) -> int:
    tog.set_enabled(enabled)
    return int(tog.logits(x1).reshape(-1).argmax())


def snippet(module: str, precision: str) -> str:
    """The recipe YAML that keeps `module`'s activations out of int8 (int16 where the target runs int16
    activations: ONNX and QNN; float elsewhere)."""
    return (f"quantization:\n  fallback:\n    precision: {precision}\n    layers: \"{module}\"\n")


def describe(advice: dict[str, Any]) -> list[str]:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    base = advice["all_int8"]
    lines = [f"fallback advice (top-1 agreement with float on {advice['images']} images; all int8: "
             f"{pct(base['top1_agreement'])} [{pct(base['ci95'][0])}, {pct(base['ci95'][1])}]):"]
    for r in advice["sites"]:
        line = (f"  {r['module']}: float {pct(r['float']['top1_agreement'])} "
                f"[{pct(r['float']['ci95'][0])}, {pct(r['float']['ci95'][1])}], int16 "
                f"{pct(r['int16']['top1_agreement'])} [{pct(r['int16']['ci95'][0])}, {pct(r['int16']['ci95'][1])}]")
        t = r.get("traced_image")
        if t:
            line += (f"; traced image: int8 {t['all_int8_top1']}, with float fallback {t['float_fallback_top1']}, "
                     f"int16 {t['int16_fallback_top1']} (float {t['float_top1']})")
        lines.append(line)
    if advice["sites"]:
        lines.append("  recipe: " + advice["sites"][0]["recipe"].replace("\n", " ").replace("  ", " ").strip())
    return lines
