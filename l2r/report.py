"""Reporting: turns an experiment's results dict into JSON, markdown, plots and TensorBoard.

The runner produces a results dict (see `write_report`) whose per-method metrics are arrays of
shape [S, P]: S seeds by P probe steps. Accuracies are fractions in [0, 1] and are shown in
percent; every statistic is mean ± std over seeds.
"""

import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping

import matplotlib
import numpy as np
from absl import logging
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from l2r import cl_metrics, distributed, divergence
from l2r import workdir as workdir_lib

# Metrics with these prefixes are accuracies in [0, 1], displayed in percent.
_PERCENT_PREFIXES = ("readout_", "original_")


def to_jsonable(obj):
    """Recursively converts numpy/jax arrays and scalars to lists/floats; NaN and ±inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, type(None))):
        return obj
    if hasattr(obj, "__array__"):  # numpy and jax arrays and numpy scalars alike.
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float):
        # Strict JSON has no NaN/Infinity; null keeps the file readable by any parser.
        return obj if math.isfinite(obj) else None
    return obj


def write_atomic(path, data: bytes) -> str:
    """Writes `data` to `path` through a temp file in the same dir: never leaves half a file.

    Every artefact goes through here (see `l2r.workdir.write_atomic`): readable by others under
    the usual umask, and written by process 0 alone in a multi-process run.
    """
    return workdir_lib.write_atomic(path, data)


def write_results_json(results, workdir) -> str:
    """Writes `config.json` (from `results["config"]`) and then `results.json`, atomically, and
    returns the latter's path. Call it last of all a run's artefacts: a workdir with
    `results.json` is finished (`l2r.workdir`), so a run killed before it is rerun to the end.

    Results being replaced (`--overwrite`) are removed first, so `config.json` never describes
    a run that `results.json` does not hold.
    """
    os.makedirs(workdir, exist_ok=True)
    text = json.dumps(to_jsonable(results), indent=2, allow_nan=False)
    path = os.path.join(workdir, workdir_lib.RESULTS_FILE)
    if distributed.is_main() and os.path.exists(path):
        os.unlink(path)
    if "config" in results:
        workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), results["config"])
    return write_atomic(path, text.encode())


def _metric(results, method: str, name: str) -> np.ndarray:
    """Returns metric `name` of `method` as a float array [S, P] (a lone curve [P] gets S=1)."""
    return np.atleast_2d(np.asarray(results["methods"][method][name], dtype=np.float64))


def _kept_metric(results, method: str, name: str, dropped: dict) -> np.ndarray:
    """`_metric` over the runs that did not diverge; `dropped`: `divergence.dropped_rows`."""
    return divergence.kept(_metric(results, method, name), dropped.get(method, []))


def _label(results, method: str, dropped: dict, label: Callable) -> str:
    """`method` as `label` (`divergence.table_label` or `figure_label`) names it."""
    return label(method, len(dropped.get(method, [])), divergence.num_runs(results, method))


def _mean_std(x_SxP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1; 0 with a single seed) over the seed axis."""
    ddof = 1 if x_SxP.shape[0] > 1 else 0
    return x_SxP.mean(axis=0), x_SxP.std(axis=0, ddof=ddof)


def _is_percent(metric: str) -> bool:
    return metric.startswith(_PERCENT_PREFIXES)


def _fmt(mean: float, std: float, percent: bool) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def _cell(x_Sx1: np.ndarray, percent: bool) -> str:
    """Mean ± std of one probe step's values over the kept runs; "diverged" when none is left."""
    if not x_Sx1.shape[0]:
        return "diverged"
    mean, std = _mean_std(x_Sx1)
    return _fmt(mean[0], std[0], percent)


def _metric_names(results) -> list[str]:
    """All metric names over all methods, in first-seen order."""
    names = {}
    for metrics in results["methods"].values():
        names.update(dict.fromkeys(metrics))
    return list(names)


