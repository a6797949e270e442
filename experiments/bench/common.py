"""Timing and machine description shared by the benchmark sections."""

import os
import platform
import statistics
import time

import jax
import numpy as np


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # Warm-up: compilation and first run.
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {jax.device_count()}x {jax.devices()[0].device_kind}, jax {jax.__version__}"


def num_params(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def jax_cores() -> int:
    """CPUs XLA:CPU's thread pool spans: those this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
