"""Reporting: turns an experiment's results dict into JSON, CSV, markdown, figures (`l2r.plots`)
and TensorBoard.

The runner produces a results dict (see `write_report`) whose per-method metrics are arrays of
shape [S, P]: S seeds by P probe steps, and whose per-layer CKA (`layer_cka`, when measured) is
[S, P, L] per method and reference. Accuracies are fractions in [0, 1] and are shown in
percent; every statistic is mean ± std over seeds.
"""

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping

import numpy as np

from l2r import cl_metrics, distributed, divergence, tracking
from l2r import workdir as workdir_lib

# Metrics with these prefixes are accuracies in [0, 1], displayed in percent.
_PERCENT_PREFIXES = ("readout_", "original_")

# The version of results.json's and results.csv's layout, stored in results.json as "schema";
# raised when a field is renamed or changes meaning (adding a field does not raise it).
RESULTS_SCHEMA = 1
CSV_FILE = "results.csv"
PROBE_KINDS = ("readout", "original", "cka")  # Probe metrics are named <kind>_<task>.
CSV_COLUMNS = ("experiment", "preset", "method", "seed", "step", "task", "metric", "value",
               "diverged", "layer")  # fmt: skip
# Per-layer CKA (results.json's `layer_cka`) in results.csv: metric names by reference.
LAYER_CKA_METRICS = {"to_pretrained": "layer_cka_pretrained", "to_teacher": "layer_cka_teacher"}


def split_metric(metric: str) -> tuple[str, str]:
    """(kind, task) of a metric name: "readout_A" -> ("readout", "A"), "cka_1" -> ("cka", "1"),
    "loss" -> ("loss", ""); a name that is not <probe kind>_<task> is its own kind, task ""."""
    kind, sep, task = metric.partition("_")
    return (kind, task) if sep and task and kind in PROBE_KINDS else (metric, "")


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
    """Writes `config.json` (from `results["config"]`) and then `results.json` (with
    `"schema": RESULTS_SCHEMA` first), atomically, and returns the latter's path. Call it last
    of all a run's artefacts: a workdir with
    `results.json` is finished (`l2r.workdir`), so a run killed before it is rerun to the end.

    Results being replaced (`--overwrite`) are removed first, so `config.json` never describes
    a run that `results.json` does not hold.
    """
    os.makedirs(workdir, exist_ok=True)
    versioned = {"schema": RESULTS_SCHEMA, **results}
    versioned["schema"] = RESULTS_SCHEMA  # First in the file; this layout's version wins.
    text = json.dumps(to_jsonable(versioned), indent=2, allow_nan=False)
    path = os.path.join(workdir, workdir_lib.RESULTS_FILE)
    if distributed.is_main() and os.path.exists(path):
        os.unlink(path)
    if "config" in results:
        workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), results["config"])
    return write_atomic(path, text.encode())


def _metric(results, method: str, name: str) -> np.ndarray:
    """Returns metric `name` of `method` as a float array [S, P] (a lone curve [P] gets S=1)."""
    return np.atleast_2d(np.asarray(results["methods"][method][name], dtype=np.float64))


def kept_metric(results, method: str, name: str, dropped: dict) -> np.ndarray:
    """`_metric` over the runs that did not diverge; `dropped`: `divergence.dropped_rows`."""
    return divergence.kept(_metric(results, method, name), dropped.get(method, []))


def method_label(results, method: str, dropped: dict, label: Callable) -> str:
    """`method` as `label` (`divergence.table_label` or `legend_label`) names it."""
    return label(method, len(dropped.get(method, [])), divergence.num_runs(results, method))


def mean_std(x_SxP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1; 0 with a single seed) over the seed axis."""
    ddof = 1 if x_SxP.shape[0] > 1 else 0
    return x_SxP.mean(axis=0), x_SxP.std(axis=0, ddof=ddof)


def is_percent(metric: str) -> bool:
    return metric.startswith(_PERCENT_PREFIXES)


def _fmt(mean: float, std: float, percent: bool) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def _cell(x_Sx1: np.ndarray, percent: bool) -> str:
    """Mean ± std of one probe step's values over the kept runs; "diverged" when none is left."""
    if not x_Sx1.shape[0]:
        return "diverged"
    mean, std = mean_std(x_Sx1)
    return _fmt(mean[0], std[0], percent)


