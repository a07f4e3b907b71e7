"""Qualcomm HTP's integer arithmetic, so the QNN target's PyTorch simulation computes what the NPU computes.

HTP does not round `acc * s_in * s_w / s_out` exactly. Probing onnxruntime-qnn's HTP backend with single QDQ
ops over every accumulator value (bench/bench_htp_requant.py) gives these rules, which reproduce its 8-bit
outputs bit for bit:

- Convs and fully connected layers (`requantize`, HTP v73+): M = s_in * s_w[c] / s_out per output channel; k
  is the shift that puts 2^k * M in [1/16, 1/8). The int32 accumulator (bias included) is shifted right by k
  (floor) and the middle of the dropped range added back (+0.5); that is multiplied by 2^k * M kept to 2^-15
  (a 12-bit multiplier), the zero point added, and the result rounded half up and saturated. An output is off
  the exact one by up to 1/16 of a step.
- Strided depthwise convs run another kernel (`requantize_strided_depthwise`, HTP v68 to v79): the output zero
  point is folded into the accumulator as round(z_out / M) and the sum multiplied by M kept to 16 significant
  bits (a Q15 multiplier), rounded half up; the bias is round(bias / scale) computed in float32.
- The float model input is quantized by HTP itself: x / s rounded to float16, then half away from zero.
- A global average pool is the exact mean rounded half up.

Two things we could not reduce to a formula are read from the emulator by probing the op alone on synthetic
inputs (`HtpProbes`, implemented by the QNN target): the int32 bias HTP compiles for each other conv channel (up
to about 1.5 accumulator units off round(bias / scale)), and the output table of each 8-bit Add. Not modelled
exactly: a 12-bit multiplier within 5e-4 of a rounding tie (about 1 channel in 1,000), which HTP rounds one way
or the other depending on more than the scales.

`htp_graph` rewrites a converted PT2E graph so each op feeding an 8-bit activation quantizer computes that, in
integer arithmetic (float64 holds every int32 sum exactly); the quantizer nodes stay, so the tensor-by-tensor
check and every caller see the same graph.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

MULTIPLIER_BITS = 15  # 2^k * M is kept to 2^-15: 12 significant bits in [1/16, 1/8)
MULTIPLIER_TIE = 5e-4  # 2^k * M * 2^15 this close to a half: which way HTP rounds it depends on more than M


def _shift_step(multiplier: Any) -> Any:
    """2^k with 2^k * M in [1/16, 1/8)."""
    xp = torch if isinstance(multiplier, torch.Tensor) else np
    return 2.0 ** xp.floor(xp.log2(1.0 / (8.0 * multiplier)))


def exact_units(multiplier: Any) -> Any:
    """2^k * M * 2^15 before rounding: the multiplier HTP keeps is this rounded to an integer."""
    return _shift_step(multiplier) * multiplier * 2.0 ** MULTIPLIER_BITS


def multiplier_units(multiplier: Any) -> Any:
    """HTP's 12-bit multiplier in units of 2^-15: `exact_units` rounded half up after a first rounding to 2^-10
    of a unit. Within MULTIPLIER_TIE of a half HTP's choice is not a function of M alone (a conv probed alone
    and the same scales inside a model can round differently); this first rounding is what reproduced every
    such channel of the reference conv_small."""
    floor = torch.floor if isinstance(multiplier, torch.Tensor) else np.floor
    return floor(floor(exact_units(multiplier) * 2.0 ** 10 + 0.5) / 2.0 ** 10 + 0.5)


def ambiguous_multipliers(multiplier: np.ndarray) -> np.ndarray:
    """Channels whose multiplier sits so close to a rounding tie that HTP may round it either way."""
    x = exact_units(np.asarray(multiplier, np.float64))
    return np.abs(x - np.floor(x) - 0.5) < MULTIPLIER_TIE


def requantize(acc: Any, multiplier: Any, zero_point: int, qmin: int, qmax: int, units: Any = None) -> Any:
    """HTP's integer output for int32 accumulators `acc` (integer valued float64, bias included) and exact
    per-channel scale ratios `multiplier` (broadcastable to acc), as float64 integers on [qmin, qmax];
    `units`: the multipliers in units of 2^-15 (default `multiplier_units`). Takes torch tensors or numpy arrays."""
    xp = torch if isinstance(acc, torch.Tensor) else np
    step = _shift_step(multiplier)
    units = multiplier_units(multiplier) if units is None else units
    value = (xp.floor(acc / step) + 0.5) * units / 2.0 ** MULTIPLIER_BITS + zero_point
    return xp.clip(xp.floor(value + 0.5), qmin, qmax)


def requantize_strided_depthwise(acc: Any, multiplier: Any, zero_point: int, qmin: int, qmax: int) -> Any:
    """HTP's integer output of a strided depthwise conv (same arguments as `requantize`): round(z_out / M) is
    added to the accumulator and the sum multiplied by M with a 15-bit mantissa in (1/2, 1] (a 16-bit signed
    Q15 multiplier), then rounded half up. So the zero point carries the multiplier's rounding too, and an
    output is off the exact one by up to (|acc * M| + z_out) * 2^-16 plus M / 2."""
    xp = torch if isinstance(acc, torch.Tensor) else np
    step = 2.0 ** xp.floor(xp.log2(1.0 / multiplier))  # step * M in (1/2, 1]
    kept = xp.round(step * multiplier * 2.0 ** 15) / (step * 2.0 ** 15)
    value = (acc + xp.round(zero_point / multiplier)) * kept
    return xp.clip(xp.floor(value + 0.5), qmin, qmax)


class HtpProbes(Protocol):
    """What only the runtime can tell (implemented by mnv4_deploy/targets/qnn/target.py with the HTP emulator)."""

    def add_table(self, s_a: float, z_a: int, s_b: float, z_b: int, s_out: float, z_out: int) -> np.ndarray:
        """A uint8 Add's output for every input pair: 256x256, indexed [b, a]."""

    def conv_biases(self, s_in: float, z_in: int, w_scales: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The int32 bias HTP compiles for each output channel of a conv with uint8 input (s_in, z_in)."""


def _integer_layer(x_q: torch.Tensor, w_q: torch.Tensor, bias_q: torch.Tensor, kind: str,
                   layer_args: tuple[Any, ...]) -> torch.Tensor:
    """The int32 accumulator of a conv or linear layer on integer inputs (zero point removed), exactly (float64)."""
    w = w_q.to(torch.float64)
    if kind == "conv":
        return torch.nn.functional.conv2d(x_q, w, None, *layer_args) + bias_q.view(1, -1, 1, 1)
    return torch.nn.functional.linear(x_q, w) + bias_q


def _htp_layer(x: torch.Tensor, s_in: float, w_q: torch.Tensor, bias_q: torch.Tensor, multiplier: torch.Tensor,
               s_out: float, z_out: int, qmin: int, qmax: int, kind: str, layer_args: tuple[Any, ...],
               strided_depthwise: bool = False, to_uint8: int = 128) -> torch.Tensor:
    """A conv/linear (+ReLU: `qmin` raised to the zero point) as HTP computes it, returned dequantized so the
    graph's own quantizer gives HTP's integers back. `x` is the dequantized input, on its grid; `to_uint8` moves
    the graph's 8-bit grid onto HTP's uint8 one."""
    x_q = torch.round(x.to(torch.float64) / s_in)  # q - z_in, exactly
    acc = _integer_layer(x_q, w_q, bias_q, kind, layer_args)
    multiplier = multiplier.view((1, -1, 1, 1) if kind == "conv" else (1, -1))
    if strided_depthwise:  # its rule sees the zero point HTP runs (uint8), not the graph's int8 one
        q = requantize_strided_depthwise(acc, multiplier, z_out + to_uint8, qmin + to_uint8, qmax + to_uint8) - to_uint8
    else:
        q = requantize(acc, multiplier, z_out, qmin, qmax)
    return ((q - z_out) * s_out).to(torch.float32)


def _htp_input(x: torch.Tensor, s: float, z: int, qmin: int, qmax: int) -> torch.Tensor:
    """The float input quantized as HTP does it (x / s rounded to float16, then half away from zero), returned on
    the grid so the graph's own quantizer gives HTP's integers back."""
    v = x.to(torch.float64) / s
    # to the float16 grid, rounding once (torch's float64 -> float16 cast goes through float32: twice)
    ulp = 2.0 ** (torch.clamp(torch.floor(torch.log2(torch.abs(v))), min=-14) - 10)
    v = torch.round(v / ulp) * ulp
    q = torch.clamp(torch.sign(v) * torch.floor(torch.abs(v) + 0.5) + z, qmin, qmax)
    return ((q - z) * s).to(torch.float32)


def _htp_mean(x: torch.Tensor, s_in: float, s_out: float, z_out: int, qmin: int, qmax: int) -> torch.Tensor:
    """Global average pool as HTP computes it: the exact mean of the integers, rounded half up (PyTorch's
    quantizer rounds half to even, and a mean over few positions often lands on a tie)."""
    x_q = torch.round(x.to(torch.float64) / s_in)  # q - z_in, exactly
    value = x_q.mean(dim=(2, 3), keepdim=True) * (s_in / s_out) + z_out
    q = torch.clamp(torch.floor(value + 0.5), qmin, qmax)
    return ((q - z_out) * s_out).to(torch.float32)


def _htp_add(a: torch.Tensor, s_a: float, z_a: int, b: torch.Tensor, s_b: float, z_b: int, s_out: float,
             z_out: int, table: torch.Tensor) -> torch.Tensor:
    """An 8-bit Add through HTP's own output table (int8 graph values, +128 on the uint8 grid HTP runs)."""
    q_a = (torch.round(a.to(torch.float64) / s_a) + z_a + 128).long().clamp(0, 255)
    q_b = (torch.round(b.to(torch.float64) / s_b) + z_b + 128).long().clamp(0, 255)
    q_a, q_b = torch.broadcast_tensors(q_a, q_b)
    q = table[q_b, q_a].to(torch.float64) - 128
    return ((q - z_out) * s_out).to(torch.float32)


def _const(gm: torch.fx.GraphModule, node: Any) -> Any:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value: Any = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    return node


def _strided_depthwise(conv: torch.fx.Node) -> bool:
    args = list(conv.args) + [None] * (7 - len(conv.args))
    stride, groups = args[3] or [1, 1], args[6] or 1
    return int(groups) > 1 and any(int(s) > 1 for s in stride)


def _is_8bit_dequantize(node: Any) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target == torch.ops.quantized_decomposed.dequantize_per_tensor.default
            and int(node.args[4]) - int(node.args[3]) == 255)