def _step_index(results, step) -> int:
    steps = list(results["steps"])
    if step is None:
        return len(steps) - 1
    if step not in steps:
        raise ValueError(f"step {step} is not a probe step; probe steps are {steps}")
    return steps.index(step)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results, step=None) -> str:
    """Markdown table of every metric per method at probe `step` (default: the last one).

    Besides the raw metrics, `forgetting_A` (and `forgetting_orig_A`) is the drop in readout_A
    (original_A) accuracy from the first probe step to `step`, in points, as mean ± std of the
    per-seed differences. Runs that diverged (`l2r.divergence`) are left out of every cell, and
    the method cell says how many; a method whose every run diverged reads "diverged".
    """
    p = _step_index(results, step)
    metrics = _metric_names(results)
    derived = [
        (m, f)
        for m, f in [("readout_A", "forgetting_A"), ("original_A", "forgetting_orig_A")]
        if m in metrics
    ]
    header = ["method"] + [f"{m} (%)" if _is_percent(m) else m for m in metrics]
    header += [f"{f} (pts)" for _, f in derived]
    dropped = divergence.dropped_rows(results)
    rows = []
    for method, values in results["methods"].items():
        row = [_label(results, method, dropped, divergence.table_label)]
        for m in metrics:
            if m not in values:
                row.append("—")
                continue
            x = _kept_metric(results, method, m, dropped)
            row.append(_cell(x[:, p : p + 1], _is_percent(m)))
        for m, _ in derived:
            if m not in values:
                row.append("—")
                continue
            x = _kept_metric(results, method, m, dropped)
            row.append(_cell(x[:, :1] - x[:, p : p + 1], percent=True))
        rows.append(row)
    n_seeds = len(results.get("seeds", []))
    left_out = ", less the diverged runs," if dropped else ""
    note = (
        f"Step {results['steps'][p]}; mean ± std over {n_seeds} seeds{left_out} "
        "(sample std, ddof=1); accuracies and forgetting in percent / points."
    )
    return note + "\n\n" + _table(header, rows)


def curves_table(results, metric: str) -> str:
    """Markdown table of `metric`: rows are probe steps, columns are methods, mean ± std over
    the runs that did not diverge (the column header says how many did; see `summary_table`)."""
    methods = [m for m, v in results["methods"].items() if metric in v]
    dropped = divergence.dropped_rows(results)
    runs = [_kept_metric(results, m, metric, dropped) for m in methods]
    rows = [
        [str(s)] + [_cell(x[:, i : i + 1], _is_percent(metric)) for x in runs]
        for i, s in enumerate(results["steps"])
    ]
    header = ["step"] + [_label(results, m, dropped, divergence.table_label) for m in methods]
    unit = " (%)" if _is_percent(metric) else ""
    return f"**{metric}{unit}**\n\n" + _table(header, rows)


def write_markdown(results, workdir, title=None) -> str:
    """Writes `<workdir>/results.md`: title, setup line, summary table and accuracy curves."""
    os.makedirs(workdir, exist_ok=True)
    steps, seeds = list(results["steps"]), list(results.get("seeds", []))
    title = title or f"l2r results: {results.get('experiment', 'experiment')}"
    setup = (
        f"Experiment `{results.get('experiment')}`, preset `{results.get('preset')}`, "
        f"{len(seeds)} seeds {seeds}, {len(steps)} probe steps from {steps[0]} to {steps[-1]}."
    )
    parts = [f"# {title}", setup]
    gone = divergence.describe(results)
    if gone:
        parts.append("**Diverged**, left out of every mean ± std below: " + "; ".join(gone) + ".")
    parts += ["## Summary", summary_table(results)]
    if all(m in _metric_names(results) for m in cl_metrics.READOUT):
        parts += [
            "## Continual-learning view (readout accuracy; rows: before / after Task B)",
            cl_metrics.markdown_table(results),
        ]
    parts.append("## Curves")
    metrics = _metric_names(results)
    parts += [
        curves_table(results, m) for m in ("readout_A", "original_A", "readout_B") if m in metrics
    ]
    return write_atomic(os.path.join(workdir, "results.md"), ("\n\n".join(parts) + "\n").encode())


