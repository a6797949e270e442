"""Tests for l2r.report: artefacts, JSON round trip, tables, TensorBoard and Progress."""

import glob
import json
import logging
import os
import stat
import struct

import numpy as np
import pytest
from PIL import Image

from l2r import console, plots, report
from l2r import workdir as workdir_lib

METHODS = ("sgd", "sgd_x0.1", "teacher")
STEPS = [0, 50, 100, 150, 200, 250]
SEEDS = [0, 1, 2, 3, 4]


def _fake_results(seed=0):
    rng = np.random.default_rng(seed)
    shape = (len(SEEDS), len(STEPS))
    methods = {
        m: {
            "readout_A": rng.uniform(0.5, 1.0, shape),
            "readout_B": rng.uniform(0.5, 1.0, shape),
            "original_A": rng.uniform(0.0, 1.0, shape),
            "cka_A": rng.uniform(0.0, 1.0, shape).astype(np.float32),
            "loss": rng.uniform(0.0, 2.0, shape),
        }
        for m in METHODS
    }
    return {
        "experiment": "fig1",
        "preset": "cpu",
        "config": {"lr": 0.1, "task_b": {"steps": 250}},
        "steps": STEPS,
        "seeds": SEEDS,
        "methods": methods,
        "timing": {"pretrain_s": 1.5, "task_b_s": {"sgd": np.float64(2.0)}, "probe_s": 0.25},
    }


