"""The one statistic of every benchmark: the median of its timed runs after warm-up, with the
fastest and the slowest run beside it, so a reader sees the spread a shared machine adds.
Rates (sentences/s, tokens/s, GFLOP/s) and ratios are computed from medians."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np


def summary(values: Iterable[float], digits: int = 4) -> dict[str, float]:
    """{"median", "min", "max"} of per-run figures (seconds, or a rate), each to `digits`
    significant digits (milliseconds and minutes alike)."""
    values = np.asarray(list(values), np.float64)
    if not values.size:
        raise ValueError("no timed runs to summarise; ask for at least one.")
    return {name: float(f"{value:.{digits}g}") for name, value in
            (("median", np.median(values)), ("min", values.min()), ("max", values.max()))}


def run_times(run: Callable[[], object], runs: int, warm_up: int = 1) -> tuple[list[float], object]:
    """Seconds of each of `runs` calls of `run` after `warm_up` untimed ones (compilation,
    caches), and the last call's result. `run` must wait for its result (block_until_ready)."""
    result = None
    for _ in range(warm_up):
        result = run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def interleaved_run_times(runs_by_name: dict[str, Callable[[], object]], runs: int
                          ) -> dict[str, tuple[list[float], object]]:
    """`run_times` of several functions taking turns: each is warmed up once, then each round
    times every function once, so a shared machine's drifting load hits them all alike."""
    results = {name: run() for name, run in runs_by_name.items()}
    times = {name: [] for name in runs_by_name}
    for _ in range(runs):
        for name, run in runs_by_name.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], results[name]) for name in runs_by_name}