def save_figure(fig: Figure, path: str) -> str:
    """Writes `fig` to `path` as a PNG (atomically) and returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return write_atomic(path, buf.getvalue())


def curves_figure(results, metrics: list[str], ylabel: str) -> Figure:
    """One panel per metric of `metrics` (vs Task-B steps, sharing the y axis): one line per
    method with its mean over seeds, shaded ± std, and one legend beside the panels. Each
    method's colour is fixed by its position in `results["methods"]`. Diverged runs
    (`l2r.divergence`) are left out: the legend says "ewc (1/3 diverged)", or "ewc (diverged)"
    for a method with no run left, which gets a legend entry but no line."""
    steps = np.asarray(results["steps"])
    methods = list(results["methods"])
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    fig = Figure(figsize=(4.5 * len(metrics) + 1.5, 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    dropped = divergence.dropped_rows(results)
    lines = {}
    for ax, metric in zip(axes, metrics, strict=True):
        scale = 100.0 if _is_percent(metric) else 1.0
        for i, method in enumerate(methods):
            if metric not in results["methods"][method]:
                continue
            colour = palette[i % len(palette)]
            label = _label(results, method, dropped, divergence.figure_label)
            x = _kept_metric(results, method, metric, dropped)
            if not x.shape[0]:  # Nothing to draw, but the legend still names the method.
                lines.setdefault(method, Line2D([], [], color=colour, ls=":", label=label))
                continue
            mean, std = (scale * a for a in _mean_std(x))
            (lines[method],) = ax.plot(steps, mean, color=colour, label=label)
            ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
        ax.set(xlabel="Task B steps", title=metric)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{results.get('experiment', '')}: mean ± std over {len(results['seeds'])} seeds")
    labels = [line.get_label() for line in lines.values()]
    fig.legend(list(lines.values()), labels, loc="outside right center", fontsize="small")
    return fig


def plot_curves(results, workdir, prefix: str = "fig1") -> list[str]:
    """Plots Fig.-1-style curves (`curves_figure`) as PNGs: `{prefix}_task_A.png` and
    `{prefix}_task_B.png` (a Readout and an Original panel) and, when cka_* metrics exist,
    `{prefix}_cka.png`. Uses `Figure` directly (Agg canvas, no pyplot state), so it is safe
    headless and in threads."""
    os.makedirs(workdir, exist_ok=True)
    metrics = _metric_names(results)
    figures = {
        "task_A": (["readout_A", "original_A"], "Task A accuracy (%)"),
        "task_B": (["readout_B", "original_B"], "Task B accuracy (%)"),
        "cka": ([m for m in metrics if m.startswith("cka_")], "CKA to the pre-trained network"),
    }
    paths = []
    for name, (wanted, ylabel) in figures.items():
        present = [m for m in wanted if m in metrics]
        if present:
            fig = curves_figure(results, present, ylabel)
            paths.append(save_figure(fig, os.path.join(workdir, f"{prefix}_{name}.png")))
    return paths


class ScalarWriter:
    """Writes TensorBoard scalars with tensorboardX; usable as a context manager.

    Outside process 0 of a multi-process run it writes nothing (and creates no event file).
    """

    def __init__(self, logdir):
        self._writer = None
        if distributed.is_main():
            from tensorboardX import SummaryWriter  # Lazy: only runs that log pay the import.

            self._writer = SummaryWriter(logdir=os.fspath(logdir))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_curves_to_tensorboard(results, logdir) -> None:
    """Logs the seed-mean of every method/metric at each probe step, tagged `<method>/<metric>`,
    over the runs that did not diverge (`l2r.divergence`); a method with none is not logged."""
    dropped = divergence.dropped_rows(results)
    means = {}
    for method, values in results["methods"].items():
        for metric in values:
            x = _kept_metric(results, method, metric, dropped)
            if x.shape[0]:
                means[f"{method}/{metric}"] = _mean_std(x)[0]
    with ScalarWriter(logdir) as writer:
        for i, step in enumerate(results["steps"]):
            # Undefined points (the training loss before any step) are left out, not logged NaN.
            writer.write(step, {t: m[i] for t, m in means.items() if np.isfinite(m[i])})


def _format_duration(seconds: float) -> str:
    """Formats seconds as e.g. '45s', '2m03s' or '1h02m03s'."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Console progress with rate and ETA, logged via absl at most every `interval_s` seconds.

    The rate is averaged over the whole run since construction; `start` excludes work done
    before this process began (e.g. when resuming) from it.
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
        self._clock, self._start = clock, start
        self._t0 = self._last_log = clock()

    def update(self, done: int, **metrics) -> str | None:
        """Reports `done` units finished; returns the logged line, or None when throttled."""
        now = self._clock()
        if done < self.total and now - self._last_log < self.interval_s:
            return None
        self._last_log = now
        elapsed = now - self._t0
        rate = (done - self._start) / elapsed if elapsed > 0 else float("nan")
        eta = _format_duration(max(self.total - done, 0) / rate) if rate > 0 else "?"
        # Slow loops (meta-training episodes) need significant digits, not one decimal.
        rate_str = f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"
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


def write_artefacts(results, workdir, prefix: str = "fig1") -> dict[str, str]:
    """Writes every artefact of `results` but `results.json` into `workdir`; returns
    {artefact: path}: `markdown` (results.md), `tensorboard` (tb/) and one entry per PNG, keyed
    by its file stem (e.g. `fig1_task_A`)."""
    os.makedirs(workdir, exist_ok=True)
    artefacts = {"markdown": write_markdown(results, workdir)}
    for path in plot_curves(results, workdir, prefix=prefix):
        artefacts[os.path.splitext(os.path.basename(path))[0]] = path
    tb_dir = os.path.join(os.fspath(workdir), "tb")
    write_curves_to_tensorboard(results, tb_dir)
    artefacts["tensorboard"] = tb_dir
    return artefacts


def write_report(results, workdir, prefix: str = "fig1") -> dict[str, str]:
    """Writes every artefact of `results` into `workdir`, `results.json` (key `json`) last, and
    returns {artefact: path} (see `write_artefacts`).

    `results` holds "experiment", "preset", "config" (plain dict), "steps" (probe steps [P]),
    "seeds" [S], "methods" ({method: {metric: [S, P] array}}, display order) and "timing".
    """
    artefacts = write_artefacts(results, workdir, prefix)
    return {"json": write_results_json(results, workdir), **artefacts}
