"""Continual-learning summaries of an accuracy matrix: average accuracy, BWT, forgetting.

R[i, j] is the accuracy on task j after training on tasks 0..i (K tasks, K×K). In our runs the
rows come from probe histories: for two tasks, row 0 is the probe at step 0 (after A, before
B) and row 1 the last probe (after B); Exp 5 adds a row per task switch. Accuracies are
whatever the probe measured: the paper's readout accuracy by default (`readout_A`, ...).

  average accuracy  ACC = mean_j R[K-1, j]                                  (Lopez-Paz &
  backward transfer BWT = mean_{j<K-1} (R[K-1, j] − R[j, j])                 Ranzato 2017)
  forgetting        f_j = max_{j<=i<K-1} R[i, j] − R[K-1, j], for j < K-1  (Chaudhry et al.
                                                                             2018)

Forgetting's max starts at i = j: Chaudhry et al. write max over every earlier row, which in
their setting adds nothing (an untrained head scores near chance); with a readout, a task
can score well before it is trained on (transfer), and that is not knowledge that was lost.
For K = 2 the two definitions agree. Every statistic is computed per seed, then reported as
mean ± std over seeds (sample std, ddof=1; 0 for one seed), as in `l2r.report`, leaving out the
runs that diverged (`l2r.divergence`).
"""

from collections.abc import Sequence

import numpy as np

from l2r import divergence

READOUT = ("readout_A", "readout_B")  # Per-task probe metrics, in task order.


def average_accuracy(r_KxK) -> np.ndarray:
    """Mean accuracy over all tasks after the last one, mean_j R[K-1, j]; [..., K, K] -> [...]."""
    r = np.asarray(r_KxK, np.float64)
    return r[..., -1, :].mean(-1)


def backward_transfer(r_KxK) -> np.ndarray:
    """BWT = mean_{j<K-1} (R[K-1, j] − R[j, j]); negative = forgetting. [..., K, K] -> [...]."""
    r = np.asarray(r_KxK, np.float64)
    k = r.shape[-1]
    if k < 2:
        raise ValueError(f"backward transfer needs at least 2 tasks, got a {k}x{k} matrix.")
    j = np.arange(k - 1)
    return (r[..., -1, j] - r[..., j, j]).mean(-1)


def forgetting(r_KxK) -> np.ndarray:
    """Per earlier task j < K-1: max_{j<=i<K-1} R[i, j] − R[K-1, j]. [..., K, K] -> [..., K-1]."""
    r = np.asarray(r_KxK, np.float64)
    k = r.shape[-1]
    if k < 2:
        raise ValueError(f"forgetting needs at least 2 tasks, got a {k}x{k} matrix.")
    rows = np.arange(k - 1)[:, None]  # i
    cols = np.arange(k - 1)[None, :]  # j
    before = np.where(rows >= cols, r[..., : k - 1, : k - 1], -np.inf).max(-2)  # [..., K-1]
    return before - r[..., -1, : k - 1]


def accuracy_matrices(
    history, metrics: Sequence[str] = READOUT, task_ends: Sequence[int] | None = None
) -> np.ndarray:
    """Per-seed accuracy matrices from one method's probe history.

    Args:
      history: {metric: [S, P] array} (one entry of results["methods"]); column 0 is the probe
        before the first new task, the last column the end of the run.
      metrics: the per-task accuracy metric of each task 0..K-1 (default readout on A, B).
      task_ends: for each task i, the probe column at which training on it ends (row i of R).
        Default: column 0 for task 0 (pre-trained) and the last column for task 1; required
        for more than two tasks.

    Returns:
      R: float64 [S, K, K], R[s, i, j] = history[metrics[j]][s, task_ends[i]].
    """
    k = len(metrics)
    missing = [m for m in metrics if m not in history]
    if missing:
        raise ValueError(f"history has no {missing}; it has {sorted(history)}.")
    if task_ends is None:
        if k != 2:
            raise ValueError(f"{k} tasks: pass task_ends, the probe column where each task ends.")
        task_ends = (0, -1)
    if len(task_ends) != k:
        raise ValueError(
            f"task_ends={tuple(task_ends)} must give one column for each of {k} tasks."
        )
    acc_SxKxP = np.stack([np.atleast_2d(np.asarray(history[m], np.float64)) for m in metrics], 1)
    return np.moveaxis(acc_SxKxP[..., list(task_ends)], -1, 1)


def _mean_std(x_S: np.ndarray) -> tuple[float, float]:
    if not x_S.shape[0]:  # Every run diverged: no number to report.
        return float("nan"), float("nan")
    ddof = 1 if x_S.shape[0] > 1 else 0
    return float(x_S.mean(0)), float(x_S.std(0, ddof=ddof))


def summarize(
    results, metrics: Sequence[str] = READOUT, task_ends: Sequence[int] | None = None
) -> dict:
    """Continual-learning statistics of every method in `results`, mean ± std over the seeds
    whose runs did not diverge (`l2r.divergence`; (NaN, NaN) when none is left).

    Args:
      results: {"methods": {name: {metric: [S, P]}}, ...} as written by the experiments.
      metrics, task_ends: see `accuracy_matrices`.

    Returns:
      {method: {stat: (mean, std)}} with stats `before_<m>` (R[j, j]) and `after_<m>`
      (R[K-1, j]) for every task metric m, `forgetting_<m>` for every task but the last,
      `avg_acc` and `bwt`; accuracies as fractions.
    """
    out = {}
    dropped = divergence.dropped_rows(results)
    for name, history in results["methods"].items():
        r = divergence.kept(accuracy_matrices(history, metrics, task_ends), dropped.get(name, []))
        k = len(metrics)
        per_seed = {}
        for j, m in enumerate(metrics):
            per_seed[f"before_{m}"] = r[:, j, j]
            per_seed[f"after_{m}"] = r[:, -1, j]
        f = forgetting(r)
        for j, m in enumerate(metrics[: k - 1]):
            per_seed[f"forgetting_{m}"] = f[:, j]
        per_seed["avg_acc"] = average_accuracy(r)
        per_seed["bwt"] = backward_transfer(r)
        out[name] = {stat: _mean_std(v) for stat, v in per_seed.items()}
    return out


def _pct(stat: tuple[float, float]) -> str:
    mean, std = stat
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(
    results, metrics: Sequence[str] = READOUT, task_ends: Sequence[int] | None = None
) -> str:
    """Markdown table, one row per method: each earlier task's accuracy before → after and its
    forgetting, the last task's final accuracy, average accuracy and BWT (percent / points,
    mean ± std over seeds). Diverged runs are left out and counted in the method cell; a
    method whose every run diverged reads "diverged" throughout (`l2r.divergence`)."""
    stats = summarize(results, metrics, task_ends)
    dropped = divergence.dropped_rows(results)
    *earlier, last = metrics
    header = ["method"]
    for m in earlier:
        header += [f"{m} before → after (%)", f"forgetting {m} (pts)"]
    header += [f"{last} (%)", "avg acc (%)", "BWT (pts)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in stats.items():
        runs, gone = divergence.num_runs(results, name), len(dropped.get(name, []))
        row = [divergence.table_label(name, gone, runs)]
        if gone and gone >= runs:
            lines.append("| " + " | ".join(row + ["diverged"] * (len(header) - 1)) + " |")
            continue
        for m in earlier:
            row += [f"{_pct(s[f'before_{m}'])} → {_pct(s[f'after_{m}'])}"]
            row += [_pct(s[f"forgetting_{m}"])]
        row += [_pct(s[f"after_{last}"]), _pct(s["avg_acc"]), _pct(s["bwt"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
