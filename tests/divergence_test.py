"""Diverged Task-B runs: found exactly, recorded, left out of every table, figure and sweep row,
and flagged in a real run that blows up."""

import glob
import json
import logging
import os

import jax
import numpy as np
import pytest
from report_test import _read_events
from smoke_setup import make_model

from l2r import cl_metrics, compare, divergence, plots, pretrain, report
from l2r.cli import sweep
from l2r.configs import fig1
from l2r.data import tasks
from l2r.data.sources import Split
from l2r.methods import make_sgd

STEPS = [0, 10, 20, 30, 40, 50]
SEEDS = [0, 1, 2, 3]
METRICS = ("readout_A", "original_A", "readout_B", "original_B", "cka_A")


def _method(rng, nan_from=None, inf_cka=None):
    """One method's history [S, P]: random accuracies and losses, the loss NaN at column 0 as
    `task_b` writes it. `nan_from`: {row: column} from which the loss (and the readouts, as a
    blown-up network's probe can give) is NaN; `inf_cka`: {row: column} where cka_A is +inf."""
    shape = (len(SEEDS), len(STEPS))
    history = {m: rng.uniform(0.2, 1.0, shape) for m in METRICS}
    history["loss"] = rng.uniform(0.1, 2.0, shape)
    history["loss"][:, 0] = np.nan
    for row, col in (nan_from or {}).items():
        history["loss"][row, col:] = np.nan
        history["readout_A"][row, col + 1 :] = np.nan
    for row, col in (inf_cka or {}).items():
        history["cka_A"][row, col] = np.inf
    return history


def _results(seed=0):
    rng = np.random.default_rng(seed)
    methods = {
        "sgd": _method(rng),
        "ewc": _method(rng, nan_from={0: 2, 2: 3}),  # two of four seeds
        "lwf": _method(rng, nan_from={0: 1, 1: 1, 2: 1, 3: 4}),  # every seed
        "hat": _method(rng, inf_cka={1: 4}),  # one seed, in a CKA metric only
    }
    # A readout that fails a step before the loss does: the first non-finite step wins.
    methods["ewc"]["readout_B"][2, 2] = np.nan
    return {"experiment": "fig1", "preset": "cpu", "steps": STEPS, "seeds": SEEDS,
            "methods": methods}  # fmt: skip


EXPECTED = [
    {"method": "ewc", "seed": 0, "step": 20, "metric": "loss"},
    {"method": "ewc", "seed": 2, "step": 20, "metric": "readout_B"},
    {"method": "lwf", "seed": 0, "step": 10, "metric": "loss"},
    {"method": "lwf", "seed": 1, "step": 10, "metric": "loss"},
    {"method": "lwf", "seed": 2, "step": 10, "metric": "loss"},
    {"method": "lwf", "seed": 3, "step": 40, "metric": "loss"},
    {"method": "hat", "seed": 1, "step": 40, "metric": "cka_A"},
]
KEPT = {"sgd": [0, 1, 2, 3], "ewc": [1, 3], "lwf": [], "hat": [0, 2, 3]}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def _fmt(x_S, percent=True) -> str:
    """mean ± sample std of `x_S`, computed here independently of `l2r.report`."""
    mean, std = np.mean(x_S), np.std(x_S, ddof=1)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def test_find_divergence_entries():
    results = _results()
    assert divergence.find_divergence(results) == EXPECTED
    # The loss's column 0 is NaN in every run and is no divergence.
    clean = {**results, "methods": {"sgd": results["methods"]["sgd"]}}
    assert divergence.find_divergence(clean) == []
    # Seeds and steps are reported by value, not by position.
    renamed = {**results, "seeds": [7, 8, 9, 10], "steps": [s + 5 for s in STEPS]}
    assert divergence.find_divergence(renamed)[1] == {
        "method": "ewc", "seed": 9, "step": 25, "metric": "readout_B"
    }  # fmt: skip


def test_a_json_round_trip_finds_the_same(tmp_path):
    """results.json holds NaN and ±inf as null: the divergence read back is the same."""
    results = _results()
    loaded = json.loads(json.dumps(report.to_jsonable(results), allow_nan=False))
    assert divergence.find_divergence(loaded) == EXPECTED
    assert report.summary_table(loaded) == report.summary_table(results)


def test_mark_divergence_records_and_warns(caplog):
    caplog.set_level(logging.WARNING, logger="absl")
    results = divergence.mark_divergence(_results())
    assert results["diverged"] == EXPECTED
    json.dumps(report.to_jsonable(results), allow_nan=False)  # results.json can hold it.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "Task B diverged: ewc seeds [0, 2] of 4 (non-finite seed 0: loss from step 20, "
        "seed 2: readout_B from step 20); these runs are left out of the means.",
        "Task B diverged: lwf seeds [0, 1, 2, 3] of 4 (non-finite seed 0: loss from step 10, "
        "seed 1: loss from step 10, seed 2: loss from step 10, seed 3: loss from step 40); "
        "these runs are left out of the means.",
        "Task B diverged: hat seeds [1] of 4 (non-finite cka_A from step 40); these runs are "
        "left out of the means.",
    ]


