"""Per quantized tensor, in graph order: the runtime against its simulation, against float, locally and
accumulated; the first layer where a runtime leaves its simulation; where two runtimes part.

The pairing of runtime tensors with PyTorch quantizers, the LSB statistics and the local/accumulated
comparison are the convert-time tensor-by-tensor check's own (`tensorwise.check(..., keep=True)`); this module
adds what it does not compute:

- float: every activation quantizer's position in the *float* model, read from the same PT2E graph converted
  without weight folding, with every quantize/dequantize an identity (`FloatGraph`): the float model the
  quantizer calibrated (after the recipe's float-side steps: equalization, bias correction), tensor for tensor
  in the simulation's order. Runtime against float: SQNR (dB) and cosine over all elements of all images.
- `alone_sqnr_db`: that float tensor quantized with the simulation's scale and zero point, against itself:
  what quantizing this one tensor costs on float inputs (rounding and clipping), independent of depth.
- `differ`: share of elements whose runtime value is not the simulation's (more than half a step apart).
- divergence: a layer leaves its simulation when tensorwise flags it (local error beyond 1 LSB on more than 1%
  of elements, other scale/zero point, written and read with different parameters), when its quantizer has no
  runtime counterpart (dropped), or when the runtime holds it only with its last two axes swapped where the
  shape also allowed the runtime's usual layout (a transposed layout).

Images are processed in chunks (the tensors of 8 images at 224x224 already take hundreds of MB); statistics
are accumulated over chunks.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from torch import nn

from ..verify import tensorwise

FRAC_REASON = "of elements > 1 LSB from PyTorch"  # tensorwise's local-error reason (recomputed over all chunks)


def chunk_size(height: int, width: int) -> int:
    """Images per chunk: 8 at 224x224, more at smaller sizes."""
    return int(max(1, min(64, 8 * (224 * 224) // max(1, height * width))))


# ----------------------------------------------------------------------------- the float model, position by position
class FloatGraph:
    """The converted PT2E graph, unfolded, with every quantize/dequantize an identity (the float model), run with
    each activation quantizer's input recorded; values can be injected at any quantizer position (its
    dequantize returns them), which the one-image trace uses to run the tail of the network in float."""

    def __init__(self, quantized: Any) -> None:
        import torch

        self.gm = quantized.converted(fold_weights=False)
        ops = torch.ops.quantized_decomposed
        self.quantize = {o for name in ("quantize_per_tensor", "quantize_per_channel")
                         if hasattr(ops, name) for o in _overloads(getattr(ops, name))}
        self.dequantize = {o for name in ("dequantize_per_tensor", "dequantize_per_channel")
                           if hasattr(ops, name) for o in _overloads(getattr(ops, name))}
        per_tensor = set(tensorwise._quant_targets())
        self.positions: list[str] = []  # activation quantizer node names, in execution order
        self.modules: list[str] = []
        self.qparams: dict[int, tuple[float, int, int, int]] = {}  # (scale, zero point, qmin, qmax) where literal
        for n in self.gm.graph.nodes:
            if n.op == "call_function" and n.target in per_tensor and not _constant(n.args[0]):
                args = n.args[1:5]
                if len(args) == 4 and all(isinstance(a, (int, float)) for a in args):
                    self.qparams[len(self.positions)] = (float(args[0]), int(args[1]), int(args[2]), int(args[3]))
                self.positions.append(n.name)
                self.modules.append(tensorwise._module_of(n))
        self.index = {name: i for i, name in enumerate(self.positions)}

        self.taps = self._tapped()

    def _tapped(self) -> list[Any]:
        """The graph rewritten once: weight quantize/dequantize pairs removed, each activation's pair replaced by a
        `_Tap` module (records its input, or returns injected values), so runs are plain forward calls."""
        gm = self.gm
        taps = []
        for pos, name in enumerate(self.positions):
            tap = _Tap(pos)
            gm.add_submodule(f"_debug_tap_{pos}", tap)
            taps.append(tap)
        nodes = {n.name: n for n in gm.graph.nodes}
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or n.target not in self.dequantize:
                continue
            src = n.args[0]
            pos = self.index.get(getattr(src, "name", None))
            if pos is None:
                n.replace_all_uses_with(src)
                gm.graph.erase_node(n)
                continue
            with gm.graph.inserting_after(n):
                tapped = gm.graph.call_module(f"_debug_tap_{pos}", (src.args[0],))
            n.replace_all_uses_with(tapped)
            gm.graph.erase_node(n)
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target in self.quantize:
                n.replace_all_uses_with(n.args[0])
                gm.graph.erase_node(n)
        del nodes
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return taps

    def run(self, x: np.ndarray, inject: Optional[dict[int, np.ndarray]] = None,
            record: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits, float input of every activation quantizer); `inject`: {position: value (PyTorch layout)}."""
        return self._forward(x, inject or {}, record, prefix=False)

    def prefix_logits(self, x1: np.ndarray, values: dict[int, np.ndarray]) -> np.ndarray:
        """Logits of one image with positions < k taking `values` and the rest float, for every k = 0..N, in one
        batch of N + 1 (row k: int8 through position k - 1)."""
        n = len(self.positions)
        x = np.repeat(np.asarray(x1[:1], np.float32), n + 1, axis=0)
        logits, _ = self._forward(x, values, record=False, prefix=True)
        return logits

    def _forward(self, x: np.ndarray, inject: dict[int, np.ndarray], record: bool,
                 prefix: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        from ..load.images import model_input

        for tap in self.taps:
            tap.set(inject.get(tap.pos), record, prefix)
        try:
            with torch.no_grad():
                out = self.gm(model_input(x))
        finally:
            recorded = [tap.seen for tap in self.taps]
            for tap in self.taps:
                tap.set(None, False, False)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.numpy(), [r for r in recorded if r is not None] if record else []


class _Tap(nn.Module):
    """One activation quantizer's place in the float graph."""

    def __init__(self, pos: int) -> None:
        super().__init__()
        self.pos = pos
        self.value: Any = None
        self.record = False
        self.prefix = False
        self.seen: Optional[np.ndarray] = None

    def set(self, value: Optional[np.ndarray], record: bool, prefix: bool) -> None:
        import torch

        self.value = None if value is None else torch.from_numpy(np.ascontiguousarray(value, np.float32))
        self.record, self.prefix, self.seen = record, prefix, None

    def forward(self, x: Any) -> Any:
        import torch

        if self.record:
            self.seen = x.float().numpy().copy()
        if self.value is None:
            return x
        if not self.prefix:
            return self.value.to(x.dtype).reshape(x.shape)
        # row k of the batch is int8 through position k - 1: rows k > pos take the injected value
        mask = (torch.arange(x.shape[0]) > self.pos).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, self.value.to(x.dtype).expand_as(x), x)