def _read_events(path):
    """Parses a TFRecord file of tensorboardX Event protos into (step, tag, value) triples."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        # TFRecord framing: uint64 length, uint32 length crc, payload, uint32 payload crc.
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("report")
    results = _fake_results()
    return results, workdir, report.write_report(results, workdir, prefix="fig1")


def test_write_report_writes_every_artefact(report_dir):
    _, workdir, artefacts = report_dir
    figures = {"fig1_task_A", "fig1_task_B", "fig1_cka"}
    assert set(artefacts) == {"json", "markdown", "csv", "tensorboard"} | figures | {
        f"{f}_pdf" for f in figures
    }
    for path in artefacts.values():
        assert os.path.exists(path)
        assert os.path.dirname(path) == str(workdir)
    # The atomic writes leave nothing but the artefacts (and config.json) behind.
    written = sorted(["config.json", *(os.path.basename(p) for p in artefacts.values())])
    assert sorted(os.listdir(workdir)) == written


def test_results_json_is_written_last_and_readable_by_others(tmp_path, monkeypatch):
    """A run killed while writing its artefacts has no results.json (so a plain rerun finishes
    it), config.json comes with the results, and teammates can read every file."""
    order, write = [], workdir_lib.write_atomic
    monkeypatch.setattr(
        workdir_lib,
        "write_atomic",
        lambda path, data: order.append(os.path.basename(path)) or write(path, data),
    )
    old_umask = os.umask(0o022)
    try:
        report.write_report(_fake_results(), tmp_path, prefix="fig1")
    finally:
        os.umask(old_umask)
    assert order[-2:] == ["config.json", "results.json"], order
    assert {"results.md", "fig1_task_A.png"} <= set(order[:-2])
    for name in order:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_replaced_results_never_outlive_their_config(tmp_path, monkeypatch):
    """--overwrite: the old results go before the new config.json is written, so a crash in
    between leaves an unfinished workdir, never a config.json that results.json does not hold."""
    old = _fake_results()
    report.write_results_json(old, tmp_path)
    new = {**old, "config": {"lr": 0.5}}
    write = workdir_lib.write_atomic

    def crash_on_results(path, data):
        if path.endswith("results.json"):
            raise KeyboardInterrupt  # A kill between config.json and results.json.
        return write(path, data)

    monkeypatch.setattr(workdir_lib, "write_atomic", crash_on_results)
    with pytest.raises(KeyboardInterrupt):
        report.write_results_json(new, tmp_path)
    assert not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.5}


def test_results_json_round_trips(report_dir):
    results, _, artefacts = report_dir
    with open(artefacts["json"]) as f:
        loaded = json.load(f)
    assert loaded["steps"] == STEPS and loaded["config"] == results["config"]
    assert loaded["timing"]["task_b_s"]["sgd"] == 2.0
    for m in METHODS:
        assert list(loaded["methods"][m]) == list(results["methods"][m])
        for metric, value in results["methods"][m].items():
            np.testing.assert_array_equal(np.asarray(loaded["methods"][m][metric]), value)


def test_to_jsonable_handles_nan_and_scalars():
    obj = {1: (np.float32(np.nan), np.int64(3)), "a": np.array([[1.0, np.inf]]), "b": float("nan")}
    assert report.to_jsonable(obj) == {"1": [None, 3], "a": [[1.0, None]], "b": None}
    json.dumps(report.to_jsonable(obj), allow_nan=False)  # Strict JSON.


def test_pngs_are_valid_images(report_dir):
    _, _, artefacts = report_dir
    for key in ("fig1_task_A", "fig1_task_B", "fig1_cka"):
        with Image.open(artefacts[key]) as image:
            image.verify()
            assert image.format == "PNG"
            width, height = image.size
            assert width > 100 and height > 100


def test_curves_figure_draws_each_method_mean_per_panel():
    results = _fake_results()
    fig = plots.curves_figure(results, ["readout_A", "original_A"], "Task A accuracy (%)")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["Task A readout accuracy", "Task A original head"]
    labels = ["SGD", "SGD (lr ×0.1)", "multi-task teacher"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == labels
    for ax, metric in zip(axes, ["readout_A", "original_A"], strict=True):
        assert [line.get_label() for line in ax.get_lines()] == labels
        for line, method in zip(ax.get_lines(), METHODS, strict=True):
            values = results["methods"][method][metric]
            np.testing.assert_allclose(line.get_xdata(), STEPS)
            np.testing.assert_allclose(line.get_ydata(), 100 * values.mean(axis=0), rtol=1e-6)
    # A method keeps its colour across panels.
    assert [line.get_color() for line in axes[0].get_lines()] == [
        line.get_color() for line in axes[1].get_lines()
    ]


def test_summary_table_has_hand_computed_mean_std():
    results = _fake_results()
    x = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # Last-step readout_A of "sgd": mean 70%, std 15.8%.
    results["methods"]["sgd"]["readout_A"][:, 0] = 1.0
    results["methods"]["sgd"]["readout_A"][:, -1] = x
    table = report.summary_table(results)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [f"| {m}" for m in METHODS]
    cells = rows[0].split(" | ")
    header = table.splitlines()[2].split(" | ")
    assert cells[header.index("readout_A (%)")] == "70.0 ± 15.8"
    # Forgetting: 1.0 - x per seed = [10, 20, 30, 40, 50] points.
    assert cells[header.index("forgetting_A (pts)")] == "30.0 ± 15.8"
    assert "forgetting_orig_A (pts)" in header[-1]
    loss = results["methods"]["sgd"]["loss"][:, -1]
    assert cells[header.index("loss")] == f"{loss.mean():.3f} ± {loss.std(ddof=1):.3f}"
    with pytest.raises(ValueError):
        report.summary_table(results, step=7)


def test_curves_table_and_markdown(report_dir):
    results, _, artefacts = report_dir
    table = report.curves_table(results, "readout_B")
    lines = table.splitlines()
    assert lines[2] == "| step | " + " | ".join(METHODS) + " |"
    assert len(lines) == 4 + len(STEPS)
    x = results["methods"]["teacher"]["readout_B"][:, 2]
    assert lines[4 + 2].endswith(f"{100 * x.mean():.1f} ± {100 * x.std(ddof=1):.1f} |")
    with open(artefacts["markdown"]) as f:
        md = f.read()
    assert md.startswith("# l2r results: fig1")
    for metric in ("readout_A", "original_A", "readout_B"):
        assert f"**{metric} (%)**" in md


def test_tensorboard_has_every_tag_and_seed_means(report_dir):
    results, _, artefacts = report_dir
    (event_file,) = glob.glob(os.path.join(artefacts["tensorboard"], "events.out.tfevents.*"))
    events = _read_events(event_file)
    tags = {tag for _, tag, _ in events}
    assert tags == {f"{m}/{k}" for m in METHODS for k in results["methods"][m]}
    values = {(step, tag): v for step, tag, v in events}
    expected = results["methods"]["sgd"]["readout_A"][:, 3].mean()
    np.testing.assert_allclose(values[(STEPS[3], "sgd/readout_A")], expected, rtol=1e-6)


def test_atomic_write_cleans_up_on_failure(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(OSError):
        report.write_results_json(_fake_results(), tmp_path)
    assert os.listdir(tmp_path) == []


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_rate_eta_and_throttling(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    clock = FakeClock()
    progress = console.Progress(500, "task_b", interval_s=10.0, clock=clock)
    clock.now += 5.0
    assert progress.update(10) is None  # Throttled: under interval_s since construction.
    # The rate leaves out the first interval (compilation): 105 steps in 35 s, 385 left.
    clock.now += 35.0
    line = progress.update(115, loss=0.5123, epoch=2)
    assert line == "[task_b] 115/500 (23%) 3.0 steps/s, ETA 2m08s, loss=0.512, epoch=2"
    assert line in caplog.messages
    clock.now += 1.0
    assert progress.update(130) is None
    clock.now += 1.0
    assert progress.update(500).startswith("[task_b] 500/500 (100%)")  # Final always logged.


def test_progress_excludes_resumed_work_from_rate():
    clock = FakeClock()
    progress = console.Progress(
        1000, "meta", interval_s=0.0, clock=clock, unit="episodes", start=400
    )
    clock.now += 50.0  # The first window: compilation, left out of the rate.
    assert progress.update(450) == "[meta] 450/1000 (45%) ? episodes/s, ETA ?"
    clock.now += 3661.0 / 10  # 50 episodes; 500 left at this rate take 3661 s.
    assert progress.update(500) == "[meta] 500/1000 (50%) 0.137 episodes/s, ETA 1h01m01s"
