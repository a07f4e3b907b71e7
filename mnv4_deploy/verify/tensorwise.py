"""Tensor-by-tensor check that a runtime deploys the PyTorch int8 model it was exported from.

Final logits can agree while a layer is wrong (a converter that re-quantizes a tensor with another scale,
or drops a quantize/dequantize pair); this compares every quantized activation instead:

1. PyTorch: the converted PT2E graph (`QuantizedModel.converted()`) runs on a few held-back images and every
   `quantize_per_tensor` output is recorded as int8 with its scale, zero point and PyTorch module path.
2. Runtime: the target exposes its quantized intermediates (`Target.quantized_tensors`, in each target's
   module): e.g. onnxruntime's own optimized (QDQ-fused) graph with its 8-bit tensors as graph outputs, the
   TFLite interpreter (built-in kernels) with all tensors preserved, OpenVINO CPU with the FakeQuantize
   outputs added as model outputs.
3. Matching (converters rename everything; a runtime that keeps the quantizers' names is paired by name
   first): then on quantization parameters (scale to 1e-5 relative, zero
   point) plus element count, trying the layouts the shapes allow (NCHW, NHWC, squeezed); where several
   tensors could be swapped (the hybrids' softmaxes share one fixed grid and size) they are assigned together
   by least total value error, so one tensor an ill-conditioned layer moved cannot take its neighbour's
   runtime tensor, and equal errors go by place in the graph. Then tensors left on both sides with the same element count are paired
   on dequantized values (relative RMS error < 0.5): such a pair is a tensor the converter re-quantized with
   other parameters. Then a PyTorch quantizer of an identity op the converter folded (flatten after pooling)
   may share an already matched runtime tensor with its parameters and values. Whatever remains is reported
   unmatched: a PyTorch quantizer with no runtime counterpart can mean the converter dropped it.
4. Each matched pair is compared in LSBs of the PyTorch scale, twice: `accumulated` (both sides run freely,
   so differences carry over from earlier layers) and `local` (PyTorch re-runs with every matched tensor's
   dequantized value replaced by the runtime's, so each layer sees the runtime's own inputs and only its own
   error remains). A layer is flagged when its local fraction of elements more than 1 LSB apart exceeds the
   threshold, when its scale/zero point differ from PyTorch's, or when the runtime writes and reads it with
   different parameters: that names the layer a defect starts at rather than everything downstream of it.
   (On faithful exports accumulated differences reach 4-14 LSB with up to 64% of a tensor > 1 LSB off after
   a dozen layers of rounding differences, so only the local numbers can carry a threshold.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..load.images import model_input

logger = logging.getLogger(__name__)

FRACTION_THRESHOLD = 0.01  # flag a layer when more than 1% of its elements are > 1 LSB from PyTorch's
SCALE_RTOL = 1e-5  # float32 scales round-trip through every format to about 1e-7
VALUE_MATCH_RTOL = 0.5  # second matching pass: relative RMS error of dequantized values
_TIE = 1e-12  # relative RMS errors this close are the same candidate quality
_TIE_WEIGHT = 1e-9  # position's weight beside the value error when assigning groups (decides exact ties only)
IMAGES = 8


@dataclass
class QTensor:
    """One quantized activation on a batch of images: integer values with their scale and zero point."""

    name: str
    scale: float
    zero_point: int
    values: np.ndarray  # integers (int32), batch first, in the producer's own layout
    order: int  # position in its graph's execution order
    module: str = ""  # PyTorch module path (PyTorch side)
    op: str = ""  # the producing operation
    note: str = ""  # a runtime-side inconsistency (e.g. written and read with different scales)
    scale_rtol: float = SCALE_RTOL  # how exactly its scale can match PyTorch's (a float16 scale: about 2^-11)

    @property
    def per_image(self) -> int:
        return int(np.prod(self.values.shape[1:]))

    def dequantized(self) -> np.ndarray:
        """(values - zero point) * scale in float64, computed once (matching and every statistic read it;
        callers must not change it in place)."""
        d = self.__dict__.get("_dequantized")
        if d is None:
            d = self.__dict__["_dequantized"] = (self.values.astype(np.float64) - self.zero_point) * self.scale
        return d


@dataclass
class Pair:
    torch: QTensor
    runtime: QTensor
    aligned: np.ndarray  # runtime values dequantized, in the PyTorch tensor's shape
    how: str  # 'qparams' or 'values (re-quantized)'
    stats: dict[str, Any] = field(default_factory=dict)  # `lsb_sums`: 'accumulated' and 'local' (compare)
    layout: str = "as is"  # how the runtime tensor was rearranged to PyTorch's shape (`_alignments`)
    layouts: tuple[str, ...] = ()  # every rearrangement the shapes allowed


# ----------------------------------------------------------------------------- PyTorch side
def _quant_targets() -> tuple[Any, ...]:
    import torch

    ops = torch.ops.quantized_decomposed
    return (ops.quantize_per_tensor.default, ops.quantize_per_tensor.tensor)


def _module_of(node: Any) -> str:
    """The PyTorch module path a quantizer belongs to (its producer's innermost nn_module_stack entry)."""
    import torch

    src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if src is not None and src.op == "placeholder":
        return "input"
    stack = (src.meta.get("nn_module_stack") if src is not None else None) or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


def torch_quantized(gm: Any, x: np.ndarray, forced: Optional[dict[str, np.ndarray]] = None) -> list[QTensor]:
    """Every activation quantizer of a converted PT2E graph run on `x` (int8 outputs, scale, zero point).

    `forced` maps quantizer names to dequantized values (float, PyTorch layout) that their dequantize nodes
    return instead of the computed ones, so later layers run on exactly those inputs (the `local` comparison).
    """
    import torch

    targets = _quant_targets()
    ops = torch.ops.quantized_decomposed
    dequantize = (ops.dequantize_per_tensor.default, ops.dequantize_per_tensor.tensor)
    found: list[QTensor] = []
    constants = _constant_values(gm)

    class Capture(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            if n.name in constants:
                return constants[n.name]
            out = super().run_node(n)
            if n.op == "call_function" and n.target in targets:
                args, _ = self.fetch_args_kwargs_from_env(n)
                scale, zero = float(args[1]), int(args[2])
                found.append(QTensor(n.name, scale, zero, out.numpy().astype(np.int32), len(found),
                                     _module_of(n), str(getattr(n.args[0], "name", ""))))
            elif forced and n.op == "call_function" and n.target in dequantize \
                    and getattr(n.args[0], "name", None) in forced:
                out = torch.from_numpy(forced[n.args[0].name]).to(out.dtype)
            return out

        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            fast = _FAST.get(target)
            if fast is not None and not kwargs and isinstance(args[0], torch.Tensor) \
                    and args[0].dtype == _FAST_INPUT[target] and all(isinstance(a, (int, float)) for a in args[1:5]):
                return fast(*args)
            return super().call_function(target, args, kwargs)

    _fast_ops()
    with torch.no_grad():
        Capture(gm).run(model_input(x))
    return found


_FAST: dict[Any, Any] = {}
_FAST_INPUT: dict[Any, Any] = {}


def _fast_ops() -> None:
    """PyTorch's decomposed per-tensor quantize/dequantize (torch/ao/quantization/fx/_decomposed.py), the same
    arithmetic in the same order with in-place steps: the same values, without four temporaries per tensor."""
    import torch

    if _FAST:
        return
    ops = torch.ops.quantized_decomposed

    def quantize(x: Any, scale: float, zero: int, qmin: int, qmax: int, dtype: Any) -> Any:
        return torch.round(x * (1.0 / scale)).add_(zero).clamp_(qmin, qmax).to(dtype)

    def dequantize(x: Any, scale: float, zero: int, qmin: int, qmax: int, dtype: Any) -> Any:
        return x.to(torch.float32).sub_(zero).mul_(scale)

    _FAST_INPUT.update({ops.quantize_per_tensor.default: torch.float32, ops.dequantize_per_tensor.default: torch.int8})
    _FAST.update({ops.quantize_per_tensor.default: quantize, ops.dequantize_per_tensor.default: dequantize})


def _constant_values(gm: Any) -> dict[str, Any]:
    """The values of the graph's nodes computed from weights only (a folded int8 weight's per-channel
    dequantize), computed once per graph: every run would otherwise redo them."""
    import torch

    cached = gm.__dict__.get("_mnv4_constants")
    if cached is not None and cached[0] is gm.graph:  # a deep copy (then perhaps rewritten) computes its own
        return cached[1]
    names: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes
                                  and all(a.name in names for a in n.all_input_nodes)):
            names.add(n.name)
    wanted = {n.name for n in gm.graph.nodes if n.name in names and n.op == "call_function"
              and any(u.name not in names for u in n.users)}
    values: dict[str, Any] = {}

    class Constants(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            return super().run_node(n) if n.name in names else None

    env: dict[Any, Any] = {}
    interp = Constants(gm)
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.name in names:
                interp.env = env
                env[n] = interp.run_node(n)
                if n.name in wanted:
                    values[n.name] = env[n]
    gm.__dict__["_mnv4_constants"] = (gm.graph, values)
    return values


# ----------------------------------------------------------------------------- helpers for targets
def signed_values(values: np.ndarray, dtype: Any) -> np.ndarray:
    """Integer values as int32 on the int8 grid (uint8 tensors are shifted by -128, with their zero point)."""
    v = np.asarray(values).astype(np.int32)
    return v - 128 if np.dtype(dtype) == np.uint8 else v


def signed_zero_point(zero: int, dtype: Any) -> int:
    return int(zero) - 128 if np.dtype(dtype) == np.uint8 else int(zero)


# ----------------------------------------------------------------------------- matching
LAYOUTS = ("as is", "NHWC", "last two axes swapped", "squeezed")


def _named_alignments(values: np.ndarray, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """`values` (runtime layout, batch first) rearranged to PyTorch's `shape`, every way the shapes allow,
    each with its name (one of LAYOUTS)."""
    out = []
    if values.shape == shape:
        out.append(("as is", values))
    if values.ndim == 4 and len(shape) == 4 and values.transpose(0, 3, 1, 2).shape == shape:
        out.append(("NHWC", values.transpose(0, 3, 1, 2)))
    # Last two axes swapped: TFLite softmaxes attention over its last axis (PyTorch's axis 2 transposed there
    # and back) and OpenVINO folds the small K transpose into its MatMul, so those tensors exist transposed.
    if values.ndim == len(shape) >= 2 and np.swapaxes(values, -1, -2).shape == shape:
        out.append(("last two axes swapped", np.swapaxes(values, -1, -2)))
    squeeze = lambda s: tuple(d for d in s if d != 1)
    if not out and values.size == int(np.prod(shape)) and squeeze(values.shape[1:]) == squeeze(shape[1:]) \
            and values.shape[0] == shape[0]:
        out.append(("squeezed", values.reshape(shape)))
    return out


def _alignments(values: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """`values` (runtime layout, batch first) rearranged to PyTorch's `shape`, every way the shapes allow."""
    return [a for _, a in _named_alignments(values, shape)]


def close_qparams(scale_a: float, zero_a: int, scale_b: float, zero_b: int) -> bool:
    return zero_a == zero_b and abs(scale_a - scale_b) <= SCALE_RTOL * max(scale_a, scale_b)


def _same_qparams(a: QTensor, b: QTensor) -> bool:
    rtol = max(a.scale_rtol, b.scale_rtol)
    return a.zero_point == b.zero_point and abs(a.scale - b.scale) <= rtol * max(a.scale, b.scale)


def _best(t: QTensor, candidates: Sequence[QTensor], position: Optional[Callable[[QTensor, QTensor], float]] = None,
          ) -> Optional[tuple[QTensor, np.ndarray, float, str, tuple[str, ...]]]:
    """The candidate whose dequantized values (best layout) are closest to `t`'s: (tensor, aligned, rel. RMS,
    the layout used, the layouts its shape allowed). Candidates exactly as close (the hybrids' saturated
    softmaxes can be identical in two blocks) go to the one nearest `t`'s place in the graph (`position`)."""
    ref = t.dequantized()
    norm = float(np.sqrt(np.mean(ref ** 2))) or t.scale
    best, best_distance = None, 0.0
    for c in candidates:
        deq = c.dequantized()
        named = _named_alignments(deq, ref.shape)
        distance = position(t, c) if position else 0.0
        for layout, aligned in named:
            err = float(np.sqrt(np.mean((aligned - ref) ** 2))) / norm
            if best is None or err < best[2] - _TIE or (err <= best[2] + _TIE and distance < best_distance):
                best, best_distance = (c, aligned, err, layout, tuple(n for n, _ in named)), distance
    return best


def _pair(t: QTensor, best: tuple[QTensor, np.ndarray, float, str, tuple[str, ...]], how: str) -> Pair:
    return Pair(t, best[0], best[1], how, layout=best[3], layouts=best[4])


def match(torch_tensors: Sequence[QTensor], runtime: Sequence[QTensor]) -> tuple[list[Pair], list[QTensor], list[QTensor]]:
    left = list(runtime)
    pairs: list[Pair] = []
    unmatched: list[QTensor] = []
    by_name = {r.name: r for r in runtime}
    position = _relative_position(torch_tensors, runtime)
    pending: list[QTensor] = []
    for t in torch_tensors:
        # A runtime that keeps the quantizers' own names (ExecuTorch's taps) is paired by name first: tensors
        # with the same parameters and size (the hybrids' softmaxes on the fixed 1/256 grid) cannot be swapped.
        named = by_name.get(t.name)
        if named is not None and any(r is named for r in left) and named.values.size == t.values.size:
            aligned = _alignments(named.dequantized(), t.values.shape)
            if aligned:
                left = [r for r in left if r is not named]
                pairs.append(Pair(t, named, aligned[0], "name"))
                continue
        pending.append(t)
    for group_torch, group_runtime in _interchangeable(pending, left):
        assigned = _assign(group_torch, group_runtime, position)
        for t in group_torch:
            best = assigned.get(id(t))
            if best is None:
                unmatched.append(t)
                continue
            left.remove(best[0])
            pairs.append(_pair(t, best, "qparams"))
    still: list[QTensor] = []
    for t in unmatched:  # re-quantized tensors: same size, close values, other scale or zero point
        cands = [r for r in left if r.values.size == t.values.size]
        best = _best(t, cands, position) if cands else None
        if best is None or best[2] > VALUE_MATCH_RTOL:
            still.append(t)
            continue
        left.remove(best[0])
        pairs.append(_pair(t, best, "values (re-quantized)"))
    lost: list[QTensor] = []
    for t in still:  # an identity op the converter folded (flatten after pooling): shares a matched tensor
        cands = [p.runtime for p in pairs if _same_qparams(t, p.runtime) and p.runtime.values.size == t.values.size]
        best = _best(t, cands) if cands else None
        if best is None or best[2] > VALUE_MATCH_RTOL:
            lost.append(t)
            continue
        pairs.append(_pair(t, best, "qparams (shares a runtime tensor: identity op folded)"))
    pairs.sort(key=lambda p: p.torch.order)
    return pairs, lost, left


def _interchangeable(torch_tensors: Sequence[QTensor], runtime: Sequence[QTensor],
                     ) -> list[tuple[list[QTensor], list[QTensor]]]:
    """The tensors split into groups that could be paired with each other (same quantization parameters and
    size): usually one PyTorch tensor and one runtime tensor; several where a grid is fixed (softmax)."""
    compatible = {id(t): [r for r in runtime if _same_qparams(t, r) and r.values.size == t.values.size]
                  for t in torch_tensors}
    groups: list[tuple[list[QTensor], list[QTensor]]] = []
    group_of: dict[int, int] = {}  # runtime tensor id -> group index
    for t in torch_tensors:
        hits = sorted({group_of[id(r)] for r in compatible[id(t)] if id(r) in group_of})
        if not hits:
            groups.append(([], []))
            hits = [len(groups) - 1]
        into = hits[0]
        for other in hits[1:]:  # t links groups made apart so far: merge them
            ts, rs = groups[other]
            groups[into][0].extend(ts)
            groups[into][1].extend(rs)
            groups[other] = ([], [])
            group_of.update({id(r): into for r in rs})
        groups[into][0].append(t)
        for r in compatible[id(t)]:
            if id(r) not in group_of:
                group_of[id(r)] = into
                groups[into][1].append(r)
    return [g for g in groups if g[0]]


def _assign(torch_tensors: list[QTensor], runtime: list[QTensor], position: Callable[[QTensor, QTensor], float],
            ) -> dict[int, tuple[QTensor, np.ndarray, float, str, tuple[str, ...]]]:
    """Pairs with the least total value error (PyTorch tensor id -> `_best` of its runtime tensor), so one tensor
    that an ill-conditioned layer moved (a softmax after a 1-LSB change in its logits) does not take a
    neighbour's place; equal errors go by position in the graph."""
    if not runtime:
        return {}
    if len(torch_tensors) == 1:
        best = _best(torch_tensors[0], runtime, position)
        return {id(torch_tensors[0]): best} if best is not None else {}
    from scipy.optimize import linear_sum_assignment

    unpaired = 1e9
    options: dict[tuple[int, int], Any] = {}
    cost = np.full((len(torch_tensors), len(runtime)), unpaired)
    for i, t in enumerate(torch_tensors):
        for j, r in enumerate(runtime):
            if _same_qparams(t, r) and r.values.size == t.values.size:
                best = _best(t, [r])
                if best is not None:
                    options[i, j] = best
                    cost[i, j] = best[2] + _TIE_WEIGHT * position(t, r)
    rows, cols = linear_sum_assignment(cost)
    return {id(torch_tensors[i]): options[i, j] for i, j in zip(rows, cols) if (i, j) in options}


def _relative_position(torch_tensors: Sequence[QTensor], runtime: Sequence[QTensor]) -> Callable[[QTensor, QTensor], float]:
    """How far apart a PyTorch tensor and a runtime tensor sit in their graphs' execution orders (0-1 scale)."""
    torch_len = max((t.order for t in torch_tensors), default=0) + 1
    runtime_len = max((r.order for r in runtime), default=0) + 1
    return lambda t, r: abs(t.order / torch_len - r.order / runtime_len)


def lsb(reference: QTensor, aligned: np.ndarray, runtime: Optional[QTensor] = None) -> np.ndarray:
    """|aligned - reference| in steps of the reference's scale, element by element."""
    ref = reference.dequantized()
    if runtime is not None and _same_qparams(reference, runtime):
        # Same grid up to the scale's storage precision (a float16 scale in CoreML): count integer steps on each
        # side's own scale, or a 1-step difference at q = 127 would read as 1.12 steps and be flagged.
        return np.abs(aligned / runtime.scale - ref / reference.scale)
    return np.abs(aligned - ref) / reference.scale


def lsb_sums(reference: QTensor, aligned: np.ndarray, runtime: Optional[QTensor] = None) -> dict[str, Any]:
    """The LSB differences as sums over elements (`mnv4-deploy debug` adds them up over image chunks): elements,
    sum, max, elements more than 1 LSB apart, elements that differ at all (more than half a step)."""
    d = lsb(reference, aligned, runtime)
    return {"n": int(d.size), "sum": float(d.sum()), "max": float(d.max()), "over1": int((d > 1.0 + 1e-6).sum()),
            "differ": int((d > 0.5).sum())}


def _lsb_stats(reference: QTensor, aligned: np.ndarray, runtime: Optional[QTensor] = None,
               sums: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    s = sums if sums is not None else lsb_sums(reference, aligned, runtime)
    return {"max_lsb": round(s["max"], 3), "mean_lsb": round(s["sum"] / s["n"], 5),
            "frac_over_1lsb": round(s["over1"] / s["n"], 6)}


# ----------------------------------------------------------------------------- the check
def compare(gm: Any, x: np.ndarray, runtime: Sequence[QTensor], threshold: float = FRACTION_THRESHOLD,
            keep: bool = False) -> dict[str, Any]:
    """Match `runtime` to the PyTorch quantizers of `gm` on `x`, compare each pair; summary + full table.

    `keep`: also return the tensors themselves (`mnv4-deploy debug` computes more on them): 'pairs' (matched,
    PyTorch order), 'free' (PyTorch's quantizers run freely), 'local' (PyTorch fed the runtime's tensors, by
    quantizer name) and 'lost' (PyTorch quantizers without a runtime counterpart)."""
    free = torch_quantized(gm, x)
    pairs, lost, extra = match(free, runtime)
    # Local comparison: PyTorch again, each matched quantizer's dequantized output replaced by the runtime's
    # (exact, whatever grid the runtime used), so every layer is judged on the runtime's own inputs.
    forced = {p.torch.name: p.aligned.astype(np.float32) for p in pairs}
    local = {t.name: t for t in torch_quantized(gm, x, forced)}
    rows = []
    for p in pairs:
        p.stats = {"accumulated": lsb_sums(p.torch, p.aligned, p.runtime),
                   "local": lsb_sums(local[p.torch.name], p.aligned, p.runtime)}
        acc = _lsb_stats(p.torch, p.aligned, sums=p.stats["accumulated"])
        loc = _lsb_stats(local[p.torch.name], p.aligned, sums=p.stats["local"])
        reasons = []
        if not _same_qparams(p.torch, p.runtime):
            reasons.append(f"re-quantized: scale {p.runtime.scale:.6g} zero point {p.runtime.zero_point} "
                           f"(PyTorch {p.torch.scale:.6g}, {p.torch.zero_point})")
        if p.runtime.note:
            reasons.append(f"inconsistent in the runtime: {p.runtime.note}")
        if loc["frac_over_1lsb"] > threshold:
            reasons.append(f"{100 * loc['frac_over_1lsb']:.1f}% of elements > 1 LSB from PyTorch on the same inputs")
        rows.append({"order": p.torch.order, "quantizer": p.torch.name, "module": p.torch.module,
                     "producer": p.torch.op, "runtime_tensor": p.runtime.name, "runtime_op": p.runtime.op,
                     "shape": list(p.torch.values.shape[1:]), "scale": p.torch.scale,
                     "zero_point": p.torch.zero_point, "runtime_scale": p.runtime.scale,
                     "runtime_zero_point": p.runtime.zero_point, "matched_on": p.how,
                     "layout": p.layout, "local": loc, "accumulated": acc, "flagged": bool(reasons),
                     "reasons": reasons})
    matched_qparams = [p.runtime for p in pairs]
    extra_new = [r for r in extra if not any(_same_qparams(r, m) for m in matched_qparams)]
    flagged = [r for r in rows if r["flagged"]]
    brief = lambda r: {"quantizer": r["quantizer"], "module": r["module"], "runtime_tensor": r["runtime_tensor"],
                       "local_max_lsb": r["local"]["max_lsb"], "local_frac_over_1lsb": r["local"]["frac_over_1lsb"],
                       "accumulated_max_lsb": r["accumulated"]["max_lsb"], "reasons": r["reasons"]}
    worst = sorted(rows, key=lambda r: (r["local"]["frac_over_1lsb"], r["local"]["max_lsb"]), reverse=True)[:3]
    summary = {
        "status": "compared",
        "images": int(len(x)),
        "pytorch_quantizers": len(free),
        "runtime_quantized_tensors": len(runtime),
        "matched": len(pairs),
        "matched_by_values_requantized": sum(1 for p in pairs if p.how.startswith("values")),
        "matched_to_shared_tensor": sum(1 for p in pairs if "shares" in p.how),
        "unmatched_pytorch": [{"quantizer": t.name, "module": t.module, "producer": t.op,
                               "scale": t.scale, "zero_point": t.zero_point} for t in lost],
        "unmatched_runtime": len(extra),
        "unmatched_runtime_new_qparams": [{"tensor": r.name, "op": r.op, "scale": r.scale,
                                           "zero_point": r.zero_point} for r in extra_new][:10],
        "flag_rule": f"local fraction of elements > 1 LSB above {threshold:.0%}, or scale/zero point differ",
        "flagged": len(flagged),
        "first_flagged": brief(flagged[0]) if flagged else None,
        "flagged_layers": [brief(r) for r in flagged][:10],
        "worst": [brief(r) for r in worst],
        "max_local_lsb": max((r["local"]["max_lsb"] for r in rows), default=None),
        "max_accumulated_lsb": max((r["accumulated"]["max_lsb"] for r in rows), default=None),
    }
    result: dict[str, Any] = {"summary": summary, "table": rows}
    if keep:
        result |= {"pairs": pairs, "free": free, "local": local, "lost": lost}
    return result


def check(target: Any, path: Any, request: Any, x: np.ndarray, keep: bool = False) -> dict[str, Any]:
    """The tensor-by-tensor comparison of one artifact: {'summary': ..., 'table': [...]} (table may be absent);
    `keep`: with the tensors themselves (`compare`)."""
    if not target.deploys_simulated_model(request):
        return {"summary": {"status": "not applicable: the artifact does not deploy the PT2E model it could be "
                                      "compared with"}}
    got = target.quantized_tensors(path, request, x)
    if isinstance(got, str):
        return {"summary": {"status": got}}
    runtime, info = got
    result = compare(request.quantized.simulation_module(target.simulation_semantics(request)), x, runtime,
                     keep=keep)
    result["summary"] = {"status": "compared", **info, **{k: v for k, v in result["summary"].items() if k != "status"}}
    return result


def run(target: Any, path: Any, request: Any, x: np.ndarray) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The check as verification runs it on an int8 artifact: the manifest's summary (flagged layers are logged
    as a warning, never a failure) and the full table for tensorwise.json beside the manifest."""
    result = check(target, path, request, x[:IMAGES])
    summary = result["summary"]
    line = warning_line(target.name, summary)
    if line:
        logger.warning(line)
    if "table" not in result:
        return summary, None
    summary["table"] = "tensorwise.json"
    return summary, {"target": target.name, "summary": summary, "tensors": result["table"]}


def warning_line(target: str, summary: dict[str, Any]) -> Optional[str]:
    """One line naming the flagged (and dropped) layers, or None when everything matched."""
    if summary.get("status") != "compared":
        return None
    lost = summary.get("unmatched_pytorch") or []
    names = [f"{r['module'] or r['quantizer']} ({r['quantizer']})" for r in summary.get("flagged_layers", [])]
    if not names and not lost:
        return None
    parts = []
    if names:
        parts.append(f"{summary['flagged']} layer(s) disagree with the PyTorch simulation, first "
                     f"{names[0]}; flagged: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if lost:
        parts.append(f"{len(lost)} PyTorch quantizer(s) without a runtime counterpart (dropped?): "
                     + ", ".join(f"{t['module'] or t['quantizer']} ({t['quantizer']})" for t in lost[:5]))
    return f"warning: [{target}] tensor-by-tensor: " + "; ".join(parts)


def summary_line(target: str, summary: dict[str, Any]) -> str:
    """One line for the CLI: matched / unmatched / flagged, or why the check did not run."""
    if summary.get("status") != "compared":
        return f"{target}: {summary.get('status')}"
    first = summary.get("first_flagged")
    where = f", first {first['module'] or first['quantizer']}" if first else ""
    return (f"{target}: {summary['matched']}/{summary['pytorch_quantizers']} quantizers matched, "
            f"{len(summary['unmatched_pytorch'])} missing in the runtime, {summary['flagged']} flagged{where} "
            f"(max local {summary['max_local_lsb']} LSB, accumulated {summary['max_accumulated_lsb']} LSB)")
