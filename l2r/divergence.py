"""Diverged Task-B runs: found in a results dict, recorded, and left out of every mean.

A run (one method, one seed) has diverged when, after Task B has begun, its training loss or
any probed metric is NaN or ±inf: its parameters blew up (e.g. EWC with a coefficient past
SGD's stability limit) and its later accuracies are chance. Averaged in, such a run would
pass for a result ("20.0 ± 0.0"); instead the reports leave the whole run out of the method's
mean ± std and say so (`table_label`, `figure_label`).

The loss at probe column 0 is NaN by design (no step has run yet) and is not a divergence.
"""

import numpy as np
from absl import logging

LOSS = "loss"


def _curves(history, metric: str) -> np.ndarray:
    """`history[metric]` as float64 [S, P]; None (NaN or ±inf after a JSON round trip) -> NaN."""
    return np.atleast_2d(np.asarray(history[metric], dtype=np.float64))


def _recorded(history) -> list[str]:
    """The metrics `history` holds values of (a metric set to None was not recorded), the
    loss first."""
    names = [m for m, v in history.items() if v is not None]
    return sorted(names, key=lambda m: m != LOSS)


def _first_bad(history) -> list[tuple[int, int, str]]:
    """Per diverged run of one method: (row, probe column, first non-finite metric there)."""
    order = _recorded(history)
    if not order:
        return []
    bad = {m: ~np.isfinite(_curves(history, m)) for m in order}
    for m in order:
        bad[m][:, 0] = False  # Column 0 is before Task B: no loss yet, and not this method's.
    bad_SxP = np.logical_or.reduce([bad[m] for m in order])
    out = []
    for row in np.flatnonzero(bad_SxP.any(axis=1)):
        col = int(np.argmax(bad_SxP[row]))
        out.append((int(row), col, next(m for m in order if bad[m][row, col])))
    return out


def find_divergence(results) -> list[dict]:
    """Every diverged (method, seed) of `results` (see `l2r.report.write_report`).

    A run diverged at the first probe step p > 0 where its loss or any metric is non-finite.

    Returns:
      [{"method", "seed" (from results["seeds"]), "step" (from results["steps"]), "metric"
      (the first non-finite one at that step, the loss first)}], in the methods' display
      order, then by seed.
    """
    steps, seeds = results.get("steps"), results.get("seeds")
    entries = []
    for method, history in results["methods"].items():
        for row, col, metric in _first_bad(history):
            entries.append({
                "method": method,
                "seed": int(seeds[row]) if seeds is not None and row < len(seeds) else row,
                "step": int(steps[col]) if steps is not None and col < len(steps) else col,
                "metric": metric,
            })  # fmt: skip
    return entries


def diverged(results) -> list[dict]:
    """`results["diverged"]` (`mark_divergence`), or `find_divergence` for results without it
    (older results files, hand-made dicts)."""
    found = results.get("diverged")
    return find_divergence(results) if found is None else list(found)


def num_runs(results, method: str) -> int:
    """The number of runs (seeds) of `method`: the rows of its metric arrays."""
    names = _recorded(results["methods"][method])
    return _curves(results["methods"][method], names[0]).shape[0] if names else 0


def dropped_rows(results) -> dict[str, list[int]]:
    """{method: the rows of its [S, P] arrays that diverged}, for every method with one."""
    seeds = list(results.get("seeds") or [])
    rows = {}
    for entry in diverged(results):
        seed = entry["seed"]
        row = seeds.index(seed) if seed in seeds else int(seed)
        rows.setdefault(entry["method"], []).append(row)
    return {m: sorted(set(r)) for m, r in rows.items()}


def kept(x_SxP: np.ndarray, dropped: list[int]) -> np.ndarray:
    """The rows of `x_SxP` (one method's [S, P] metric) that did not diverge."""
    return np.delete(x_SxP, dropped, axis=0) if dropped else x_SxP


def table_label(method: str, num_dropped: int, num_runs: int) -> str:
    """The method cell of a table row: its name, and how many of its runs diverged."""
    if not num_dropped:
        return method
    if num_dropped >= num_runs:
        return f"{method} (diverged: {num_dropped}/{num_runs} seeds)"
    return f"{method} (diverged: {num_dropped}/{num_runs} seeds, left out)"


def figure_label(method: str, num_dropped: int, num_runs: int) -> str:
    """A method's legend label: its name, and how many of its runs diverged."""
    if not num_dropped:
        return method
    if num_dropped >= num_runs:
        return f"{method} (diverged)"
    return f"{method} ({num_dropped}/{num_runs} diverged)"


def _where(entries: list[dict]) -> str:
    """Where one method's runs diverged: "loss from step 40", or seed by seed when they
    differ."""
    places = list(dict.fromkeys((e["metric"], e["step"]) for e in entries))
    if len(places) == 1:
        return f"{places[0][0]} from step {places[0][1]}"
    return ", ".join(f"seed {e['seed']}: {e['metric']} from step {e['step']}" for e in entries)


def describe(results) -> list[str]:
    """One line per diverged method, e.g. "ewc seeds [0, 1, 2] of 3 (non-finite loss from
    step 40)"; none when no run diverged."""
    by_method = {}
    for entry in diverged(results):
        by_method.setdefault(entry["method"], []).append(entry)
    return [
        f"{method} seeds {[e['seed'] for e in entries]} of {num_runs(results, method)} "
        f"(non-finite {_where(entries)})"
        for method, entries in by_method.items()
    ]


def mark_divergence(results):
    """Sets `results["diverged"]` (`find_divergence`), logs a warning per diverged method, and
    returns `results`. Run it before reporting, so that results.json records what the tables
    and figures leave out."""
    results["diverged"] = find_divergence(results)
    for line in describe(results):
        logging.warning("Task B diverged: %s; these runs are left out of the means.", line)
    return results