def _overloads(packet: Any) -> list[Any]:
    return [getattr(packet, o) for o in packet.overloads()]


def _constant(node: Any) -> bool:
    """A weight: a get_attr, or ops on get_attrs only."""
    import torch

    if not isinstance(node, torch.fx.Node):
        return True
    if node.op == "get_attr":
        return True
    if node.op in ("placeholder", "output"):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(_constant(a) for a in inputs)


# ----------------------------------------------------------------------------- accumulation
@dataclass
class Acc:
    """Sums over chunks for one position of one artifact."""

    n: int = 0  # elements
    sum_lsb: float = 0.0
    max_lsb: float = 0.0
    over1: int = 0
    differ: int = 0
    local_sum: float = 0.0
    local_max: float = 0.0
    local_over1: int = 0
    ff: float = 0.0  # sum float^2
    ee: float = 0.0  # sum (runtime - float)^2
    rr: float = 0.0
    rf: float = 0.0
    sim_ee: float = 0.0  # sum (simulation - float)^2
    row: Optional[dict[str, Any]] = None
    reasons: list[str] = field(default_factory=list)
    allowed: tuple[str, ...] = ()  # the layouts the shapes allowed (tensorwise)


def _sqnr(signal: float, noise: float) -> Optional[float]:
    if signal <= 0:
        return None
    return 99.0 if noise <= 0 else round(10 * math.log10(signal / noise), 2)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b) over all elements (float64), without the product's temporary or a copy of a strided view;
    einsum's own loop, not BLAS (whose threads spin against PyTorch's on a busy machine)."""
    subscripts = "".join(chr(97 + i) for i in range(a.ndim))
    return float(np.einsum(f"{subscripts},{subscripts}->", a, b))


@dataclass
class ArtifactLayers:
    """One artifact's per-position accumulation over every chunk."""

    label: str
    status: str = "compared"
    info: dict[str, Any] = field(default_factory=dict)
    acc: dict[int, Acc] = field(default_factory=dict)
    lost: dict[int, dict[str, Any]] = field(default_factory=dict)
    layouts: Counter = field(default_factory=Counter)
    images: int = 0
    runtime_quantized: int = 0
    pytorch_quantizers: int = 0

    def add(self, result: dict[str, Any], floats: list[np.ndarray], position_of: dict[str, int]) -> dict[int, np.ndarray]:
        """One chunk's `tensorwise.check(keep=True)` result; returns the runtime's aligned tensors by position."""
        s = result["summary"]
        self.info = {k: v for k, v in s.items() if k not in _SUMMARY_KEYS}
        self.runtime_quantized = s.get("runtime_quantized_tensors", 0)
        self.pytorch_quantizers = s.get("pytorch_quantizers", 0)
        rows = {r["quantizer"]: r for r in result["table"]}
        local = result["local"]
        aligned: dict[int, np.ndarray] = {}
        for p in result["pairs"]:
            pos = position_of.get(p.torch.name)
            if pos is None:
                continue
            a = self.acc.setdefault(pos, Acc())
            row = rows[p.torch.name]
            if a.row is None:
                a.row = row
                a.reasons = [r for r in row["reasons"] if FRAC_REASON not in r]
                a.allowed = p.layouts
            self.layouts[p.layout] += 1
            # the LSB sums the check itself computed on this chunk (tensorwise.lsb_sums): one implementation
            acc_sums, loc_sums = p.stats["accumulated"], p.stats["local"]
            a.n += acc_sums["n"]
            a.sum_lsb += acc_sums["sum"]
            a.max_lsb = max(a.max_lsb, acc_sums["max"])
            a.over1 += acc_sums["over1"]
            a.differ += acc_sums["differ"]
            a.local_sum += loc_sums["sum"]
            a.local_max = max(a.local_max, loc_sums["max"])
            a.local_over1 += loc_sums["over1"]
            f = floats[pos] if pos < len(floats) else None
            if f is not None and f.shape == p.aligned.shape:
                f = f.astype(np.float64)
                r = np.asarray(p.aligned, np.float64)
                e = r - f
                a.ff += _dot(f, f)
                a.ee += _dot(e, e)
                a.rr += _dot(r, r)
                a.rf += _dot(r, f)
                np.subtract(p.torch.dequantized(), f, out=e)
                a.sim_ee += _dot(e, e)
            aligned[pos] = p.aligned.astype(np.float32)
        for t in result["lost"]:
            pos = position_of.get(t.name)
            if pos is not None:
                self.lost.setdefault(pos, {"quantizer": t.name, "module": t.module, "producer": t.op,
                                           "scale": t.scale, "zero_point": t.zero_point})
        return aligned