class _Rewriter:
    """One pass over a converted graph, replacing the float op in front of each 8-bit quantizer."""

    def __init__(self, gm: torch.fx.GraphModule, probes: Optional[HtpProbes]) -> None:
        self.gm, self.probes = gm, probes
        self.counts = {"input": 0, "conv/linear": 0, "global pool": 0, "add": 0}

    def buffer(self, kind: str, value: torch.Tensor) -> torch.fx.Node:
        name = f"_htp_{kind}_{sum(self.counts.values())}"
        self.gm.register_buffer(name, value)
        return self.gm.graph.get_attr(name)

    def replace(self, q: torch.fx.Node, src: torch.fx.Node, fn: Callable[..., torch.Tensor], args: tuple,
                kind: str, dead: tuple[torch.fx.Node, ...] = ()) -> None:
        with self.gm.graph.inserting_before(q):
            node = self.gm.graph.call_function(fn, tuple(a(self) if callable(a) else a for a in args))
        node.meta = dict(src.meta)
        old = q.args[0]
        q.replace_input_with(old, node)
        for n in (old, src, *dead):  # the float path it replaces (an in-place ReLU counts as impure)
            if n in self.gm.graph.nodes and not n.users:
                self.gm.graph.erase_node(n)
        self.counts[kind] += 1

    def graph_input(self, q: torch.fx.Node, s_out: float, z_out: int, qmin: int, qmax: int) -> bool:
        x = q.args[0]
        if not (isinstance(x, torch.fx.Node) and x.op == "placeholder"):
            return False
        with self.gm.graph.inserting_before(q):
            node = self.gm.graph.call_function(_htp_input, (x, s_out, z_out, qmin, qmax))
        node.meta = dict(x.meta)
        q.replace_input_with(x, node)
        self.counts["input"] += 1
        return True

    def pool(self, q: torch.fx.Node, src: torch.fx.Node, s_out: float, z_out: int, qmin: int, qmax: int) -> bool:
        if not (src.target == torch.ops.aten.adaptive_avg_pool2d.default and list(src.args[1]) == [1, 1]
                and _is_8bit_dequantize(src.args[0])):
            return False
        x = src.args[0]
        self.replace(q, src, _htp_mean, (x, float(x.args[1]), s_out, z_out, qmin, qmax), "global pool")
        return True

    def add(self, q: torch.fx.Node, src: torch.fx.Node, s_out: float, z_out: int) -> bool:
        if not (self.probes is not None and src.target == torch.ops.aten.add.Tensor and len(src.args) == 2
                and all(_is_8bit_dequantize(a) for a in src.args)):
            return False
        a, b = src.args
        qa, qb = (float(a.args[1]), int(a.args[2])), (float(b.args[1]), int(b.args[2]))
        table = torch.as_tensor(np.asarray(self.probes.add_table(qa[0], qa[1] + 128, qb[0], qb[1] + 128, s_out,
                                                                 z_out + 128), np.int16))
        self.replace(q, src, _htp_add, (a, *qa, b, *qb, s_out, z_out, lambda r: r.buffer("add_table", table)), "add")
        return True

    def layer(self, q: torch.fx.Node, src: torch.fx.Node, s_out: float, z_out: int, qmin: int, qmax: int) -> bool:
        layers = {torch.ops.aten.conv2d.default: "conv", torch.ops.aten.linear.default: "linear"}
        relu = src.target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default) and len(src.users) == 1
        layer = src.args[0] if relu else src
        if not (isinstance(layer, torch.fx.Node) and layer.op == "call_function" and layer.target in layers
                and len(layer.users) == 1):
            return False
        x, w_dq = layer.args[0], layer.args[1]
        if not (_is_8bit_dequantize(x) and w_dq.op == "call_function" and int(w_dq.args[3]) == 0
                and w_dq.target == torch.ops.quantized_decomposed.dequantize_per_channel.default):
            return False
        w_q, w_scales = _const(self.gm, w_dq.args[0]), _const(self.gm, w_dq.args[1])
        if not isinstance(w_q, torch.Tensor) or bool(torch.any(_const(self.gm, w_dq.args[2]) != 0)):
            return False
        kind = layers[layer.target]
        s_in, z_in = float(x.args[1]), int(x.args[2])
        bias = _const(self.gm, layer.args[2]) if len(layer.args) > 2 else None
        bias = torch.zeros(len(w_scales)) if bias is None else bias.detach()
        scales = w_scales.to(torch.float64) * s_in
        multiplier = scales / s_out
        strided_depthwise = kind == "conv" and _strided_depthwise(layer)
        if strided_depthwise:  # this kernel compiles round(bias / scale) computed in float32, ties to even
            scales32 = w_scales.to(torch.float32) * torch.tensor(s_in, dtype=torch.float32)
            bias_q = torch.round(bias.to(torch.float32) / scales32).to(torch.float64)
        elif self.probes is not None:
            bias_q = torch.as_tensor(self.probes.conv_biases(s_in, z_in + 128, w_scales.numpy(), bias.numpy()),
                                     dtype=torch.float64)
        else:
            bias_q = torch.round(bias.to(torch.float64) / scales)
        args = (x, s_in, w_dq.args[0], lambda r: r.buffer("bias", bias_q),
                lambda r: r.buffer("multiplier", multiplier), s_out, z_out, max(qmin, z_out) if relu else qmin,
                qmax, kind, tuple(layer.args[3:]) if kind == "conv" else (), strided_depthwise,
                -int(q.args[3]))
        self.replace(q, src, _htp_layer, args, "conv/linear", dead=(layer, w_dq) if relu else (w_dq,))
        return True


