"""Figures of an experiment's results: Fig.-1-style curves of every method (mean ± std over
seeds, diverged runs left out) and per-layer CKA at the last step, readable method and metric
names, the learned rule set apart, each figure as PNG and PDF. Uses `Figure` directly (Agg
canvas, no pyplot state)."""

import io
import os
import re

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from l2r import distributed, divergence, report

LEARNED = "learned"  # The meta-learned rule: set apart in every figure.
_DISPLAY_NAMES = {
    "sgd": "SGD",
    "teacher": "multi-task teacher",
    LEARNED: "learned rule (ours)",
    "lwf": "LwF",
    "ewc": "EWC",
    "hat": "HAT",
    "oml": "OML",
    "rep": "Rep",
}
# Probe metrics are named <kind>_<task> (readout_A, original_2, cka_1); the rest (loss) are not.
_METRIC_TITLES = {
    "readout": "Task {} readout accuracy",
    "original": "Task {} original head",
    "cka": "CKA to the pre-trained network, Task {}",
}
_LOSS_TITLE = "Task-B training loss"


def display_name(method: str) -> str:
    """How figures name `method`: "sgd" -> "SGD", "sgd_x0.1" -> "SGD (lr ×0.1)", "learned" ->
    "learned rule (ours)", "lwf" -> "LwF", ...; an unknown name comes back unchanged."""
    if method in _DISPLAY_NAMES:
        return _DISPLAY_NAMES[method]
    scaled = re.fullmatch(r"sgd_x(\d+(?:\.\d*)?|\.\d+)", method)
    return f"SGD (lr ×{scaled.group(1)})" if scaled else method


def metric_title(metric: str) -> str:
    """A panel title for `metric`: "readout_A" -> "Task A readout accuracy", "original_A" ->
    "Task A original head", "cka_A" -> "CKA to the pre-trained network, Task A"; an unknown
    name comes back unchanged."""
    kind, task = report.split_metric(metric)
    if task:
        return _METRIC_TITLES[kind].format(task)
    return _LOSS_TITLE if metric == "loss" else metric


def save_figure(fig: Figure, path: str) -> str:
    """Writes `fig` to `path` as a PNG and beside it as a PDF (`pdf_path`), both atomically, and
    returns the PNG's path. The PDF (vector, for papers) carries no creation date, so the same
    figure gives the same bytes."""
    if not distributed.is_main():  # Only process 0 writes: no need to render.
        return os.fspath(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
    report.write_atomic(pdf_path(path), buf.getvalue())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return report.write_atomic(path, buf.getvalue())


def pdf_path(png_path: str) -> str:
    """Where `save_figure` writes the PDF of the figure at `png_path`: the same stem, `.pdf`."""
    return os.path.splitext(os.fspath(png_path))[0] + ".pdf"


def method_styles(methods) -> dict[str, dict]:
    """The line style of each of `methods` in a figure, as `Axes.plot` keywords: colours by
    position among the baselines (tab10; tab20 past ten), and the learned rule set apart in
    black, thicker and drawn above them."""
    baselines = [m for m in methods if m != LEARNED]
    palette = matplotlib.colormaps["tab10" if len(baselines) <= 10 else "tab20"].colors
    styles = {m: {"color": palette[i % len(palette)], "lw": 1.5, "zorder": 2}
              for i, m in enumerate(baselines)}  # fmt: skip
    styles[LEARNED] = {"color": "black", "lw": 2.8, "zorder": 3}
    return {m: styles[m] for m in methods}


def band_alpha(num_methods: int, method: str = "") -> float:
    """The opacity of `method`'s ± std band among `num_methods`: lighter when more than four
    overlap, and half as opaque for the learned rule, whose black band would hide the others."""
    alpha = 0.15 if num_methods <= 4 else 0.07
    return alpha / 2 if method == LEARNED else alpha


def integer_ticks(axis) -> None:
    """Ticks `axis` (steps, episodes) at whole numbers only, at multiples of 1, 2 or 5 × 10^k."""
    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def draw_mean_std(ax, steps, x_SxP: np.ndarray, style: dict, label: str, alpha: float) -> Line2D:
    """Draws the mean over the rows of `x_SxP` against `steps` with a ± std band (`report.mean_std`)
    and returns the line; with no row left (every run diverged) it draws nothing and returns a
    dotted legend entry."""
    if not x_SxP.shape[0]:
        return Line2D([], [], color=style["color"], ls=":", label=label)
    mean, std = report.mean_std(x_SxP)
    (line,) = ax.plot(steps, mean, label=label, **style)
    ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=alpha, lw=0,
                    zorder=style["zorder"] - 1)  # fmt: skip
    return line


