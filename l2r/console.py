"""Console progress of long loops (pre-training, Task B, meta-training): rate and ETA, the
compiles left out of both."""

import math
import time
from collections.abc import Callable

import numpy as np
from absl import logging


def format_duration(seconds: float) -> str:
    """Formats seconds as e.g. '45s', '2m03s' or '1h02m03s'."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Console progress with rate and ETA, logged via absl at most every `interval_s` seconds.

    The rate (and so the ETA) counts compiled work only: the interval before the first update
    holds the first call's compilation, as does the one after `compiling()`, and both are left
    out of it ("?" until an interval is measured). `start`: units done before this process
    began (when resuming), where the count starts.
    """

    def __init__(
        self,
        total: int,
        name: str,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "steps",
        start: int = 0,
    ):
        self.total, self.name, self.interval_s, self.unit = total, name, interval_s, unit
        self._clock, self._done = clock, start
        self._last = self._last_log = clock()
        self._compiling = True  # The first call of a jitted step compiles it.
        self._units = self._seconds = 0.0  # Measured: work and time, compiling intervals out.

    def compiling(self, what: str) -> str:
        """Logs `[name] compiling <what>…` (the console is silent meanwhile, minutes at times)
        and leaves the interval up to the next update out of the rate; returns the line."""
        self._compiling = True
        line = f"[{self.name}] compiling {what}…"
        logging.info("%s", line)
        return line

    def update(self, done: int, **metrics) -> str | None:
        """Reports `done` units finished; returns the logged line, or None when throttled."""
        now = self._clock()
        if not self._compiling:
            self._units += done - self._done
            self._seconds += now - self._last
        self._compiling, self._done, self._last = False, done, now
        if done < self.total and now - self._last_log < self.interval_s:
            return None
        self._last_log = now
        rate = self._units / self._seconds if self._seconds > 0 else float("nan")
        eta = format_duration(max(self.total - done, 0) / rate) if rate > 0 else "?"
        # Slow loops (meta-training episodes) need significant digits, not one decimal.
        rate_str = "?" if math.isnan(rate) else f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"
        line = (
            f"[{self.name}] {done}/{self.total} ({100 * done // max(self.total, 1)}%) "
            f"{rate_str} {self.unit}/s, ETA {eta}"
        )
        line += "".join(
            f", {k}={v:.3f}" if isinstance(v, (float, np.floating)) else f", {k}={v}"
            for k, v in metrics.items()
        )
        logging.info("%s", line)
        return line
