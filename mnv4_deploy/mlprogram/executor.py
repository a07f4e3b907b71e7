"""Run a read ML Program op by op (the reference executor: what Core ML computes, on any OS).

Constants and `constexpr_*` ops are materialized once, at load, as Core ML decompresses them at compile time.
Every op output is stored in the dtype the program declares (float16 tensors are rounded to float16 there) and
checked against the declared shape, so an implementation that disagrees with the program's own type inference
fails loudly. Programs with a fixed batch of 1 (what `ct.convert` writes for our models) run image by image, as
Core ML's `predict` would run them; intermediates come back batch first.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from .ops import OPS
from .reader import Op, Program

logger = logging.getLogger(__name__)

# Parameters that the op computes with in float32 whatever their stored type (ops.py reads them through f32).
_F32_PARAMS = {"conv": ("weight", "bias"), "linear": ("weight", "bias")}
TORCH_DTYPES = {"FLOAT16": torch.float16, "FLOAT32": torch.float32, "FLOAT64": torch.float64, "INT8": torch.int8,
                "UINT8": torch.uint8, "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64,
                "BOOL": torch.bool}


class UnsupportedOpError(NotImplementedError):
    """The program holds an op (or an op configuration) the executor has no semantics for: refused, never guessed."""

    def __init__(self, op_type: str, where: str, program: str, detail: str = "") -> None:
        self.op_type = op_type
        super().__init__(f"ML Program op '{op_type}' ({where}) in {program} is not implemented by the reference "
                         f"executor{': ' + detail if detail else ''}; implemented: {', '.join(sorted(OPS))}")


class ExecutionError(RuntimeError):
    """An op's result contradicts the program's declared type (an executor or program defect)."""


class Executor:
    """One program, ready to run: `run({'input': x}, outputs=[...])` -> {name: numpy array}."""

    def __init__(self, program: Program, threads: int = 1, workers: Optional[int] = None) -> None:
        # One intra-op thread by default: batch-1 ops on small tensors lose more to thread hand-offs than they
        # gain (20x slower with 2 threads on a busy 2-core machine, measured on a 5x5 depthwise conv), and the
        # thread count changes which kernels run, so numbers would depend on it. A batch runs its images on
        # `workers` threads instead (default: one per core), each op single-threaded.
        self.program, self.threads = program, threads
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        unknown = [o for o in program.ops if o.type not in OPS]
        if unknown:
            count = sum(1 for o in unknown if o.type == unknown[0].type)
            raise UnsupportedOpError(unknown[0].type, f"output '{unknown[0].name}', {count} in the program",
                                     program.label)
        self.consts: dict[str, Any] = {k: _tensor(v) for k, v in program.consts.items()}
        self.ops: list[Op] = []
        for o in program.ops:  # compile time: decompress constant weights once
            if o.type.startswith("constexpr_"):
                self.consts.update(self._run_op(o, self.consts))
            else:
                self.ops.append(o)
        self._weights_in_compute_precision()
        self.op_types = sorted({o.type for o in program.ops})
        self._frees: dict[tuple[str, ...], dict[int, list[str]]] = {}  # requested outputs -> tensors to free

    def _weights_in_compute_precision(self) -> None:
        """float16 constants read only as conv/linear weights or biases, stored as the float32 those ops compute
        with (`ops.f32`, exact): converted once here instead of at every image (a quarter of the run's time)."""
        uses: dict[str, set[bool]] = collections.defaultdict(set)
        for o in self.ops:
            for param, bindings in o.inputs.items():
                for kind, ref in bindings:
                    if kind == "name" and ref in self.consts:
                        uses[ref].add(param in _F32_PARAMS.get(o.type, ()))
        for name, as_weight in uses.items():
            value = self.consts[name]
            if as_weight == {True} and isinstance(value, torch.Tensor) and value.dtype == torch.float16:
                self.consts[name] = value.to(torch.float32)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.program.inputs]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        """The program's outputs (or the named tensors `outputs`, any variable of the program) for `feeds`."""
        names = list(outputs) if outputs is not None else list(self.program.outputs)
        missing = [n for n in names if n not in self.program.types and n not in self.consts]
        if missing:
            raise KeyError(f"{self.program.label} has no tensor named {', '.join(missing)}")
        with _threads(self.threads):
            return self._run(feeds, names)

    def _run(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        if set(feeds) != set(self.input_names):
            raise KeyError(f"{self.program.label} takes inputs {self.input_names}, got {sorted(feeds)}")
        batch = {k: len(v) for k, v in feeds.items()}
        declared = {v.name: v.shape for v in self.program.inputs}
        if all(declared[k] and declared[k][0] == 1 and batch[k] > 1 for k in feeds):
            images = range(min(batch.values()))
            key = tuple(sorted(names))
            if key not in self._frees:  # computed before the workers start: they only read it
                self._frees[key] = self._last_use(names)
            one = lambda i: self._run_one({k: v[i:i + 1] for k, v in feeds.items()}, names)  # noqa: E731
            if self.workers > 1 and len(images) > 1:
                # Images in parallel, each op on one thread as in a single-image run (torch's thread count is
                # process-wide and set around the whole call): the same numbers, up to `workers` times faster.
                with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(images))) as pool:
                    parts = list(pool.map(one, images))
            else:
                parts = [one(i) for i in images]
            return {n: np.concatenate([p[n] for p in parts]) for n in names}
        return self._run_one(feeds, names)

    def _run_one(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self.consts)
        for var in self.program.inputs:
            x = feeds[var.name]
            if var.shape is not None and tuple(x.shape) != var.shape:
                raise ValueError(f"{self.program.label}: input '{var.name}' has shape {var.shape}, got {tuple(x.shape)}")
            env[var.name] = torch.from_numpy(np.ascontiguousarray(x)).to(TORCH_DTYPES[var.dtype])
        key = tuple(sorted(names))
        if key not in self._frees:
            self._frees[key] = self._last_use(names)
        last = self._frees[key]
        for i, o in enumerate(self.ops):
            env.update(self._run_op(o, env))
            for name in last.get(i, ()):
                env.pop(name, None)
        return {n: _numpy(env[n]) for n in names}

    def _last_use(self, keep: Iterable[str]) -> dict[int, list[str]]:
        """Op index -> tensors nobody reads after it (freed there, unless asked for)."""
        keep = set(keep) | set(self.consts)
        last: dict[str, int] = {}
        for i, o in enumerate(self.ops):
            for kind, ref in (b for bindings in o.inputs.values() for b in bindings):
                if kind == "name":
                    last[ref] = i
        out: dict[int, list[str]] = {}
        for name, i in last.items():
            if name not in keep:
                out.setdefault(i, []).append(name)
        return out

    def _run_op(self, o: Op, env: Mapping[str, Any]) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for param, bindings in o.inputs.items():
            values = [env[ref] if kind == "name" else _tensor(ref) for kind, ref in bindings]
            args[param] = values[0] if len(values) == 1 else values
        for key, value in o.attributes.items():  # iOS16 constexpr ops keep their data in attributes
            args[key] = _tensor(value)
        try:
            result = OPS[o.type](args)
        except NotImplementedError as exc:
            raise UnsupportedOpError(o.type, f"output '{o.name}'", self.program.label, str(exc)) from exc
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(o.outputs):
            raise ExecutionError(f"{o.type} '{o.name}': {len(results)} outputs, the program declares {len(o.outputs)}")
        out = {}
        for var, value in zip(o.outputs, results):
            if var.dtype not in TORCH_DTYPES:
                raise UnsupportedOpError(o.type, f"output '{var.name}'", self.program.label,
                                         f"output dtype {var.dtype} is not modelled")
            value = value.to(TORCH_DTYPES[var.dtype])  # fp16 outputs rounded to float16 (nearest even) here
            if var.shape is not None and tuple(value.shape) != var.shape:
                raise ExecutionError(f"{self.program.label}: {o.type} '{var.name}' computed shape "
                                     f"{tuple(value.shape)}, the program declares {var.shape}")
            out[var.name] = value
        return out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensor(value: Any) -> Any:
    """Constants as torch tensors (strings stay strings)."""
    if isinstance(value, (str, torch.Tensor)):
        return value
    array = np.asarray(value)
    if array.dtype.kind in "US":
        return str(array.reshape(-1)[0]) if array.size == 1 else value
    return torch.from_numpy(array.copy() if array.ndim == 0 else np.ascontiguousarray(array))


def _numpy(value: Any) -> Any:
    return value.numpy() if isinstance(value, torch.Tensor) else value
