"""Roofline latency estimates for hardware we cannot run (the MNv4 paper's model, section 3).

Per layer: cost = max(MACs / PeakMACs, bytes / PeakMemBW), summed over layers. Only the fitted ridge points
RP = PeakMACs / PeakMemBW are published, not absolute peaks, so costs are reported in *normalised* units:
PeakMemBW := 1 byte per unit time, PeakMACs := RP MACs per unit time. One unit is therefore "the time the
device needs to move one byte at peak bandwidth"; we print megabyte-units (MB-eq). Absolute times would only
need one number per device (its bandwidth), which we do not know. Ratios between precisions or models on one
device are meaningful; comparisons between devices are not.

Layer shapes come from running the prepared float model once on a zero image of the artifact's input size
under a TorchDispatchMode that records every convolution and matrix multiply (aten level: conv, mm, addmm,
bmm, SDPA) with its real operand shapes. These are the same layers and shapes torch.export traces into every
target's graph (BatchNorm is folded into the convolutions by every exporter, so it is not counted; element-wise
ops such as activations, adds and pooling are memory traffic the paper's model also leaves out).
Bytes = weights (+bias) + input activations + output activations at the artifact's precision
(fp32: 4 bytes, fp16 and bf16: 2, int8: 1 with int32 bias).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

# Fitted ridge points from the MNv4 paper (MACs per byte).
DEVICES: dict[str, tuple[str, float]] = {
    "pixel6_cpu": ("Pixel 6 CPU", 31.2),
    "s23_cpu": ("Samsung S23 CPU", 39.7),
    "pixel4_dsp": ("Pixel 4 Hexagon DSP", 347.3),
    "pixel8_edgetpu": ("Pixel 8 EdgeTPU", 433.8),
}

# (weight, activation, bias) bytes per element.
ELEMENT_BYTES: dict[str, tuple[int, int, int]] = {"fp32": (4, 4, 4), "fp16": (2, 2, 2), "bf16": (2, 2, 2), "int8": (1, 1, 4)}

OP_TYPES = ("full conv", "pointwise conv", "depthwise conv", "fully connected", "attention matmul")

METHOD = ("roofline model (MNv4 paper): sum over layers of max(MACs/PeakMACs, bytes/PeakMemBW) with the fitted "
          "ridge point RP=PeakMACs/PeakMemBW and PeakMemBW normalised to 1 byte/unit; layer shapes recorded from "
          "the model's conv/matmul ops (aten level) at the artifact's input size; bytes = weights + input and "
          "output activations at the artifact's precision; BatchNorm folded, element-wise ops not counted")
UNIT = "MB-eq (time to move 1e6 bytes at the device's peak memory bandwidth; normalised, not seconds)"


@dataclass
class Layer:
    """One compute op with its real shapes: what the roofline needs."""

    name: str  # the module that ran it
    op_type: str  # one of OP_TYPES
    macs: int
    weight_elems: int
    bias_elems: int
    act_elems: int  # input + output activation elements
    shape: str  # human-readable, e.g. 'conv 3x3 s2 3->32 @32x32'

    def bytes(self, precision: str) -> int:
        w, a, b = ELEMENT_BYTES[precision]
        return self.weight_elems * w + self.bias_elems * b + self.act_elems * a

    def cost(self, precision: str, ridge_point: float) -> float:
        return max(self.macs / ridge_point, float(self.bytes(precision)))


def _numel(t: Any) -> int:
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def record_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
    """Run `model` once on zeros of `input_shape` and record every conv / matmul with its shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[tuple[str, nn.Module]] = [("", model)]
    layers: list[Layer] = []
    aten = torch.ops.aten

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
            out = func(*args, **(kwargs or {}))
            name, module = stack[-1]
            packet = getattr(func, "overloadpacket", None)
            if packet is aten.convolution:
                x, w, b = args[0], args[1], args[2]
                groups = int(args[8])
                kh, kw = int(w.shape[2]), int(w.shape[3])
                cin, cout = int(x.shape[1]), int(w.shape[0])
                macs = out.numel() * int(w.shape[1]) * kh * kw
                if groups > 1 and groups == cin:
                    kind = "depthwise conv"
                elif kh == kw == 1:
                    # a 1x1 conv on a pooled 1x1 map is a fully connected layer (MNv4's conv_head)
                    kind = "fully connected" if out.shape[-1] * out.shape[-2] == 1 else "pointwise conv"
                else:
                    kind = "full conv"
                stride = args[3][0] if args[3] else 1
                desc = f"conv {kh}x{kw} s{stride} g{groups} {cin}->{cout} @{out.shape[-2]}x{out.shape[-1]}"
                layers.append(Layer(name, kind, int(macs), _numel(w), _numel(b), _numel(x) + _numel(out), desc))
            elif packet in (aten.addmm, aten.mm, aten.bmm):
                a, bm = (args[1], args[2]) if packet is aten.addmm else (args[0], args[1])
                bias = args[0] if packet is aten.addmm else None
                macs = out.numel() * int(a.shape[-1])
                if isinstance(module, nn.Linear):
                    layers.append(Layer(name, "fully connected", int(macs), _numel(bm), _numel(bias),
                                        _numel(a) + _numel(out), f"linear {a.shape[-1]}->{out.shape[-1]}"))
                else:  # activation x activation (attention scores, attention x values)
                    layers.append(Layer(name, "attention matmul", int(macs), 0, 0,
                                        _numel(a) + _numel(bm) + _numel(out),
                                        f"matmul {tuple(a.shape)}x{tuple(bm.shape)}"))
            elif "scaled_dot_product" in str(packet):
                q, k, v = args[0], args[1], args[2]
                macs = q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
                layers.append(Layer(name, "attention matmul", int(macs), 0, 0,
                                    _numel(q) + _numel(k) + _numel(v) + _numel(out[0] if isinstance(out, tuple) else out),
                                    f"sdpa q{tuple(q.shape)} k{tuple(k.shape)}"))
            return out

    def push(mod_name: str):
        def pre(module: nn.Module, _inputs: Any) -> None:
            stack.append((mod_name, module))
        return pre

    def pop(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        stack.pop()

    handles = []
    for mod_name, module in model.named_modules():
        if mod_name:
            handles.append(module.register_forward_pre_hook(push(mod_name)))
            handles.append(module.register_forward_hook(pop))
    try:
        with torch.no_grad(), Recorder():
            model(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
    return layers


def estimate(layers: list[Layer], precisions: list[str]) -> dict[str, Any]:
    """The report's `roofline` section: totals per precision and device, op-type breakdown, per-layer costs."""
    devices = [{"key": k, "name": n, "ridge_point": rp, "unit": "MACs/byte"} for k, (n, rp) in DEVICES.items()]
    per_precision: dict[str, Any] = {}
    for precision in precisions:
        if precision not in ELEMENT_BYTES:
            continue
        totals, breakdown, bound = {}, {}, {}
        for key, (_, rp) in DEVICES.items():
            costs = [layer.cost(precision, rp) for layer in layers]
            total = sum(costs)
            totals[key] = round(total / 1e6, 6)
            shares = {t: 0.0 for t in OP_TYPES}
            for layer, c in zip(layers, costs):
                shares[layer.op_type] += c
            breakdown[key] = {t: round(v / total, 6) if total else 0.0 for t, v in shares.items() if v or t in OP_TYPES[:4]}
            bound[key] = sum(1 for layer in layers if layer.macs / rp < layer.bytes(precision))
        per_precision[precision] = {
            "estimated_cost": {"value": totals, "unit": UNIT, "method": "estimated"},
            "op_type_share": {"value": breakdown, "unit": "fraction of estimated cost", "method": "estimated"},
            "memory_bound_layers": {"value": bound, "unit": "layers", "method": "estimated"},
            "bytes": {"value": sum(layer.bytes(precision) for layer in layers), "unit": "bytes", "method": "estimated"},
            "layer_cost": {
                "value": {key: [round(layer.cost(precision, rp) / 1e6, 6) for layer in layers]
                          for key, (_, rp) in DEVICES.items()},
                "unit": UNIT, "method": "estimated",
            },
        }
    base = per_precision.get("fp32")
    for precision, entry in per_precision.items():
        if base:
            entry["relative_to_fp32"] = {
                "value": {k: round(v / base["estimated_cost"]["value"][k], 4)
                          for k, v in entry["estimated_cost"]["value"].items()},
                "unit": "ratio (estimated cost / fp32 estimated cost on the same device)", "method": "estimated"}
    return {
        "method": METHOD,
        "devices": devices,
        "macs": {"value": sum(layer.macs for layer in layers), "unit": "MACs", "method": "counted"},
        "layers": [asdict(layer) for layer in layers],
        "precisions": per_precision,
    }
