"""Jobs run in one forked worker process, beside the main process's own work.

Exports are single-threaded Python (torch.export, the converters' passes) and cannot share a process usefully:
torch.export and the converters keep global tracing state, so a second export on a thread would corrupt the first,
and the GIL would serialize them anyway. A forked child has its own interpreter and a copy of everything already
built (the quantized model), so a slow export runs on the second core while the main process exports and verifies
the other targets. The child is forked before the main process starts any thread of its own, computes with one
intra-op thread (no OpenMP team after fork), ignores Ctrl-C (the main process ends it on any interrupt or error)
and sends each job's result, or its error, back over a pipe. Linux only (`available`): macOS forbids fork after
its frameworks load and Windows has none, so there the jobs run in the main process, in order.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

Job = Callable[[], Any]


def available() -> bool:
    """Whether jobs can run in a forked worker here: Linux, the only thread of this process being the main one
    (a lock held by another thread at fork time would stay locked forever in the child), JAX not imported (its
    native threads: it warns that a fork after its import deadlocks; litert-torch's converter imports it, which a
    convert does only in the worker, or without one) and torch.distributed not running (its communication
    threads)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1 or "jax" in sys.modules:
        return False
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


class WorkerError(RuntimeError):
    """A job failed in the worker with an exception that could not be sent back as itself."""


def _child(jobs: list[tuple[str, Job]], conn: Any) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides, and ends this one
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    from .stages import timing

    for name, job in jobs:
        with timing(bars=False, lines=False) as clock:
            try:
                message: tuple[Any, ...] = ("ok", name, job(), dict(clock.seconds))
            except BaseException as exc:  # everything goes back to the main process, which decides what it is
                text = traceback.format_exc()
                try:
                    pickle.dumps(exc)
                    message = ("error", name, exc, text)
                except Exception:
                    message = ("error", name, WorkerError(f"{type(exc).__name__}: {exc}"), text)
        conn.send(message)
    conn.close()


class Worker:
    """One forked child running `jobs` (name, function) in order; `result(name)` waits for one of them."""

    def __init__(self, jobs: list[tuple[str, Job]]) -> None:
        from . import console

        for stream in (sys.stdout, sys.stderr, console.stdout(), console.stderr()):
            stream.flush()  # else the child would write the buffered text again
        context = multiprocessing.get_context("fork")
        self._conn, child_end = context.Pipe(duplex=False)
        self._process = context.Process(target=_child, args=(jobs, child_end), name="mnv4-export-worker",
                                        daemon=True)
        self._process.start()
        child_end.close()
        self.names = [name for name, _ in jobs]
        self._results: dict[str, tuple[Any, ...]] = {}

    def result(self, name: str) -> tuple[Any, dict[str, float]]:
        """The job's return value and its stages' seconds; its exception re-raised here when it failed."""
        while name not in self._results:
            try:
                message = self._conn.recv()
            except EOFError:
                code = self._process.exitcode if not self._process.is_alive() else None
                raise WorkerError(f"the export worker process ended before finishing '{name}' (exit code {code}; "
                                  "killed for memory?)") from None
            self._results[message[1]] = message
        kind, _, value, extra = self._results[name]
        if kind == "error":
            logger.debug("'%s' failed in the export worker:\n%s", name, extra)
            raise value
        return value, extra

    def close(self) -> None:
        """End the child (at once if it is still working: the run is over) and reap it."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._conn.close()


def _stop_tqdm_monitor() -> None:
    """tqdm's monitor thread (started by any library's progress bar, and idle) ended, and no new one started: it
    would be the second thread that keeps the worker from forking."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    std.tqdm.monitor_interval = 0
    monitor = std.tqdm.monitor
    if monitor is not None:
        monitor.exit()
        std.tqdm.monitor = None


def start(jobs: list[tuple[str, Job]]) -> Optional[Worker]:
    """A worker running `jobs`, or None where none can run (the caller runs them itself)."""
    if not jobs or os.environ.get("MNV4_DEPLOY_NO_WORKER"):
        return None
    _stop_tqdm_monitor()
    if not available():
        logger.debug("no export worker (threads: %s): exporting every target in this process",
                     ", ".join(t.name for t in threading.enumerate()))
        return None
    try:
        return Worker(jobs)
    except OSError as exc:  # no process to be had (memory, a process limit): the same work, one process
        logger.debug("no export worker (%s): exporting every target in this process", exc)
        return None
