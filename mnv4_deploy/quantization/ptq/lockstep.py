"""Shared machinery for the graph-level PTQ algorithms: run the calibrated PT2E graph float and fake-quantized
side by side, node by node, and write results back into the graph that convert_pt2e will see.

`lockstep` executes the FX graph twice per node (all quantizers off, then on) in one topological pass. A hook
called at each conv/linear node sees that layer's float output and its fake-quantized input and output, and
may change the layer (bias, weights) and return a new quantized output: the layers after it then see the
corrected values, so corrections are sequential (each layer compensates the error of the ones before it)
at the cost of a single pass over the calibration images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx

from ..quantizer_sites import SiteToggler

LAYER_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


@dataclass
class Layer:
    """A conv/linear node of the prepared graph, with its quantized weight and float bias attributes."""

    node: fx.Node
    weight_attr: str  # get_attr target of the float weight (what convert_pt2e quantizes)
    weight_quantizer: Optional[str]  # observer/switch module name on the weight, None if the weight stays float
    bias_attr: Optional[str]

    @property
    def name(self) -> str:
        stack = self.node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else self.node.name


def layers(gm: fx.GraphModule) -> list[Layer]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LAYER_OPS or len(node.args) < 2:
            continue
        w = node.args[1]
        quantizer = None
        if isinstance(w, fx.Node) and w.op == "call_module":
            quantizer, w = w.target, w.args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
        out.append(Layer(node, w.target, quantizer, bias))
    return out


def get_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@torch.no_grad()
def set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    get_attr(gm, target).copy_(value)


Hook = Callable[[Layer, torch.Tensor, torch.Tensor, tuple, "LockstepContext"], Optional[torch.Tensor]]


@dataclass
class LockstepContext:
    toggler: SiteToggler

    def quantized_weight(self, layer: Layer) -> torch.Tensor:
        w = get_attr(self.toggler.model, layer.weight_attr)
        return self.switch(layer.weight_quantizer)(w) if layer.weight_quantizer else w

    def switch(self, name: str) -> torch.nn.Module:
        return self.toggler.switches[name]

    def run_layer(self, layer: Layer, args_q: tuple) -> torch.Tensor:
        """The layer's quantized output for its (quantized) input, with the current weights and bias."""
        args = list(args_q)
        args[1] = self.quantized_weight(layer)
        if layer.bias_attr:
            args[2] = get_attr(self.toggler.model, layer.bias_attr)
        return layer.node.target(*args)


def lockstep(toggler: SiteToggler, x: torch.Tensor, hook: Hook, reference: Optional[SiteToggler] = None) -> None:
    """Run the graph float and fake-quantized together; call `hook(layer, float_out, quant_out, quant_args, ctx)`
    at each conv/linear; a tensor it returns replaces the quantized output.

    The float pass runs `reference` (a copy of the calibrated graph taken before any algorithm changed weights
    or biases) with its quantizers off: once AdaRound or bias correction has edited the graph, its own
    quantizers-off pass is no longer the float model.
    """
    gm = toggler.model
    ref = reference if reference is not None else toggler
    ref_nodes = {n.name: n for n in ref.model.graph.nodes}
    by_node = {l.node: l for l in layers(gm)}
    ctx = LockstepContext(toggler)
    last_use: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            last_use[inp.name] = node
    env_f: dict[str, Any] = {}
    env_q: dict[str, Any] = {}

    def run(node: fx.Node, env: dict, tog: SiteToggler, quant: bool) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "get_attr":
            return get_attr(tog.model, node.target)
        if node.op == "call_module":
            if node.target in tog.switches:
                tog.switches[node.target].enabled = quant
            return get_attr(tog.model, node.target)(*args, **kwargs)
        if node.op == "call_function":
            if node.target in (torch.ops.aten.relu_.default,):  # no in-place ops on values the other pass shares
                return torch.relu(*args)
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise NotImplementedError(node.op)

    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env_f[node.name] = env_q[node.name] = x
                continue
            if node.op == "output":
                break
            env_f[node.name] = run(ref_nodes[node.name], env_f, ref, False)
            env_q[node.name] = run(node, env_q, toggler, True)
            layer = by_node.get(node)
            if layer is not None:
                args_q = fx.node.map_arg(node.args, lambda n: env_q[n.name])
                new = hook(layer, env_f[node.name], env_q[node.name], tuple(args_q), ctx)
                if new is not None:
                    env_q[node.name] = new
            for inp in node.all_input_nodes:
                if last_use.get(inp.name) is node:
                    env_f.pop(inp.name, None)
                    env_q.pop(inp.name, None)
    toggler.set_enabled(lambda n: True)
    ref.set_enabled(lambda n: True)