def curves_figure(results, metrics: list[str], ylabel: str) -> Figure:
    """One panel per metric of `metrics` (vs Task-B steps, sharing the y axis, titled by
    `metric_title`): one line per method with its mean over seeds, shaded ± std, and one legend
    beside the panels naming each method by `display_name`. Styles come from `method_styles`
    (a method keeps its colour across panels; the learned rule stands out). Diverged runs
    (`l2r.divergence`) are left out: the legend says "EWC (1/3 diverged)", or "EWC (diverged)"
    for a method with no run left, which gets a legend entry but no line."""
    steps = np.asarray(results["steps"])
    methods = list(results["methods"])
    styles = method_styles(methods)
    fig = Figure(figsize=(4.5 * len(metrics) + 2.0, 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    dropped = divergence.dropped_rows(results)
    lines = {}
    for ax, metric in zip(axes, metrics, strict=True):
        scale = 100.0 if report.is_percent(metric) else 1.0
        for method in methods:
            if metric not in results["methods"][method]:
                continue
            label = report.method_label(results, method, dropped, legend_label)
            x = scale * report.kept_metric(results, method, metric, dropped)
            alpha = band_alpha(len(methods), method)
            line = draw_mean_std(ax, steps, x, styles[method], label, alpha)
            if line.axes is not None or method not in lines:
                lines[method] = line
        ax.set(xlabel="Task B steps", title=metric_title(metric))
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    n_seeds = len(results["seeds"])
    fig.suptitle(f"{results.get('experiment', '')}: mean ± std over {n_seeds} seeds")
    handles = [lines[m] for m in methods if m in lines]  # Display order, whatever the panels.
    fig.legend(handles, [h.get_label() for h in handles], loc="outside right center",
               fontsize="small")  # fmt: skip
    return fig


def legend_label(method: str, num_dropped: int, num_runs: int) -> str:
    """A method's legend label: its `display_name` and, from `divergence.figure_label`, how many
    of its runs diverged ("EWC (1/3 diverged)")."""
    return divergence.figure_label(display_name(method), num_dropped, num_runs)


def layer_cka_figure(results, step=None) -> Figure:
    """Per-layer CKA at probe `step` (default: the last): one panel per reference of
    `results["layer_cka"]` (`report.layer_references`: to the pre-trained network, to the
    teacher), layers in network order along x, and per method its mean over seeds with ± std
    error bars, styled and labelled as `curves_figure` does. Runs left out of the tables
    (`report.layer_rows_dropped`) are left out here too."""
    refs = report.layer_references(results)
    layers = results["layer_cka"]["layers"]
    p = report.step_index(results, step)
    x = np.arange(len(layers))
    methods = list(results["methods"])
    styles = method_styles(methods)
    width = max(4.5, 0.3 * len(layers))
    fig = Figure(figsize=(width * len(refs) + 2.0, 4.5), layout="constrained")
    axes = fig.subplots(1, len(refs), sharey=True, squeeze=False)[0]
    dropped = divergence.dropped_rows(results)
    lines = {}
    for ax, ref in zip(axes, refs, strict=True):
        for method in methods:
            if method not in results["layer_cka"][ref]:
                continue
            label = report.method_label(results, method, dropped, legend_label)
            cka = report.kept_layer_cka(results, ref, method, dropped)[:, p]  # [S', L]
            style = styles[method]
            if cka.shape[0]:
                mean, std = report.mean_std(cka)
                lines[method] = ax.errorbar(x, mean, yerr=std, label=label, marker="o", ms=3,
                                            capsize=2, **style)  # fmt: skip
            elif method not in lines:  # Every run diverged: a legend entry, no line.
                lines[method] = Line2D([], [], color=style["color"], ls=":", label=label)
        ax.set(title=report.LAYER_REFERENCES[ref], xlabel="layer (input → head)")
        ax.set_xticks(x, layers, rotation=90 if len(layers) > 6 else 0, fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"linear CKA at step {results['steps'][p]}")
    n_seeds = len(results["seeds"])
    fig.suptitle(f"{results.get('experiment', '')}: per-layer CKA, mean ± std over {n_seeds} "
                 "seeds")  # fmt: skip
    handles = [lines[m] for m in methods if m in lines]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside right center",
               fontsize="small")  # fmt: skip
    return fig


def plot_layer_cka(results, workdir, prefix: str = "fig1") -> str | None:
    """`layer_cka_figure` as `{prefix}_layer_cka.png` with its PDF; returns the PNG's path, or
    None (nothing drawn) when `results` holds no per-layer CKA."""
    if not report.layer_references(results):
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"{prefix}_layer_cka.png")
    return save_figure(layer_cka_figure(results), path)


def plot_curves(results, workdir, prefix: str = "fig1") -> list[str]:
    """Plots Fig.-1-style curves (`curves_figure`) as PNGs, each with its PDF (`save_figure`):
    `{prefix}_task_A.png` and `{prefix}_task_B.png` (a Readout and an Original panel), when
    cka_* metrics exist `{prefix}_cka.png`, and when per-layer CKA was measured
    `{prefix}_layer_cka.png` (`plot_layer_cka`); returns the PNGs' paths. Uses `Figure`
    directly (Agg canvas, no pyplot state), so it is safe headless and in threads."""
    os.makedirs(workdir, exist_ok=True)
    metrics = report.metric_names(results)
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
    layer = plot_layer_cka(results, workdir, prefix)
    return paths + ([layer] if layer else [])
