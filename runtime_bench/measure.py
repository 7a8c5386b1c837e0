"""The measurement loop: cold start, warm-up, fixed count or time budget, peak memory."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from odconv_deploy.runners.base import Runner
from runtime_bench.stats import LatencyStats, summarize


@dataclass(frozen=True)
class MeasureSettings:
    """How long to measure: ``warmup`` runs, then ``iterations`` or until ``budget_s``.

    ``fresh_process`` runs each measurement (cold start, latency, peak memory) in a newly
    spawned interpreter, so caches, allocator state and memory peaks of earlier measurements
    cannot leak into it. Interleaved A/B rounds still run in this process.
    """

    warmup: int = 5
    iterations: int = 30
    budget_s: float | None = None
    min_iterations: int = 5
    fresh_process: bool = False


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (Linux VmHWM), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux), so the next peak is this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    """Cold start, latency samples and memory of one runner on one feed."""

    cold_start_s: float  # activate + first inference
    stats: LatencyStats
    peak_rss_mb: float | None
    process_id: int  # the process that measured


def measure(make_runner: Callable[[], Runner], feed: dict[str, np.ndarray],
            settings: MeasureSettings) -> Measurement:
    """Measure a fresh runner: cold start first, then warm latency.

    With ``settings.fresh_process`` the runner is built and measured in a spawned process
    (``make_runner`` and ``feed`` must then be picklable, as the bench backends are).
    """
    if settings.fresh_process:
        with ProcessPoolExecutor(max_workers=1,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_measure_here, make_runner, feed, settings).result()
    return _measure_here(make_runner, feed, settings)


def _measure_here(make_runner: Callable[[], Runner], feed: dict[str, np.ndarray],
                  settings: MeasureSettings) -> Measurement:
    reset_peak_rss()
    runner = make_runner()
    start = time.perf_counter()
    runner.activate()
    try:
        runner.infer(feed)
        cold = time.perf_counter() - start
        for _ in range(settings.warmup):
            runner.infer(feed)
        samples: list[float] = []
        deadline = time.perf_counter() + settings.budget_s if settings.budget_s else None
        while True:
            runner.infer(feed)
            samples.append(runner.last_inference_time)
            if deadline is not None:
                if time.perf_counter() >= deadline and len(samples) >= settings.min_iterations:
                    break
            elif len(samples) >= settings.iterations:
                break
    finally:
        runner.deactivate()
    return Measurement(cold, summarize(samples), peak_rss_mb(), os.getpid())


def interleaved(runner_a: Runner, runner_b: Runner, feed_a: dict[str, np.ndarray],
                feed_b: dict[str, np.ndarray], settings: MeasureSettings
                ) -> tuple[list[float], list[float]]:
    """A/B rounds: each round runs A once and B once (order alternating), both activated."""
    a_times, b_times = [], []
    with runner_a, runner_b:
        for _ in range(settings.warmup):
            runner_a.infer(feed_a)
            runner_b.infer(feed_b)
        for i in range(settings.iterations):
            pair = [(runner_a, feed_a, a_times), (runner_b, feed_b, b_times)]
            for runner, feed, sink in (pair if i % 2 == 0 else pair[::-1]):
                runner.infer(feed)
                sink.append(runner.last_inference_time)
    return a_times, b_times