_SUMMARY_KEYS = {"status", "images", "pytorch_quantizers", "runtime_quantized_tensors", "matched",
                 "matched_by_values_requantized", "matched_to_shared_tensor", "unmatched_pytorch", "unmatched_runtime",
                 "unmatched_runtime_new_qparams", "flag_rule", "flagged", "first_flagged", "flagged_layers", "worst",
                 "max_local_lsb", "max_accumulated_lsb"}


def _transposed(row: dict[str, Any], usual: str, allowed: Sequence[str]) -> bool:
    """Held with its last two axes swapped where the runtime's usual layout fitted the shape too."""
    return row.get("layout") == "last two axes swapped" and usual != "last two axes swapped" and usual in allowed


def rows_of(layers: ArtifactLayers, threshold: float, positions: int, alone: dict[int, Optional[float]],
            modules: Sequence[str]) -> list[dict[str, Any]]:
    """One row per position of one artifact (graph order), with the divergence verdict."""
    usual = layers.layouts.most_common(1)[0][0] if layers.layouts else "as is"
    out = []
    for pos in range(positions):
        if pos in layers.lost:
            t = layers.lost[pos]
            out.append({"position": pos, "module": t["module"] or modules[pos], "quantizer": t["quantizer"],
                        "producer": t["producer"], "scale": t["scale"], "zero_point": t["zero_point"],
                        "runtime_tensor": None, "diverged": True, "alone_sqnr_db": alone.get(pos),
                        "reasons": ["no runtime tensor: the converter dropped this quantizer (the tensor stays float "
                                    "or is fused away)"]})
            continue
        a = layers.acc.get(pos)
        if a is None or a.row is None:
            continue
        r = a.row
        local_frac = a.local_over1 / a.n
        reasons = list(a.reasons)
        if local_frac > threshold:
            reasons.append(f"{100 * local_frac:.1f}% of elements > 1 LSB from the simulation on the same inputs "
                           "(local)")
        if _transposed(r, usual, a.allowed):
            reasons.append(f"transposed layout: matches the simulation only with its last two axes swapped (this "
                           f"runtime's other tensors: {usual})")
        out.append({
            "position": pos, "module": r["module"], "quantizer": r["quantizer"], "producer": r["producer"],
            "shape": r["shape"], "scale": r["scale"], "zero_point": r["zero_point"],
            "runtime_tensor": r["runtime_tensor"], "runtime_op": r["runtime_op"],
            "runtime_scale": r["runtime_scale"], "runtime_zero_point": r["runtime_zero_point"],
            "matched_on": r["matched_on"], "layout": r.get("layout"),
            "vs_simulation": {"mean_lsb": round(a.sum_lsb / a.n, 5), "max_lsb": round(a.max_lsb, 3),
                              "frac_over_1lsb": round(a.over1 / a.n, 6), "frac_differ": round(a.differ / a.n, 6)},
            "local": {"mean_lsb": round(a.local_sum / a.n, 5), "max_lsb": round(a.local_max, 3),
                      "frac_over_1lsb": round(local_frac, 6)},
            "vs_float": {"sqnr_db": _sqnr(a.ff, a.ee),
                         "cosine": round(a.rf / math.sqrt(a.rr * a.ff), 6) if a.rr > 0 and a.ff > 0 else None,
                         "simulation_sqnr_db": _sqnr(a.ff, a.sim_ee)},
            "alone_sqnr_db": alone.get(pos),
            "diverged": bool(reasons), "reasons": reasons,
        })
    return out


