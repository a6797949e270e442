"""Outputs researchers use: results.csv (tidy rows that equal results.json's arrays), the schema
version, readable figure names, the learned rule set apart, and every figure as PNG and PDF."""

import csv
import json
import os
import stat

import numpy as np
import pytest
from matplotlib.ticker import MaxNLocator

from l2r import divergence, plots, report
from l2r import workdir as workdir_lib
from l2r.meta import figures
from l2r.pipelines import three_tasks

STEPS = [0, 1, 2, 3]
SEEDS = [3, 7, 11]


def _results(methods=("sgd", "sgd_x0.1", "ewc", "learned"), tasks=("A", "B"), seed=0):
    """Random [S, P] histories per method: readout/original per task, cka of the first task
    (float32, as the probe returns it) and the loss, NaN at step 0 as `task_b` writes it."""
    rng = np.random.default_rng(seed)
    shape = (len(SEEDS), len(STEPS))
    out = {}
    for m in methods:
        h = {
            f"{kind}_{t}": rng.uniform(0, 1, shape)
            for t in tasks
            for kind in ("readout", "original")
        }
        h[f"cka_{tasks[0]}"] = rng.uniform(0, 1, shape).astype(np.float32)
        h["loss"] = rng.uniform(0, 2, shape)
        h["loss"][:, 0] = np.nan
        out[m] = h
    return {"experiment": "exp1", "preset": "smoke", "config": {"lr": 0.1}, "steps": STEPS,
            "seeds": SEEDS, "methods": out, "timing": {}}  # fmt: skip


def _arrays(rows) -> dict:
    """{(method, results.json key): [S, P] array} rebuilt from CSV rows."""
    cells = {}
    for r in rows:
        key = f"{r['metric']}_{r['task']}" if r["task"] else r["metric"]
        cells.setdefault((r["method"], key), {})[(r["seed"], r["step"])] = r["value"]
    return {
        k: np.array([[v[(s, p)] for p in STEPS] for s in SEEDS]) for k, v in cells.items()
    }  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("outputs")
    results = _results()
    results["methods"]["ewc"]["readout_B"][1, 2] = np.inf  # A blown-up run: diverged, kept as inf.
    old_umask = os.umask(0o022)
    try:
        artefacts = report.write_report(results, workdir, prefix="exp1")
    finally:
        os.umask(old_umask)
    return results, workdir, artefacts


def test_csv_rows_equal_the_results_arrays(written):
    results, workdir, artefacts = written
    assert artefacts["csv"] == os.path.join(workdir, "results.csv")
    rows = report.load_results(workdir)
    # NaN != NaN, so rows are compared by their repr: the same keys, types and values.
    assert repr(rows) == repr(report.load_results(artefacts["csv"]))  # The file or its workdir.
    assert repr(rows) == repr(report.results_rows(results))  # Read back as they were made.
    n_metrics = len(results["methods"]["sgd"])
    assert len(rows) == len(results["methods"]) * len(SEEDS) * len(STEPS) * n_metrics
    assert {(r["experiment"], r["preset"]) for r in rows} == {("exp1", "smoke")}
    arrays = _arrays(rows)
    assert set(arrays) == {(m, k) for m, h in results["methods"].items() for k in h}
    for (method, key), x in arrays.items():
        # Exact: float64 and float32 values both survive their shortest repr.
        np.testing.assert_array_equal(x, np.asarray(results["methods"][method][key], np.float64))
    # The CSV says what results.json says.
    loaded = json.loads((workdir / "results.json").read_text())
    for (method, key), x in arrays.items():
        np.testing.assert_array_equal(
            np.where(np.isfinite(x), x, np.nan),
            np.asarray(loaded["methods"][method][key], dtype=np.float64),
        )


def test_csv_tasks_metrics_nan_inf_and_divergence(written):
    results, workdir, _ = written
    with open(workdir / "results.csv", newline="") as f:
        raw = list(csv.reader(f))
    assert tuple(raw[0]) == report.CSV_COLUMNS
    assert raw[1] == ["exp1", "smoke", "sgd", "3", "0", "A", "readout", raw[1][7], "0", ""]
    fields = [dict(zip(raw[0], r, strict=True)) for r in raw[1:]]
    assert {(r["metric"], r["task"]) for r in fields} == {
        ("readout", "A"), ("original", "A"), ("readout", "B"), ("original", "B"), ("cka", "A"),
        ("loss", ""),
    }  # fmt: skip
    # NaN (the loss before any step) is an empty field, +inf is "inf"; both read back.
    loss_0 = [r["value"] for r in fields if r["metric"] == "loss" and r["step"] == "0"]
    assert loss_0 == [""] * len(results["methods"]) * len(SEEDS)
    assert all(r["value"] for r in fields if r["metric"] != "loss" or r["step"] != "0")
    (blown,) = [r for r in report.load_results(workdir) if r["value"] == np.inf]
    assert (blown["method"], blown["seed"], blown["step"]) == ("ewc", SEEDS[1], STEPS[2])
    # The blown-up run is flagged on all of its rows and only there, as the reports leave it out.
    flagged = {(r["method"], r["seed"]) for r in report.load_results(workdir) if r["diverged"]}
    assert flagged == {("ewc", SEEDS[1])}
    assert divergence.dropped_rows(results) == {"ewc": [1]}


