"""End to end: every smoke preset runs as `python -m experiments.run` runs it and gives the numbers
the code gave before the l2r/ restructure (`tests/golden/`, to 1e-6, on the AVX2 machine that
recorded them; on another CPU kind, to 1e-6 against goldens recorded on that kind, or within its
rounding where there are none: `golden_numbers`), so later changes are held to them too. A
deliberate change of the numbers re-records the goldens in the same commit (`python -m
tests.golden_numbers record WORKDIR NAME`) and says why. Each preset runs once (one test, so
parallel workers never run it twice) and its artefacts are checked on the way."""

import importlib
import json
import os

import golden_numbers
import numpy as np
import pytest

from l2r import cl_metrics
from l2r import workdir as workdir_lib
from l2r.configs import exp1, exp2, exp3, exp4, exp5, fig1
from l2r.pipelines import PIPELINES

FIG1_ALL = ("sgd", "sgd_x0.1", "lwf", "ewc", "hat", "teacher")
ALL = ("sgd", "sgd_x0.1", "lwf", "ewc", "hat", "oml", "rep", "teacher", "learned")
READOUT_3 = ("readout_1", "readout_2", "readout_3")


def run_smoke(module, workdir, methods=None):
    config = module.get_config("smoke")
    if methods is not None:
        config.task_b.methods = methods
    pipeline = importlib.import_module(PIPELINES[config.experiment])
    with workdir_lib.locked(str(workdir)):
        results = pipeline.run(config, str(workdir))
    return config, results, json.loads((workdir / "results.json").read_text())


def assert_golden(results, *names):
    got = golden_numbers.numbers(results)
    for name in names:
        golden, strict = golden_numbers.load(name)  # Loose on a CPU kind without its goldens.
        assert golden_numbers.differences(golden, got, loose=not strict) == [], (name, strict)
        # The same metrics in the same order (the tables' columns follow it).
        assert [k for k in got if k in golden] == list(golden), name


def test_fig1_smoke_with_every_baseline(tmp_path):
    _, results, saved = run_smoke(fig1, tmp_path, FIG1_ALL)
    assert_golden(results, "fig1_smoke", "fig1_smoke_all")
    assert list(saved["methods"]) == list(FIG1_ALL)


def test_exp1_smoke_with_every_method(tmp_path):
    config, results, saved = run_smoke(exp1, tmp_path, ALL)
    assert_golden(results, "exp1_smoke", "exp1_smoke_all")
    for name in ("config.json", "results.json", "results.md", "exp1_task_A.png",
                 "exp1_task_B.png", "fig6_curriculum.png", "fig7_delta.png"):  # fmt: skip
        assert os.path.getsize(tmp_path / name) > 0, name
    assert list(saved["methods"]) == list(ALL)
    # Meta-training stopped by its own rule: the window budget, or enough finished episodes.
    history = saved["meta"]
    finished = history["episodes_done"][-1] >= config.meta.episodes
    assert len(history["loss"]) == config.meta.max_windows or finished, history
    assert len(history["loss"]) <= config.meta.max_windows
    assert results["steps"][-1] == config.task_b.steps


@pytest.mark.slow
def test_exp2_smoke(tmp_path):
    _, results, _ = run_smoke(exp2, tmp_path)
    assert_golden(results, "exp2_smoke")


@pytest.mark.slow
def test_exp3_smoke_runs_every_method_from_a_held_out_checkpoint(tmp_path):
    config, results, saved = run_smoke(exp3, tmp_path, ALL)
    assert_golden(results, "exp3_smoke")
    assert list(saved["methods"]) == list(ALL)
    runs = config.num_seeds * config.pools.meta_test_tasks
    for name, hist in saved["methods"].items():
        acc = np.asarray(hist["readout_A"], float)
        assert acc.shape == (runs, len(results["steps"])), name
        assert np.all(np.isfinite(acc)), name
    # SGD and the learned rule start from the held-out checkpoint: the same step-0 probe.
    np.testing.assert_allclose(saved["methods"]["sgd"]["readout_A"][0][0],
                               saved["methods"]["learned"]["readout_A"][0][0])  # fmt: skip
    assert "avg acc" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_exp4_smoke(tmp_path):
    _, results, _ = run_smoke(exp4, tmp_path)
    assert_golden(results, "exp4_smoke")


def test_exp5_smoke_runs_every_method_on_three_tasks(tmp_path):
    config, results, saved = run_smoke(exp5, tmp_path, ALL)
    assert_golden(results, "exp5_smoke")
    for name in ("config.json", "results.json", "results.md", "exp5_tasks.png",
                 "fig6_curriculum.png", "fig7_delta.png"):  # fmt: skip
        assert os.path.getsize(tmp_path / name) > 0, name
    assert list(saved["methods"]) == list(ALL)
    b = config.task_b
    assert saved["steps"][-1] == b.steps_2 + b.steps_3
    shape = (config.num_seeds, (b.steps_2 + b.steps_3) // b.probe_every + 1)
    for name, hist in saved["methods"].items():
        for metric in READOUT_3:
            acc = np.asarray(hist[metric], float)
            assert acc.shape == shape and np.all(np.isfinite(acc)), (name, metric)
    # The methods that start from the pre-trained network share one step-0 probe.
    for metric in READOUT_3:
        np.testing.assert_allclose(saved["methods"]["sgd"][metric][0][0],
                                   saved["methods"]["lwf"][metric][0][0])  # fmt: skip
    stats = cl_metrics.summarize(saved, READOUT_3, saved["task_ends"])
    assert set(stats["ewc"]) >= {"avg_acc", "bwt", "forgetting_readout_1"}
    assert saved["task_ends"] == [0, b.steps_2 // b.probe_every, shape[1] - 1]
    assert "avg acc" in (tmp_path / "results.md").read_text()
    assert len(saved["meta"]["switches"]) == config.meta.max_windows
    assert results["switch_step"] == b.steps_2


def _read(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_goldens_of_two_cpu_kinds_differ_by_rounding_only():
    """The AVX2 goldens (`tests/golden/`) and those of each other recorded CPU kind, same code:
    unequal to 1e-6, equal within `LOOSE`; and `LOOSE` still sees a change of a few test
    examples or of a loss by a few percent."""
    kinds = sorted(os.listdir(golden_numbers.KINDS_DIR))
    assert kinds, "no goldens of a second CPU kind"
    for kind in kinds:
        for file in sorted(os.listdir(os.path.join(golden_numbers.KINDS_DIR, kind))):
            base = _read(golden_numbers.GOLDEN_DIR, file)
            other = _read(golden_numbers.KINDS_DIR, kind, file)
            assert list(other) == list(base), (kind, file)
            assert golden_numbers.differences(base, other, loose=True) == [], (kind, file)
    base = _read(golden_numbers.GOLDEN_DIR, "exp1_smoke_all.json")
    other = _read(golden_numbers.KINDS_DIR, kinds[0], "exp1_smoke_all.json")
    assert golden_numbers.differences(base, other), "the two kinds round alike: no need for two"
    for key, change in (("sgd/readout_A", 0.03), ("learned/loss", 0.03), ("meta/loss", 0.03)):
        values = np.asarray(other[key], np.float64)
        moved = {**other, key: (values + change if "readout" in key else values * (1 + change))}
        found = golden_numbers.differences(base, moved, loose=True)
        assert [d.split(":")[0] for d in found] == [key], key
