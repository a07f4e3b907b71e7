"""A `.pte` in ExecuTorch's runtime (`executorch.runtime`), as an app runs it: batch 1, XNNPACK's threads.

XNNPACK's thread pool is one per process. Resetting it while a loaded program still points at it crashes the
next run, so the pool is resized only while no program is loaded; a runner records the count it got.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

_loaded: "weakref.WeakSet[Any]" = weakref.WeakSet()


def set_threads(n: int) -> int:
    """XNNPACK's thread count, changed to `n` when no program is loaded; the count in effect."""
    from executorch.extension.pybindings import portable_lib

    if n and portable_lib._threadpool_get_thread_count() != n and not len(_loaded):
        portable_lib._unsafe_reset_threadpool(n)
    return int(portable_lib._threadpool_get_thread_count())


class Program:
    """One loaded `.pte`: `run(x)` for one batch-1 input, every output of the method."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        from executorch.runtime import Runtime

        self.threads = set_threads(threads)
        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")
        _loaded.add(self)
        self.input_shape = tuple(self.method.metadata.input_tensor_meta(0).sizes())

    def run(self, x: np.ndarray) -> list[torch.Tensor]:
        return self.method.execute([torch.from_numpy(np.ascontiguousarray(x, np.float32))])
