"""Named stages of a run: their wall time, and what the user sees while they run.

Every slow step of a run (loading, reading images, each PTQ algorithm, export, each part of verification) is a
`stage`. Times go into every manifest (`timings`) and, with `-v`, into a breakdown table at the end, so that a
slow conversion says where its time went. On a terminal a stage that is `shown` draws a transient progress bar
(a bar when it reports steps, else its elapsed time); elsewhere (CI logs) it writes one line when it ends.
Code deep in the pipeline opens stages without a handle passed down: they attach to the run's active clock
(`clock()`), and are plain timers when no clock is active (library use).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from . import console

logger = logging.getLogger(__name__)

SEPARATOR = "/"  # nested stage names: 'quantize/calibrate'
LINE_SECONDS = 1.0  # without progress bars, a shown stage that took this long gets a line when it ends


@dataclass
class Clock:
    """The stages of one run: {name: seconds}, in the order they started (a repeated name adds up)."""

    bars: bool = False  # draw progress bars (a terminal); else a line per shown stage as it ends
    lines: bool = True  # without bars, that line (a worker process's clock times its stages silently)
    seconds: dict[str, float] = field(default_factory=dict)
    _open: list[str] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def under(self, prefix: str) -> dict[str, float]:
        """The stages recorded under `prefix/`, with the prefix removed."""
        start = prefix + SEPARATOR
        return {k[len(start):]: round(v, 2) for k, v in self.seconds.items() if k.startswith(start)}

    def rounded(self, exclude_prefixes: tuple[str, ...] = ()) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()
                if not any(k == p or k.startswith(p + SEPARATOR) for p in exclude_prefixes)}

    def table(self) -> str:
        """Stage, seconds and share of the run's top-level time, nested stages indented."""
        total = sum(v for k, v in self.seconds.items() if SEPARATOR not in k) or 1.0
        width = max([len(k) for k in self.seconds] + [5])
        lines = [f"{'stage':{width}}  {'seconds':>8}  {'share':>6}"]
        tops = list(dict.fromkeys(k.split(SEPARATOR, 1)[0] for k in self.seconds))
        # each stage under its top-level stage, also when that one was reopened later (a target's latency)
        grouped = sorted(self.seconds.items(), key=lambda kv: tops.index(kv[0].split(SEPARATOR, 1)[0]))
        for name, s in grouped:
            depth = name.count(SEPARATOR)
            label = "  " * depth + name.rsplit(SEPARATOR, 1)[-1]
            lines.append(f"{label:{width}}  {s:8.2f}  {100 * s / total:5.1f}%")
        lines.append(f"{'total':{width}}  {total:8.2f}")
        return "\n".join(lines)


_active: contextvars.ContextVar[Optional[Clock]] = contextvars.ContextVar("mnv4_deploy_clock", default=None)


def clock() -> Optional[Clock]:
    """The active run's clock, if any."""
    return _active.get()


@contextlib.contextmanager
def timing(bars: bool = False, lines: bool = True) -> Iterator[Clock]:
    """Make a new clock the active one for the block."""
    c = Clock(bars=bars, lines=lines)
    token = _active.set(c)
    try:
        yield c
    finally:
        _active.reset(token)


@contextlib.contextmanager
def run_clock(bars: bool = False) -> Iterator[Clock]:
    """The active clock (a command that runs several pipeline steps opened it), or a new one for the block."""
    c = clock()
    if c is not None:
        yield c
        return
    with timing(bars) as c:
        yield c


class Progress:
    """What a stage's code reports: steps done (a bar when `total` is known)."""

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.reset(total=total)


class _Ticker(threading.Thread):
    """Redraws a bar that gets no steps (a converter call) twice a second, so its elapsed time moves."""

    def __init__(self, bar: Any) -> None:
        super().__init__(daemon=True)
        self.bar, self.done = bar, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.bar.refresh()


@contextlib.contextmanager
def stage(name: str, label: Optional[str] = None, total: Optional[int] = None, unit: str = "it",
          shown: bool = True) -> Iterator[Progress]:
    """Time the block as stage `name` (nested under the stage open around it).

    `label`: what the user reads ('[onnx] verifying in onnxruntime'); `shown`: whether this stage can take long
    enough (over a few seconds) to deserve a progress bar or a line of its own.
    """
    c = clock()
    full = SEPARATOR.join([*(c._open if c else []), name])
    label = label or name
    bar = None
    ticker = None
    if c is not None and c.bars and shown:
        from tqdm.auto import tqdm

        fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]" if total
               else "{desc}: {elapsed}")
        bar = tqdm(total=total, desc=label, unit=unit, leave=False, file=console.stderr(), bar_format=fmt,
                   dynamic_ncols=True)
        if not total:
            ticker = _Ticker(bar)
            ticker.start()
    if c is not None:
        c._open.append(name)
        c.seconds.setdefault(full, 0.0)  # the table lists stages in the order they started
    start = time.perf_counter()
    ok = False
    try:
        yield Progress(bar)
        ok = True
    finally:
        seconds = time.perf_counter() - start
        if c is not None:
            c._open.pop()
            c.add(full, seconds)
        if ticker is not None:
            ticker.done.set()
            ticker.join()
        if bar is not None:
            bar.close()
        if ok and c is not None and shown and not c.bars and c.lines and seconds >= LINE_SECONDS:
            logger.info(f"{label}: {seconds:.1f} s")