def test_csv_and_pdfs_are_0644_and_leave_no_temp_files(written):
    _, workdir, artefacts = written
    names = {os.path.basename(p) for k, p in artefacts.items() if k != "tensorboard"}
    assert {"results.csv", "exp1_task_A.pdf", "exp1_task_B.pdf", "exp1_cka.pdf"} <= names
    for name in names:
        assert stat.S_IMODE(os.stat(workdir / name).st_mode) == 0o644, name
    assert sorted(os.listdir(workdir)) == sorted(names | {"config.json", "tb"})


def test_csv_is_written_before_results_json(tmp_path, monkeypatch):
    order, write = [], workdir_lib.write_atomic

    def record(path, data):
        order.append(os.path.basename(path))
        return write(path, data)

    monkeypatch.setattr(workdir_lib, "write_atomic", record)
    report.write_report(_results(), tmp_path)
    assert order[-2:] == ["config.json", "results.json"]
    assert "results.csv" in order[:-2]


def test_results_json_carries_its_schema_first(written):
    _, workdir, _ = written
    loaded = json.loads((workdir / "results.json").read_text())
    assert next(iter(loaded)) == "schema" and loaded["schema"] == report.RESULTS_SCHEMA == 1
    report.write_results_json({**_results(), "schema": 0}, workdir)  # An older dict rewritten.
    assert json.loads((workdir / "results.json").read_text())["schema"] == 1