def metric_names(results) -> list[str]:
    """All metric names over all methods, in first-seen order."""
    names = {}
    for metrics in results["methods"].values():
        names.update(dict.fromkeys(metrics))
    return list(names)


def step_index(results, step) -> int:
    """The column of probe `step` in `results`' [S, P] arrays (None: the last)."""
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
    p = step_index(results, step)
    metrics = metric_names(results)
    derived = [
        (m, f)
        for m, f in [("readout_A", "forgetting_A"), ("original_A", "forgetting_orig_A")]
        if m in metrics
    ]
    header = ["method"] + [f"{m} (%)" if is_percent(m) else m for m in metrics]
    header += [f"{f} (pts)" for _, f in derived]
    dropped = divergence.dropped_rows(results)
    rows = []
    for method, values in results["methods"].items():
        row = [method_label(results, method, dropped, divergence.table_label)]
        for m in metrics:
            if m not in values:
                row.append("—")
                continue
            x = kept_metric(results, method, m, dropped)
            row.append(_cell(x[:, p : p + 1], is_percent(m)))
        for m, _ in derived:
            if m not in values:
                row.append("—")
                continue
            x = kept_metric(results, method, m, dropped)
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
    runs = [kept_metric(results, m, metric, dropped) for m in methods]
    rows = [
        [str(s)] + [_cell(x[:, i : i + 1], is_percent(metric)) for x in runs]
        for i, s in enumerate(results["steps"])
    ]
    header = ["step"] + [method_label(results, m, dropped, divergence.table_label) for m in methods]
    unit = " (%)" if is_percent(metric) else ""
    return f"**{metric}{unit}**\n\n" + _table(header, rows)


# results["layer_cka"]'s references (`l2r.compare`), as the report names them.
LAYER_REFERENCES = {
    "to_pretrained": "CKA to the pre-trained network",
    "to_teacher": "CKA to the multi-task teacher",
}


def layer_references(results) -> list[str]:
    """The references of `results["layer_cka"]` that hold values, in `LAYER_REFERENCES` order;
    [] when per-layer CKA was not measured."""
    layer = results.get("layer_cka") or {}
    return [r for r in LAYER_REFERENCES if layer.get(r)]


def layer_rows_dropped(results, reference: str, method: str, dropped: dict) -> list[int]:
    """The runs of `method` that per-layer CKA to `reference` leaves out: those that diverged
    and, for CKA to the teacher, those whose teacher run (same seed) diverged."""
    rows = set(dropped.get(method, []))
    if reference == "to_teacher":
        rows |= set(dropped.get("teacher", []))
    return sorted(rows)


def kept_layer_cka(results, reference: str, method: str, dropped: dict) -> np.ndarray:
    """Per-layer CKA of `method` to `reference` as float [S', P, L] over the runs kept
    (`layer_rows_dropped`); NaN where undefined (null in results.json)."""
    x = np.asarray(results["layer_cka"][reference][method], dtype=np.float64)
    return divergence.kept(x, layer_rows_dropped(results, reference, method, dropped))


def layer_cka_table(results, reference: str, step=None) -> str:
    """Markdown table of per-layer CKA to `reference` ("to_pretrained" or "to_teacher") at
    probe `step` (default: the last): a row per layer in network order, a column per method,
    mean ± std over the runs kept (`layer_rows_dropped`; the column says how many of the
    method's own diverged, as `curves_table`)."""
    p = step_index(results, step)
    layer = results["layer_cka"]
    methods = list(layer[reference])
    dropped = divergence.dropped_rows(results)
    values = [kept_layer_cka(results, reference, m, dropped)[:, p] for m in methods]  # [S', L]
    rows = [[f"`{name}`"] + [_cell(x[:, i : i + 1], percent=False) for x in values]
            for i, name in enumerate(layer["layers"])]  # fmt: skip
    header = ["layer"] + [method_label(results, m, dropped, divergence.table_label)
                          for m in methods]  # fmt: skip
    return f"**{LAYER_REFERENCES[reference]}**\n\n" + _table(header, rows)