def test_summary_table_leaves_diverged_runs_out():
    results = _results()
    lines = report.summary_table(results).splitlines()
    assert "less the diverged runs" in lines[0]
    header = _cells(lines[2])
    rows = {_cells(line)[0]: dict(zip(header, _cells(line), strict=True)) for line in lines[4:]}
    assert list(rows) == [
        "sgd",
        "ewc (diverged: 2/4 seeds, left out)",
        "lwf (diverged: 4/4 seeds)",
        "hat (diverged: 1/4 seeds, left out)",
    ]
    labels = dict(zip(KEPT, rows, strict=True))
    for method, kept in KEPT.items():
        row = rows[labels[method]]
        x = {m: np.asarray(v)[kept] for m, v in results["methods"][method].items()}
        if not kept:
            assert set(row.values()) == {labels[method], "diverged"}
            continue
        for m in ("readout_A", "original_A", "readout_B", "original_B"):
            assert row[f"{m} (%)"] == _fmt(x[m][:, -1])
        assert row["cka_A"] == _fmt(x["cka_A"][:, -1], percent=False)
        assert row["loss"] == _fmt(x["loss"][:, -1], percent=False)
        assert row["forgetting_A (pts)"] == _fmt(x["readout_A"][:, 0] - x["readout_A"][:, -1])


def test_results_md_names_the_diverged_runs(tmp_path):
    with open(report.write_markdown(_results(), tmp_path)) as f:
        md = f.read()
    assert "**Diverged**, left out of every mean ± std below: ewc seeds [0, 2] of 4" in md
    assert "| lwf (diverged: 4/4 seeds) | diverged |" in md  # The summary and the CL view.
    assert md.count("lwf (diverged: 4/4 seeds)") == 2 + 3  # ... and each curve's header.


def test_a_recorded_divergence_is_used_as_recorded():
    """`results["diverged"]` (as `mark_divergence` stored it) decides, not a fresh search."""
    results = {**_results(), "diverged": [{"method": "sgd", "seed": 3, "step": 50, "metric": "x"}]}
    lines = report.summary_table(results).splitlines()
    assert _cells(lines[4])[0] == "sgd (diverged: 1/4 seeds, left out)"
    assert _cells(lines[5])[0] == "ewc"


def test_curves_table_leaves_diverged_runs_out():
    results = _results()
    lines = report.curves_table(results, "readout_B").splitlines()
    assert _cells(lines[2]) == [
        "step",
        "sgd",
        "ewc (diverged: 2/4 seeds, left out)",
        "lwf (diverged: 4/4 seeds)",
        "hat (diverged: 1/4 seeds, left out)",
    ]
    for i in range(len(STEPS)):
        cells = _cells(lines[4 + i])
        expected = [_fmt(results["methods"][m]["readout_B"][KEPT[m], i]) for m in ("ewc", "hat")]
        assert [cells[2], cells[3], cells[4]] == [expected[0], "diverged", expected[1]]


def test_cl_metrics_table_leaves_diverged_runs_out():
    results = _results()
    stats = cl_metrics.summarize(results)
    ewc = results["methods"]["ewc"]
    kept = KEPT["ewc"]
    forgetting = ewc["readout_A"][kept, 0] - ewc["readout_A"][kept, -1]
    np.testing.assert_allclose(
        stats["ewc"]["forgetting_readout_A"], (forgetting.mean(), forgetting.std(ddof=1))
    )
    assert all(np.isnan(v).all() for v in stats["lwf"].values())
    lines = cl_metrics.markdown_table(results).splitlines()
    ewc_row, lwf_row = _cells(lines[3]), _cells(lines[4])
    assert ewc_row[0] == "ewc (diverged: 2/4 seeds, left out)"
    assert ewc_row[2] == _fmt(forgetting)
    assert lwf_row == ["lwf (diverged: 4/4 seeds)"] + ["diverged"] * (len(lwf_row) - 1)


def test_curves_figure_labels_and_lines():
    results = _results()
    fig = plots.curves_figure(results, ["readout_A", "cka_A"], "Task A accuracy (%)")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "SGD",
        "EWC (2/4 diverged)",
        "LwF (diverged)",
        "HAT (1/4 diverged)",
    ]
    for ax, metric, scale in zip(fig.axes, ["readout_A", "cka_A"], [100, 1], strict=True):
        lines = {line.get_label().split()[0].lower(): line for line in ax.get_lines()}
        assert list(lines) == ["sgd", "ewc", "hat"]  # A fully diverged method draws nothing.
        for method, line in lines.items():
            x = results["methods"][method][metric][KEPT[method]]
            np.testing.assert_allclose(line.get_ydata(), scale * x.mean(axis=0), rtol=1e-6)


