"""The PyTorch simulation's logits that runtimes are verified against, computed while the targets export.

A target's export is mostly single-threaded Python (torch.export, the converters), and the simulation of the int8
model on the held-back images is tensor arithmetic that releases the GIL: started in a background thread as soon
as a target is known to need it, it runs on the core the export leaves idle, and verification waits for it only
if the export was faster. One computation per (model, semantics, images), shared by every target that deploys that
model. The graph is built in the calling thread (`QuantizedModel.simulator`); the thread only runs it, with the
process's intra-op thread count, which verification changes only after waiting for the result.
Only eager tensor ops may run beside an export: torch.export keeps process-wide tracing state (its exporting flag,
FX's current annotations, a patched nn.Module.__call__). Verification tried on a thread beside the exports failed
both ways: the tensor-by-tensor check broke an export (a KeyError in FX's annotations) and the CoreML executor ran
5x slower (each of its small ops waiting for the GIL). Slow exports go to a worker process instead (infra/worker.py).
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

Key = tuple[int, str, int]


class Simulations:
    """Per (model, semantics, image count): the simulation's logits, computed once, in the background if started."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._results: dict[Key, Any] = {}  # a Future while it runs in the background, else the logits
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()  # set by close(): a background computation stops at its next batch

    @staticmethod
    def _key(deployed: Any, semantics: Any, x: np.ndarray) -> Key:
        return (id(deployed), semantics.key, len(x))

    def start(self, deployed: Any, semantics: Any, x: np.ndarray) -> None:
        """Begin computing the logits of `deployed` under `semantics` on `x` in the background (once)."""
        key = self._key(deployed, semantics, x)
        if key in self._results:
            return
        run = deployed.simulator(semantics, self.batch)  # built here: the thread only runs tensor ops
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mnv4-simulation")
        self._results[key] = self._pool.submit(self._batches, run, x)

    def _batches(self, run: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """`run(x)` batch by batch (the same batches `run` makes itself, so the same numbers), stopping early
        when the run is over (an interrupted or failed convert does not wait for a simulation nobody reads)."""
        parts = []
        for i in range(0, len(x), self.batch):
            if self._stop.is_set():
                raise concurrent.futures.CancelledError
            parts.append(run(x[i:i + self.batch]))
        return np.concatenate(parts) if parts else run(x)

    def reference(self, deployed: Any, semantics: Any) -> Callable[[np.ndarray], np.ndarray]:
        """The logits for the images a runner is verified on: the background result when it was started for
        those images, else computed now (an emulator verified on a subset)."""
        def simulate(x: np.ndarray) -> np.ndarray:
            key = self._key(deployed, semantics, x)
            if key not in self._results:
                self._results[key] = deployed.simulate(x, self.batch, semantics)
            value = self._results[key]
            if isinstance(value, concurrent.futures.Future):
                value = self._results[key] = value.result()
            return value

        return simulate

    def close(self) -> None:
        """Drop work not started; a computation under way stops after its current batch and is discarded. Waits
        for that batch: the next run may fork an export worker, which needs this process to have one thread."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