def test_load_results_refuses_another_csv(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results.csv"):
        report.load_results(tmp_path / "other.csv")


@pytest.mark.parametrize(
    "method, name",
    [("sgd", "SGD"), ("sgd_x0.1", "SGD (lr ×0.1)"), ("sgd_x2", "SGD (lr ×2)"),
     ("teacher", "multi-task teacher"), ("learned", "learned rule (ours)"), ("lwf", "LwF"),
     ("ewc", "EWC"), ("hat", "HAT"), ("oml", "OML"), ("rep", "Rep"),
     ("sgd_kernels_x0.5", "sgd_kernels_x0.5"), ("my_method", "my_method"), ("sgd_x", "sgd_x")],
)  # fmt: skip
def test_display_name(method, name):
    assert plots.display_name(method) == name


@pytest.mark.parametrize(
    "metric, split, title",
    [("readout_A", ("readout", "A"), "Task A readout accuracy"),
     ("original_B", ("original", "B"), "Task B original head"),
     ("cka_A", ("cka", "A"), "CKA to the pre-trained network, Task A"),
     ("readout_3", ("readout", "3"), "Task 3 readout accuracy"),
     ("loss", ("loss", ""), "Task-B training loss"),
     ("my_metric", ("my_metric", ""), "my_metric")],
)  # fmt: skip
def test_metric_names(metric, split, title):
    assert report.split_metric(metric) == split
    assert plots.metric_title(metric) == title


def test_divergence_labels_compose_with_display_names():
    assert plots.legend_label("ewc", 1, 3) == "EWC (1/3 diverged)"
    assert plots.legend_label("sgd_x0.1", 3, 3) == "SGD (lr ×0.1) (diverged)"
    assert plots.legend_label("learned", 0, 3) == "learned rule (ours)"


def _integer_ticks(axis) -> bool:
    locator = axis.get_major_locator()
    return isinstance(locator, MaxNLocator) and all(
        float(t).is_integer() for t in locator.tick_values(*axis.get_view_interval())
    )


def test_learned_rule_stands_out_and_bands_lighten():
    methods = ("sgd", "sgd_x0.1", "lwf", "ewc", "hat", "teacher", "learned")
    fig = plots.curves_figure(_results(methods), ["readout_A", "cka_A"], "Task A accuracy (%)")
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        learned = lines.pop("learned rule (ours)")
        others = list(lines.values())
        assert learned.get_linewidth() > max(line.get_linewidth() for line in others)
        assert learned.get_zorder() > max(line.get_zorder() for line in others)
        assert learned.get_color() not in {line.get_color() for line in others}
        assert len({line.get_color() for line in others}) == len(others)
        bands = {(not b.get_facecolor()[0][:3].any(), b.get_alpha()) for b in ax.collections}
        assert bands == {(False, plots.band_alpha(7)), (True, plots.band_alpha(7, "learned"))}
        assert _integer_ticks(ax.xaxis)
        x = 100 * _results(methods)["methods"]["learned"]["readout_A"]
        if ax.get_title() == "Task A readout accuracy":
            np.testing.assert_allclose(learned.get_ydata(), x.mean(axis=0))
    assert plots.band_alpha(4) > plots.band_alpha(5) > plots.band_alpha(5, "learned")
    fig.draw_without_rendering()  # The legend sits beside the panels, over none of them.
    legend = fig.legends[0].get_window_extent()
    assert all(not legend.overlaps(ax.get_window_extent()) for ax in fig.axes)


def test_save_figure_writes_png_and_a_reproducible_pdf(tmp_path):
    fig = plots.curves_figure(_results(), ["readout_B"], "Task B accuracy (%)")
    png = plots.save_figure(fig, str(tmp_path / "f.png"))
    assert png == str(tmp_path / "f.png") and plots.pdf_path(png) == str(tmp_path / "f.pdf")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    first = (tmp_path / "f.pdf").read_bytes()
    assert first[:5] == b"%PDF-"
    plots.save_figure(fig, str(tmp_path / "f.png"))
    assert (tmp_path / "f.pdf").read_bytes() == first  # No creation date: the same bytes.


@pytest.fixture
def saved_figures(monkeypatch):
    """{file name: Figure} of every figure `plots.save_figure` writes in the test."""
    saved, save = {}, plots.save_figure

    def record(fig, path):
        saved[os.path.basename(path)] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", record)
    return saved


def test_fig6_has_a_title_integer_ticks_and_the_legend_outside(tmp_path, saved_figures):
    # A constant T-BPTT length, as in the smoke preset, still gets whole-number ticks.
    history = {"episodes_done": [0, 1, 2, 3], "threshold": [2.0, 1.5, 1.2, 1.0],
               "tbptt": [3, 3, 3, 3]}  # fmt: skip
    deltas = {"conv0/kernel": np.linspace(-0.5, 1.5, 50), "head/bias": np.ones(5)}
    paths = figures.plot_meta(history, deltas, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["fig6_curriculum.png", "fig7_delta.png"]
    assert sorted(os.listdir(tmp_path)) == [
        "fig6_curriculum.pdf", "fig6_curriculum.png", "fig7_delta.pdf", "fig7_delta.png"
    ]  # fmt: skip
    ax, ax2 = saved_figures["fig6_curriculum.png"].axes
    fig = ax.figure
    assert ax.get_title() == "Fig. 6: meta-training curriculum"
    assert _integer_ticks(ax.xaxis) and _integer_ticks(ax2.yaxis)
    fig.draw_without_rendering()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["loss threshold", "T-BPTT steps"]
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())


def test_exp5_figure_names_tasks_and_methods(tmp_path, saved_figures):
    results = _results(("sgd", "ewc", "teacher", "learned"), tasks=("1", "2", "3"))
    results["switch_step"] = 2
    results["methods"]["ewc"]["loss"][:, 1:] = np.nan  # Every EWC run diverged.
    path = three_tasks.plot_tasks(results, str(tmp_path), prefix="exp5")
    assert path == str(tmp_path / "exp5_tasks.png") and (tmp_path / "exp5_tasks.pdf").exists()
    fig = saved_figures["exp5_tasks.png"]
    assert [ax.get_title() for ax in fig.axes] == [f"Task {k} readout accuracy" for k in (1, 2, 3)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "SGD", "EWC (diverged)", "multi-task teacher", "learned rule (ours)"
    ]  # fmt: skip
    for ax in fig.axes:
        assert _integer_ticks(ax.xaxis)
        lines = {line.get_label(): line for line in ax.get_lines() if line.get_label()[0] != "_"}
        assert list(lines) == ["SGD", "multi-task teacher", "learned rule (ours)"]
        assert lines["learned rule (ours)"].get_linewidth() > lines["SGD"].get_linewidth()
    rows = report.results_rows(results)
    assert {r["task"] for r in rows} == {"1", "2", "3", ""}


def test_per_layer_cka_rows_equal_results_layer_cka(tmp_path):
    """results.csv holds every per-layer CKA value of results.json, one row per method, run,
    probe step, reference and layer, with the layer named and the first task's name; a CSV
    written before the `layer` column reads with layer ""."""
    results = _results(("sgd", "teacher"))
    rng = np.random.default_rng(5)
    layers = ["gn0", "stage1/gn1", "hidden"]
    shape = (len(SEEDS), len(STEPS), len(layers))
    results["layer_cka"] = {
        "layers": layers,
        "to_pretrained": {m: rng.uniform(0, 1, shape).tolist() for m in ("sgd", "teacher")},
        "to_teacher": {"sgd": rng.uniform(0, 1, shape).tolist(), "teacher": []},
    }
    path = report.write_csv(results, str(tmp_path))
    rows = [r for r in report.load_results(path) if r["layer"]]
    assert {r["task"] for r in rows} == {"A"}
    expected = {("to_pretrained", "sgd"), ("to_pretrained", "teacher"), ("to_teacher", "sgd")}
    assert len(rows) == len(expected) * len(SEEDS) * len(STEPS) * len(layers)
    metric = {v: k for k, v in report.LAYER_CKA_METRICS.items()}
    for r in rows:
        s, p = SEEDS.index(r["seed"]), STEPS.index(r["step"])
        ref = results["layer_cka"][metric[r["metric"]]][r["method"]]
        assert r["value"] == ref[s][p][layers.index(r["layer"])]
    # An older results.csv, without the column.
    old = tmp_path / "old.csv"
    with open(path, newline="") as f:
        table = [r[:-1] for r in csv.reader(f) if r[-1] in ("", "layer")]
    with open(old, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(table)
    assert all(r["layer"] == "" for r in report.load_results(old))