def first_divergence(rows: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The first row (graph order) where the runtime leaves its simulation, named for a user."""
    for r in rows:
        if r["diverged"]:
            return {k: r.get(k) for k in ("position", "module", "quantizer", "producer", "scale", "zero_point",
                                          "runtime_tensor", "runtime_op", "runtime_scale", "runtime_zero_point",
                                          "reasons")}
    return None


def describe_divergence(label: str, d: Optional[dict[str, Any]]) -> str:
    if d is None:
        return f"{label}: follows its simulation at every layer (differences within the runtime's rounding)"
    ours = f"scale {d['scale']:.6g} zp {d['zero_point']}"
    if d.get("runtime_tensor") is None:
        theirs = "no runtime tensor"
    else:
        theirs = (f"runtime {d.get('runtime_op') or '?'} '{d['runtime_tensor']}' scale {d['runtime_scale']:.6g} "
                  f"zp {d['runtime_zero_point']}")
    return (f"{label}: leaves its simulation at #{d['position']} {d['module'] or d['quantizer']} "
            f"({d['producer']}; simulation {ours}; {theirs}): {'; '.join(d['reasons'])}")


# ----------------------------------------------------------------------------- side by side
@dataclass
class PairAcc:
    n: int = 0
    over1: int = 0
    max_lsb: float = 0.0


def side_by_side(labels: Sequence[str], rows: dict[str, list[dict[str, Any]]],
                 between: dict[tuple[str, str], dict[int, PairAcc]], threshold: float) -> list[dict[str, Any]]:
    """For each two artifacts: the first tensor where they part (one leaves its simulation there and the other
    does not, or one lacks it), the first where their values differ beyond 1 LSB on more than `threshold` of
    elements (rounding differences grow with depth), and which holds closer to float at each."""
    out = []
    by_pos = {label: {r["position"]: r for r in rows[label]} for label in labels}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            positions = sorted(set(by_pos[a]) | set(by_pos[b]))
            parted = None
            for pos in positions:
                ra, rb = by_pos[a].get(pos), by_pos[b].get(pos)
                if ra is None or rb is None or ra["diverged"] != rb["diverged"] or \
                        (ra["diverged"] and rb["diverged"] and ra["reasons"] != rb["reasons"]):
                    parted = _part(pos, a, b, ra, rb, "one of them leaves its simulation here, the other does not"
                                   if ra is not None and rb is not None and ra["diverged"] != rb["diverged"]
                                   else "they leave their simulations differently here")
                    break
            values = None
            for pos, acc in sorted(between.get((a, b), {}).items()):
                if acc.n and acc.over1 / acc.n > threshold:
                    values = _part(pos, a, b, by_pos[a].get(pos), by_pos[b].get(pos),
                                   f"{100 * acc.over1 / acc.n:.1f}% of elements > 1 LSB apart (max "
                                   f"{acc.max_lsb:.1f} LSB)")
                    break
            out.append({"artifacts": [a, b], "parted_at": parted, "values_differ_from": values})
    return out


def _part(pos: int, a: str, b: str, ra: Optional[dict[str, Any]], rb: Optional[dict[str, Any]],
          why: str) -> dict[str, Any]:
    sq = lambda r: None if r is None or "vs_float" not in r else r["vs_float"]["sqnr_db"]  # noqa: E731
    sa, sb = sq(ra), sq(rb)
    closer = None
    if sa is not None and sb is not None:
        closer = a if sa > sb else b if sb > sa else "equal"
    elif sa is not None or sb is not None:
        closer = a if sa is not None else b
    r = ra or rb or {}
    return {"position": pos, "module": r.get("module"), "quantizer": r.get("quantizer"), "producer": r.get("producer"),
            "why": why, "sqnr_vs_float_db": {a: sa, b: sb}, "closer_to_float": closer}


def describe_part(p: dict[str, Any]) -> str:
    a, b = p["artifacts"]
    parted = p["parted_at"]
    if parted is None:
        line = f"{a} vs {b}: never part beyond rounding"
    else:
        line = (f"{a} vs {b}: part at #{parted['position']} {parted['module'] or parted['quantizer']} "
                f"({parted['why']}); closer to float there: {parted['closer_to_float']} "
                f"({_db(parted['sqnr_vs_float_db'][a])} vs {_db(parted['sqnr_vs_float_db'][b])} dB)")
    v = p["values_differ_from"]
    if v is not None:
        line += (f"; values differ from #{v['position']} {v['module'] or v['quantizer']} on ({v['why']}; closer to "
                 f"float there: {v['closer_to_float']})")
    return line


def _db(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def accumulate_between(between: dict[tuple[str, str], dict[int, PairAcc]], labels: Sequence[str],
                       aligned: dict[str, dict[int, np.ndarray]], scales: dict[int, float]) -> None:
    """Direct runtime-vs-runtime differences of one chunk, in steps of the simulation's scale."""
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            acc = between.setdefault((a, b), {})
            for pos in set(aligned.get(a, {})) & set(aligned.get(b, {})):
                va, vb = aligned[a][pos], aligned[b][pos]
                if va.shape != vb.shape or pos not in scales:
                    continue
                d = np.abs(va.astype(np.float64) - vb) / scales[pos]
                p = acc.setdefault(pos, PairAcc())
                p.n += d.size
                p.over1 += int((d > 1.0 + 1e-6).sum())
                p.max_lsb = max(p.max_lsb, float(d.max()))


def alone_sqnr(floats: list[np.ndarray], qparams: dict[int, tuple[float, int, int, int]],
               sums: dict[int, list[float]]) -> None:
    """Accumulate each float tensor against itself quantized with the simulation's (scale, zero point, qmin,
    qmax): the cost of quantizing that tensor alone."""
    for pos, f in enumerate(floats):
        if pos not in qparams:
            continue
        scale, zero, lo, hi = qparams[pos]
        f64 = f.astype(np.float64)
        q = np.round(f64 / scale)
        q += zero
        np.clip(q, lo, hi, out=q)
        q -= zero
        q *= scale
        q -= f64
        s = sums.setdefault(pos, [0.0, 0.0])
        s[0] += _dot(f64, f64)
        s[1] += _dot(q, q)


# ----------------------------------------------------------------------------- diagnosis
def _input_positions(gm: Any, quantizer: str, names: dict[str, int]) -> list[int]:
    """Positions whose dequantized values feed the op quantized by `quantizer` (walking back through float ops
    to the nearest dequantize of an activation quantizer)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    start = nodes[quantizer].args[0]
    found: list[int] = []
    seen = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if not hasattr(n, "op") or n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "call_function" and n.args and getattr(n.args[0], "name", None) in names \
                and n is not nodes[quantizer]:
            found.append(names[n.args[0].name])  # a dequantize of an activation quantizer
            continue
        if n.op in ("placeholder", "get_attr"):
            continue
        stack.extend(a for a in n.all_input_nodes)
    return sorted(set(found))


def diagnose_transposed(artifact: Any, x: np.ndarray, pos: int, threshold: float) -> Optional[int]:
    """For a layer flagged by its local error: the input position that, fed to PyTorch with H and W swapped,
    makes the layer agree with the runtime (the runtime computed on a transposed tensor), else None."""
    result = tensorwise.check(artifact.target, artifact.path, artifact.request, x, keep=True)
    if "pairs" not in result:
        return None
    gm = artifact.request.quantized.simulation_module(artifact.target.simulation_semantics(artifact.request))
    names = {t.name: t.order for t in result["free"]}
    by_order = {t.order: t.name for t in result["free"]}
    pairs = {p.torch.order: p for p in result["pairs"]}
    if pos not in pairs:
        return None
    forced = {p.torch.name: p.aligned.astype(np.float32) for p in result["pairs"]}
    for j in _input_positions(gm, by_order[pos], names):
        v = forced.get(by_order[j])
        if v is None or v.ndim != 4 or v.shape[2] != v.shape[3] or v.shape[2] < 2:
            continue
        trial = dict(forced)
        trial[by_order[j]] = np.ascontiguousarray(np.swapaxes(v, -1, -2))
        local = {t.name: t for t in tensorwise.torch_quantized(gm, x, trial)}[by_order[pos]]
        p = pairs[pos]
        if tensorwise._lsb_stats(local, p.aligned, p.runtime)["frac_over_1lsb"] <= threshold:
            return j
    return None