def test_tensorboard_logs_the_kept_runs_mean(tmp_path):
    results = _results()
    report.write_curves_to_tensorboard(results, tmp_path)
    (event_file,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    values = {(step, tag): v for step, tag, v in _read_events(event_file)}
    assert not any(tag.startswith("lwf/") for _, tag in values)
    expected = results["methods"]["ewc"]["readout_A"][KEPT["ewc"], 4].mean()
    np.testing.assert_allclose(values[(40, "ewc/readout_A")], expected, rtol=1e-6)


def test_tensorboard_logs_per_layer_cka_of_the_kept_runs(tmp_path):
    results = _results()
    rng = np.random.default_rng(4)
    shape = (len(SEEDS), len(STEPS), 2)
    cka = {m: rng.uniform(0, 1, shape) for m in ("ewc", "hat")}
    results["layer_cka"] = {"layers": ["gn0", "hidden"], "to_pretrained": cka,
                            "to_teacher": {}}  # fmt: skip
    report.write_curves_to_tensorboard(results, tmp_path)
    (event_file,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    values = {(step, tag): v for step, tag, v in _read_events(event_file)}
    expected = cka["ewc"][KEPT["ewc"], 4, 1].mean()
    np.testing.assert_allclose(values[(40, "ewc/layer_cka_pretrained/hidden")], expected,
                               rtol=1e-6)  # fmt: skip


def test_sweep_rows_report_diverged_settings_without_numbers():
    """A setting whose runs all diverged holds no number to rank, and reads "diverged"."""
    fine, blown = _results(1), _results(2)
    fine["methods"] = {"ewc": _method(np.random.default_rng(3))}
    blown["methods"] = {"ewc": blown["methods"]["lwf"], "hat": blown["methods"]["hat"]}
    rows = sweep.summary_rows("000_task_b.ewc.coef=1", {"task_b.ewc.coef": 1.0}, fine)
    rows += sweep.summary_rows("001_task_b.ewc.coef=100", {"task_b.ewc.coef": 100.0}, blown)
    ewc_fine, ewc_blown, hat = rows
    assert (ewc_blown["runs"], ewc_blown["diverged"]) == (4, 4)
    for stat in ("readout_A_before", "readout_A", "forgetting_A", "readout_B", "avg_acc"):
        assert ewc_blown[stat] is None
        assert ewc_fine[stat] is not None and np.isfinite(ewc_fine[stat]["mean"])
    # A choice over the settings' numbers can only see the one that did not diverge.
    scored = [r for r in rows if r["method"] == "ewc" and r["readout_A"] is not None]
    assert [r["setting"] for r in scored] == [{"task_b.ewc.coef": 1.0}]
    # The partly diverged method: its mean over the seeds that did not diverge.
    kept = blown["methods"]["hat"]["readout_B"][KEPT["hat"], -1]
    np.testing.assert_allclose(hat["readout_B"]["mean"], kept.mean())
    table = sweep.markdown(rows, ["task_b.ewc.coef"]).splitlines()
    assert _cells(table[3]) == ["001", "100.0", "ewc (diverged: 4/4 seeds)"] + ["diverged"] * 5
    assert _cells(table[4])[2] == "hat (diverged: 1/4 seeds, left out)"
    json.dumps(report.to_jsonable(rows), allow_nan=False)  # sweep.json can hold them.


def test_a_run_that_blows_up_is_flagged():
    """SGD at learning rate 1e30 through `compare`: the loss goes NaN at the first probe, while
    the probe still reports chance accuracies, the numbers that used to be averaged in."""
    config = fig1.get_config("smoke")
    config.num_seeds = 2
    config.model.widths, config.model.groups = (4, 4), 2
    config.task_b.update(steps=4, probe_every=2, batch_size=4, teacher_batch_a=4)
    config.readout.update(steps=2, cka_size=8)
    model = make_model(config)
    gen = np.random.default_rng(0)

    def task(name):
        images = gen.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
        split = Split(images, (np.arange(12) % 3).astype(np.int32))
        return tasks.Task(name, split, split, ("a", "b", "c"))

    network = pretrain.init_network(model, jax.random.key(0), (1, 8, 8, 1), 3)
    pretrained = jax.tree.map(lambda a: a[None], network)
    mean, std = np.full(1, 127.0, np.float32), np.full(1, 64.0, np.float32)
    methods = [make_sgd(model, 0.1), make_sgd(model, 1e30, name="sgd_lr1e30")]
    results = compare.compare(config, model, pretrained, [task("A"), task("B")], mean, std, methods)
    assert np.isfinite(results["methods"]["sgd_lr1e30"]["readout_A"]).all()
    assert divergence.find_divergence(results) == [
        {"method": "sgd_lr1e30", "seed": s, "step": 2, "metric": "loss"} for s in (0, 1)
    ]
    lines = report.summary_table(results).splitlines()
    assert _cells(lines[4])[0] == "sgd"
    assert _cells(lines[5])[0] == "sgd_lr1e30 (diverged: 2/2 seeds)"


@pytest.mark.parametrize(
    "dropped, runs, table, figure",
    [
        (0, 3, "ewc", "ewc"),
        (1, 3, "ewc (diverged: 1/3 seeds, left out)", "ewc (1/3 diverged)"),
        (3, 3, "ewc (diverged: 3/3 seeds)", "ewc (diverged)"),
    ],
)
def test_labels(dropped, runs, table, figure):
    assert divergence.table_label("ewc", dropped, runs) == table
    assert divergence.figure_label("ewc", dropped, runs) == figure
