"""How long one call of an artifact's runtime takes: wall-clock median and p90 after warm-up, with the threads
the runtime computed with (only a runner whose numbers are `measured` is timed)."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np


@dataclass
class Latency:
    batch: int
    median_ms: float
    p90_ms: float
    runs: int
    threads: Any = None  # the runtime's intra-op threads, or what decides them
    input_shape: Optional[list[int]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(fn: Callable[[np.ndarray], Any], x: np.ndarray, warmup: int = 5, runs: int = 30,
                    threads: Any = None) -> Latency:
    """Wall-clock latency of one call on `x` (after warm-up): median and p90 in milliseconds."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return Latency(len(x), round(statistics.median(times), 4), round(times[int(0.9 * (len(times) - 1))], 4),
                   runs, threads, list(x.shape))