def htp_graph(gm: torch.fx.GraphModule, probes: Optional[HtpProbes] = None) -> torch.fx.GraphModule:
    """Rewrite (in place) a converted PT2E graph (weights folded) so every 8-bit conv/linear [+ReLU] and global
    average pool computes what HTP computes; with `probes`, conv biases and residual Adds as HTP compiles them
    too. 16-bit activations and other ops keep the exact simulation. Returns `gm`."""
    rewriter = _Rewriter(gm, probes)
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target != torch.ops.quantized_decomposed.quantize_per_tensor.default:
            continue
        s_out, z_out, qmin, qmax = float(q.args[1]), int(q.args[2]), int(q.args[3]), int(q.args[4])
        src = q.args[0]
        if qmax - qmin != 255 or not isinstance(src, torch.fx.Node):
            continue  # 16-bit activations: HTP's 16-bit requantization is not modelled
        if rewriter.graph_input(q, s_out, z_out, qmin, qmax) or src.op != "call_function" or len(src.users) != 1:
            continue
        rewriter.pool(q, src, s_out, z_out, qmin, qmax) or rewriter.add(q, src, s_out, z_out) \
            or rewriter.layer(q, src, s_out, z_out, qmin, qmax)
    gm.recompile()
    log.debug("HTP arithmetic modelled at %s", rewriter.counts)
    gm.meta["htp_semantics"] = dict(rewriter.counts)
    return gm
