"""Quantizer sites of a calibrated PT2E graph: find them, toggle them, remove them, widen them to int16.

Every quantizer in the graph (a PTQ observer on a weight or an activation, or a QAT fake-quantizer) is a
"site". These are the low-level primitives the PTQ algorithms (mnv4_deploy/quantization/ptq), the quantizer
(pt2e.py, qat.py) and the sensitivity analysis (sensitivity.py) all build on; this module imports no
other mnv4_deploy module, so none of them can form an import cycle through it.

`SiteToggler` swaps observers for switchable fake-quantizers with the calibrated scale/zero point, so each
site can be turned on and off without re-converting the graph. `remove_sites` drops observers (those tensors
stay float after convert_pt2e); `widen_sites` turns them into int16 observers on the same calibrated range.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..load.images import model_input


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
    """The float model's module path of a node (what a user recognises), else the node's own name."""
    stack = getattr(node, "meta", {}).get("nn_module_stack") if node is not None else None
    if stack:
        return list(stack.values())[-1][0] or "model"
    return getattr(node, "name", "?")


def _op_name(node: Any) -> str:
    """The short op name (conv2d, add, ...) of a node's target, for tables and manifests."""
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
        # A weight site sees the same parameter on every forward: its fake-quantized copy is computed once
        # (most of a sensitivity sweep's time otherwise); keyed on the parameter's identity and version.
        self._weight_cache: Optional[tuple[int, int, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if isinstance(x, nn.Parameter) and not torch.is_grad_enabled():
            key = (id(x), x._version)
            if self._weight_cache is None or self._weight_cache[:2] != key:
                self._weight_cache = (*key, self._fake_quantize(x))
            return self._weight_cache[2]
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)
        from .fake_quant_fusion import quantize_dequantize  # bit for bit the fake-quantize kernel, faster

        return quantize_dequantize(x, float(self.scale), int(self.zero_point), self.qmin, self.qmax)


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
        """Quantize exactly the sites whose observer name `enabled` accepts; the others pass float."""
        for name, switch in self.switches.items():
            switch.enabled = enabled(name)

    def logits(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """The graph's logits with the current switches, in batches (images may not fit in one)."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return np.concatenate([self.model(model_input(x[i:i + batch_size]).to(device)).cpu().numpy()
                                   for i in range(0, len(x), batch_size)])


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
