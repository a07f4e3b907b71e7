"""Per-layer quantization sensitivity, and keeping the most sensitive layers in float.

Built on the quantizer sites of `mnv4_deploy.quantization.quantizer_sites`: sensitivity = what happens to the logits when only that
site is quantized (SQNR vs float, top-1 agreement), measured by toggling sites without re-converting the graph.

A float fallback removes the chosen sites' observers before conversion (`sites.remove_sites`), so those
tensors stay float in the exported model (ONNX, OpenVINO, CoreML; TFLite with float I/O). Full-integer targets
cannot take a fallback. An int16 fallback widens the chosen observers to int16 instead (`sites.widen_sites`,
w8a16 for those tensors): convert_pt2e then writes int16 quantize/dequantize pairs, which ONNX carries as
int16 QDQ. The choice is the same for both, made with the sites left float, since an int16 tensor is within
1/256 of an int8 one's error.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from ..infra.stages import stage
from ..verify.fidelity import compare
from .quantizer_sites import SiteToggler


def analyse(prepared: torch.fx.GraphModule, x: np.ndarray, float_logits: np.ndarray) -> dict[str, Any]:
    """Quantize one site at a time (all others float); also each site left float with all others int8."""
    tog = SiteToggler(prepared)
    tog.set_enabled(lambda n: True)
    full = compare(tog.logits(x), float_logits)
    rows = []
    with stage("sensitivity", f"sensitivity of {len(tog.sites)} quantizers", total=len(tog.sites),
               unit="site") as bar:
        for site in tog.sites:
            tog.set_enabled(lambda n: n == site.name)
            only = compare(tog.logits(x), float_logits)
            tog.set_enabled(lambda n: n != site.name)
            without = compare(tog.logits(x), float_logits)
            rows.append(dataclasses.asdict(site) | {
                "only_this_sqnr_db": only.sqnr_db, "only_this_agreement": only.top1_agreement,
                "all_but_this_agreement": without.top1_agreement, "all_but_this_sqnr_db": without.sqnr_db,
            })
            bar.advance()
    rows.sort(key=lambda r: r["only_this_sqnr_db"])
    return {"images": len(x), "all_quantized": full.to_dict(), "sites": rows}


def choose_fallback(prepared: torch.fx.GraphModule, x: np.ndarray, float_logits: np.ndarray,
                    target_agreement: float, max_sites: int, kinds: Sequence[str] = ("activation",)) -> dict[str, Any]:
    """Greedily leave in float the site whose removal helps most, until `target_agreement` or `max_sites`.

    Ranked once by the 'all but this' SQNR (what keeping that site float buys), then added in that order; once
    the budget is met, each chosen site is tried back in int8 (latest first, repeated until none can go) and
    stays int8 if the budget still holds. On the reference conv_small (512 calibration images, budget 97%) that takes 29 sites to 26, with the
    same val agreement (97.1% on 2,000 images). SQNR ranking beat ranking by agreement, KL or top-5 margin error
    (29 sites vs 32-50 for the same budget).
    """
    tog = SiteToggler(prepared)
    candidates = [s for s in tog.sites if s.kind in kinds]
    gains = []
    for site in candidates:
        tog.set_enabled(lambda n: n != site.name)
        gains.append((compare(tog.logits(x), float_logits).sqnr_db, site.name))
    gains.sort(reverse=True)
    kept_float: list[str] = []
    tog.set_enabled(lambda n: True)
    history = [compare(tog.logits(x), float_logits).top1_agreement]
    for _, name in gains[:max_sites]:
        if history[-1] >= target_agreement:
            break
        kept_float.append(name)
        tog.set_enabled(lambda n: n not in kept_float)
        history.append(compare(tog.logits(x), float_logits).top1_agreement)
    returned: list[str] = []
    changed = history[-1] >= target_agreement
    while changed:  # until every site left is needed (agreement is not monotone in the set, so re-check)
        changed = False
        for name in reversed(list(kept_float)):
            trial = [n for n in kept_float if n != name]
            tog.set_enabled(lambda n: n not in trial)
            agreement = compare(tog.logits(x), float_logits).top1_agreement
            if agreement >= target_agreement:
                kept_float, returned, changed = trial, returned + [name], True
                history.append(agreement)
    layers = {s.name: f"{s.layer} ({s.op} {s.kind})" for s in tog.sites}
    return {"float_sites": kept_float, "float_layers": [layers[n] for n in kept_float], "agreement_history": history,
            "returned_to_int8": len(returned)}


def given_fallback(prepared: torch.fx.GraphModule, x: np.ndarray, float_logits: np.ndarray,
                   layers: str) -> dict[str, Any]:
    """The recipe's `fallback.layers`: every activation site of the named modules (comma-separated), with the
    agreement before and after, in `choose_fallback`'s shape."""
    from ..errors import UserError

    tog = SiteToggler(prepared)
    wanted = [name.strip() for name in layers.split(",") if name.strip()]
    acts = [s for s in tog.sites if s.kind == "activation"]
    missing = [w for w in wanted if not any(s.layer == w for s in acts)]
    if missing:
        raise UserError(f"quantization.fallback.layers: '{missing[0]}' quantizes no activation of this model "
                        "(`mnv4-deploy debug` and `inspect --sensitivity` print the module paths)")
    chosen = [s.name for s in acts if s.layer in wanted]
    tog.set_enabled(lambda n: True)
    before = compare(tog.logits(x), float_logits).top1_agreement
    tog.set_enabled(lambda n: n not in chosen)
    after = compare(tog.logits(x), float_logits).top1_agreement
    layer_of = {s.name: f"{s.layer} ({s.op} {s.kind})" for s in acts}
    return {"float_sites": chosen, "float_layers": [layer_of[n] for n in chosen], "agreement_history": [before, after],
            "returned_to_int8": 0}


def fallback_record(chosen: dict[str, Any], budget: float, images: int, precision: str,
                    precision_here: str) -> dict[str, Any]:
    """What the manifest says of a fallback (quantization.fallback): the sites, the budget, the agreement path."""
    history = chosen["agreement_history"]
    return {"precision": precision, "precision_here": precision_here, "budget_agreement": budget,
            "judged_on_images": images, "sites": chosen["float_sites"], "layers": chosen["float_layers"],
            "agreement_before": history[0], "agreement_after": history[-1], "agreement_history": history,
            "returned_to_int8": chosen["returned_to_int8"]}


def fallback_line(info: dict[str, Any]) -> str:
    """One log line for a recipe fallback's choice (PTQ and QAT alike)."""
    return (f"fallback: {len(info['sites'])} activation(s) kept {info['precision']} (top-1 agreement on "
            f"{info['judged_on_images']} calibration images {100 * info['agreement_before']:.1f}% -> "
            f"{100 * info['agreement_after']:.1f}%, budget {100 * info['budget_agreement']:.1f}%)")