def layer_cka_sections(results, step=None) -> list[str]:
    """The markdown parts of per-layer CKA at probe `step` (default: the last): a heading, what
    is measured, and a `layer_cka_table` per reference; [] when it was not measured."""
    refs = layer_references(results)
    if not refs:
        return []
    p = step_index(results, step)
    note = (
        f"Step {results['steps'][p]}; linear CKA of each layer's output averaged over space "
        "(per channel), on the first task's test images, to the method's own start network "
        "(the pre-trained one but for methods with their own start) and to the multi-task "
        "teacher at the same step and seed; layers in network order; mean ± std over seeds, "
        "less the diverged runs (and, to the teacher, the seeds whose teacher run diverged)."
    )
    return ["## Per-layer CKA", note, *(layer_cka_table(results, r, step) for r in refs)]


def write_markdown(results, workdir, title=None) -> str:
    """Writes `<workdir>/results.md`: title, setup line, summary table, per-layer CKA (when
    measured) and accuracy curves."""
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
    if all(m in metric_names(results) for m in cl_metrics.READOUT):
        parts += [
            "## Continual-learning view (readout accuracy; rows: before / after Task B)",
            cl_metrics.markdown_table(results),
        ]
    parts += layer_cka_sections(results)
    parts.append("## Curves")
    metrics = metric_names(results)
    parts += [
        curves_table(results, m) for m in ("readout_A", "original_A", "readout_B") if m in metrics
    ]
    return write_atomic(os.path.join(workdir, "results.md"), ("\n\n".join(parts) + "\n").encode())


def results_rows(results) -> list[dict]:
    """`results` in long ("tidy") form: one row per method, seed, probe step and metric, with
    the keys `CSV_COLUMNS`, in method (display) order, then seed, step and metric.

    `metric` and `task` split a results.json key (`split_metric`): readout_A is metric "readout",
    task "A"; the loss has task "". `value` is as stored: accuracies are fractions in [0, 1],
    NaN where undefined (the loss at step 0). `seed` is `results["seeds"]`' entry (a run index
    when several meta-test tasks are merged). `diverged` is True for every row of a run that
    `l2r.divergence` leaves out of the means. `layer` is "" but for per-layer CKA
    (`LAYER_CKA_METRICS`, from `results["layer_cka"]`): the unit layer's path, with `task` the
    first task, on whose test images it is measured.
    """
    seeds, steps = list(results.get("seeds") or []), list(results["steps"])
    dropped = divergence.dropped_rows(results)
    head = {k: str(results.get(k, "")) for k in ("experiment", "preset")}
    rows = []
    for method, history in results["methods"].items():
        names = [m for m, v in history.items() if v is not None]
        arrays = {m: _metric(results, method, m) for m in names}
        gone = set(dropped.get(method, []))
        for s in range(divergence.num_runs(results, method)):
            seed = int(seeds[s]) if s < len(seeds) else s
            for p, step in enumerate(steps):
                for m in names:
                    metric, task = split_metric(m)
                    rows.append({
                        **head, "method": method, "seed": seed, "step": int(step), "task": task,
                        "metric": metric, "value": float(arrays[m][s, p]), "diverged": s in gone,
                        "layer": "",
                    })  # fmt: skip
                rows += _layer_rows(results, method, s, seed, p, int(step), s in gone, head)
    return rows


def _layer_rows(results, method, s, seed, p, step, gone, head) -> list[dict]:
    """The per-layer CKA rows of one method, run and probe step (none without `layer_cka`)."""
    lc = results.get("layer_cka")
    if not lc:
        return []
    first = next((split_metric(m)[1] for m in results["methods"][method]
                  if split_metric(m)[0] == "readout"), "")  # fmt: skip
    rows = []
    for ref, metric in LAYER_CKA_METRICS.items():
        values = lc.get(ref, {}).get(method)
        if values is None or len(values) == 0:
            continue
        x = np.asarray(values, np.float64)
        for li, layer in enumerate(lc["layers"]):
            rows.append({**head, "method": method, "seed": seed, "step": step, "task": first,
                         "metric": metric, "value": float(x[s, p, li]), "diverged": gone,
                         "layer": str(layer)})  # fmt: skip
    return rows


