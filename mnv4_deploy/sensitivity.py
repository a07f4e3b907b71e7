"""Per-layer quantization sensitivity, and keeping the most sensitive layers in float.

Every quantizer in the calibrated PT2E graph (an observer on a weight or an activation) is a "site".
Sensitivity = what happens to the logits when only that site is quantized (SQNR vs float, top-1 agreement).
To measure it cheaply, observers are swapped for switchable fake-quantizers with the calibrated
scale/zero point, so each site is toggled without re-converting the graph.

A float fallback removes the chosen sites' observers before conversion, so those tensors stay float in the
exported model (ONNX, OpenVINO, CoreML; TFLite with float I/O). Full-integer targets cannot take a fallback.
An int16 fallback widens the chosen observers to int16 instead (w8a16 for those tensors): convert_pt2e then
writes int16 quantize/dequantize pairs, which ONNX carries as int16 QDQ. The choice is the same for both, made
with the sites left float, since an int16 tensor is within 1/256 of an int8 one's error.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .verify import compare


@dataclass
class Site:
    """One quantizer in the graph: the observer module, what it quantizes, and where."""

    name: str  # observer module name in the prepared graph (activation_post_process_N)
    kind: str  # 'weight' or 'activation'
    layer: str  # module path in the float model (e.g. blocks.2.0.dw_mid.conv) or the op's name
    op: str  # the op whose input/output it quantizes


def find_sites(prepared: torch.fx.GraphModule) -> list[Site]:
    """Every observer (PTQ) or fake-quantizer (QAT) in the graph, in graph order."""
    modules = dict(prepared.named_modules())
    sites: dict[str, Site] = {}
    constant: dict[str, bool] = {}
    for node in prepared.graph.nodes:
        # QAT's conv+BN weights reach their quantizer through ops on parameters only (weight * BN scale).
        constant[node.name] = node.op == "get_attr" or (
            node.op in ("call_function", "call_module") and bool(node.all_input_nodes)
            and all(constant.get(a.name, False) for a in node.all_input_nodes)
            and not _is_observer(modules.get(node.target)))
        if node.op != "call_module" or not _is_observer(modules.get(node.target)) or node.target in sites:
            continue
        src = node.args[0]
        kind = "weight" if constant.get(src.name, False) else "activation"
        user = next(iter(node.users), None)
        described = src if kind == "activation" and src.op == "call_function" else user
        sites[node.target] = Site(node.target, kind, _layer_name(described), _op_name(described))
    return list(sites.values())


def _is_observer(module: Optional[nn.Module]) -> bool:
    """A PTQ observer, or a QAT fake-quantizer (which holds one)."""
    return module is not None and hasattr(module, "calculate_qparams") and (
        hasattr(module, "min_val") or hasattr(module, "activation_post_process"))


def _layer_name(node: Any) -> str:
    stack = getattr(node, "meta", {}).get("nn_module_stack") if node is not None else None
    if stack:
        return list(stack.values())[-1][0] or "model"
    return getattr(node, "name", "?")


def _op_name(node: Any) -> str:
    target = getattr(node, "target", None)
    return getattr(target, "__name__", str(target)).split(".")[0] if target is not None else "?"


class _SwitchableFakeQuant(nn.Module):
    """Fake-quantizes with a calibrated observer's qparams when enabled; identity otherwise."""

    def __init__(self, observer: nn.Module) -> None:
        super().__init__()
        scale, zero_point = observer.calculate_qparams()
        self.register_buffer("scale", scale.float().reshape(-1))
        self.register_buffer("zero_point", zero_point.int().reshape(-1))
        self.qmin, self.qmax = int(observer.quant_min), int(observer.quant_max)
        self.axis = int(getattr(observer, "ch_axis", 0))
        self.per_channel = self.scale.numel() > 1
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), self.qmin, self.qmax)


class SiteToggler:
    """A copy of the calibrated graph whose quantizers can be switched on and off one by one."""

    def __init__(self, prepared: torch.fx.GraphModule) -> None:
        self.model = copy.deepcopy(prepared)
        self.sites = find_sites(self.model)
        self.switches: dict[str, _SwitchableFakeQuant] = {}
        device = next(self.model.parameters()).device
        for site in self.sites:
            switch = _SwitchableFakeQuant(getattr(self.model, site.name)).to(device)
            setattr(self.model, site.name, switch)
            self.switches[site.name] = switch

    def set_enabled(self, enabled: Callable[[str], bool]) -> None:
        for name, switch in self.switches.items():
            switch.enabled = enabled(name)

    def logits(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return np.concatenate([self.model(torch.from_numpy(x[i:i + batch_size]).to(device)).cpu().numpy()
                                   for i in range(0, len(x), batch_size)])


def analyse(prepared: torch.fx.GraphModule, x: np.ndarray, float_logits: np.ndarray,
            progress: Optional[Callable] = None) -> dict[str, Any]:
    """Quantize one site at a time (all others float); also each site left float with all others int8."""
    tog = SiteToggler(prepared)
    tog.set_enabled(lambda n: True)
    full = compare(tog.logits(x), float_logits)
    rows = []
    it = progress(tog.sites, desc="sensitivity", unit="site") if progress else tog.sites
    for site in it:
        tog.set_enabled(lambda n: n == site.name)
        only = compare(tog.logits(x), float_logits)
        tog.set_enabled(lambda n: n != site.name)
        without = compare(tog.logits(x), float_logits)
        rows.append(dataclasses.asdict(site) | {
            "only_this_sqnr_db": only.sqnr_db, "only_this_agreement": only.top1_agreement,
            "all_but_this_agreement": without.top1_agreement, "all_but_this_sqnr_db": without.sqnr_db,
        })
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


def remove_sites(prepared: torch.fx.GraphModule, names: Sequence[str]) -> torch.fx.GraphModule:
    """A copy of the calibrated graph without the named observers: those tensors stay float after convert."""
    gm = copy.deepcopy(prepared)
    drop = set(names)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in drop:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for name in drop:  # gone from state_dict() too, as later graph rewrites would make them (QAT resume)
        if hasattr(gm, name):
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return gm


INT16_MIN, INT16_MAX = -(2 ** 15), 2 ** 15 - 1


def widen_sites(prepared: torch.fx.GraphModule, names: Sequence[str]) -> torch.fx.GraphModule:
    """A copy of the calibrated graph whose named observers produce int16 qparams (same calibrated range).

    The observed range is kept as calibrated for int8 (it may clip a little); only the grid is 256x finer.
    """
    gm = copy.deepcopy(prepared)
    for name in names:
        observer = getattr(gm, name)
        observer.dtype = torch.int16
        observer.quant_min, observer.quant_max = INT16_MIN, INT16_MAX
    return gm


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