def _csv_field(value) -> str:
    """A field as results.csv holds it: floats as their shortest exact repr, NaN as an empty
    field (results.json's null), ±inf as inf / -inf, booleans as 1 / 0."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(results, workdir) -> str:
    """Writes `<workdir>/results.csv` (`results_rows`, header `CSV_COLUMNS`) atomically and
    returns its path. Read it with `load_results`, or `pandas.read_csv(path,
    dtype={"task": str})` (the dtype keeps Exp 5's task "1" a string; empty fields, the NaN values
    and the loss's task, read as NaN)."""
    os.makedirs(workdir, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in results_rows(results):
        writer.writerow([_csv_field(row[c]) for c in CSV_COLUMNS])
    return write_atomic(os.path.join(workdir, CSV_FILE), buf.getvalue().encode())


def load_results(path) -> list[dict]:
    """The rows of a results.csv (`path`: the file or its workdir) as `results_rows` made them:
    seed and step ints, value a float (NaN for an empty field), diverged a bool, the rest
    strings. Needs no pandas."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CSV_FILE)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        # `layer` came later: a results.csv without it reads with layer "".
        missing = [c for c in CSV_COLUMNS[:-1] if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} is not a results.csv: it has no column {missing}.")
        return [
            {**row, "seed": int(row["seed"]), "step": int(row["step"]),
             "value": float(row["value"] or "nan"), "diverged": row["diverged"] == "1",
             "layer": row.get("layer") or ""}
            for row in reader
        ]  # fmt: skip


def write_curves_to_tensorboard(results, logdir) -> None:
    """Logs the seed-mean of every method/metric at each probe step, tagged `<method>/<metric>`
    (per-layer CKA: `<method>/layer_cka_<reference>/<layer>`), over the runs that did not
    diverge (`l2r.divergence`); a method with none is not logged."""
    dropped = divergence.dropped_rows(results)
    means = {}
    for method, values in results["methods"].items():
        for metric in values:
            x = kept_metric(results, method, metric, dropped)
            if x.shape[0]:
                means[f"{method}/{metric}"] = mean_std(x)[0]
    lc = results.get("layer_cka") or {}
    for ref, metric in LAYER_CKA_METRICS.items():  # [S, P, L] -> one curve per layer.
        for method, values in (lc.get(ref) or {}).items():
            if len(values) == 0:
                continue
            x = divergence.kept(np.asarray(values, np.float64), dropped.get(method, []))
            for li, layer in enumerate(lc["layers"]):
                if x.shape[0]:
                    means[f"{method}/{metric}/{layer}"] = mean_std(x[..., li])[0]
    if not distributed.is_main():  # Process 0 writes.
        return
    # Undefined points (the loss before any step) are left out by the writer, not logged NaN.
    writer = tracking.TensorBoardWriter(os.fspath(logdir))
    try:
        for i, step in enumerate(results["steps"]):
            writer.write_scalars(step, {t: m[i] for t, m in means.items()})
    finally:
        writer.close()


def write_artefacts(results, workdir, prefix: str = "fig1") -> dict[str, str]:
    """Writes every artefact of `results` but `results.json` into `workdir`; returns
    {artefact: path}: `markdown` (results.md), `csv` (results.csv), `tensorboard` (tb/) and one
    entry per figure, keyed by its file stem (e.g. `fig1_task_A`, the PNG) and the stem with
    `_pdf` (its PDF)."""
    os.makedirs(workdir, exist_ok=True)
    artefacts = {"markdown": write_markdown(results, workdir), "csv": write_csv(results, workdir)}
    from l2r import plots  # Here: matplotlib loads only when figures are drawn.

    for path in plots.plot_curves(results, workdir, prefix=prefix):
        stem = os.path.splitext(os.path.basename(path))[0]
        artefacts[stem], artefacts[f"{stem}_pdf"] = path, plots.pdf_path(path)
    tb_dir = os.path.join(os.fspath(workdir), "tb")
    write_curves_to_tensorboard(results, tb_dir)
    artefacts["tensorboard"] = tb_dir
    return artefacts


def write_report(results, workdir, prefix: str = "fig1") -> dict[str, str]:
    """Writes every artefact of `results` into `workdir`, `results.json` (key `json`) last, and
    returns {artefact: path} (see `write_artefacts`).

    `results` holds "experiment", "preset", "config" (plain dict), "steps" (probe steps [P]),
    "seeds" [S], "methods" ({method: {metric: [S, P] array}}, display order), "timing" and,
    when measured, "layer_cka" ({"layers": [L], "to_pretrained" / "to_teacher": {method:
    [S, P, L] array}}, `l2r.compare.compare`).
    """
    artefacts = write_artefacts(results, workdir, prefix)
    return {"json": write_results_json(results, workdir), **artefacts}
