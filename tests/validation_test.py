"""The validation protocol: a split held out from the training data that replaces the test split
(`config.validation`), and `l2r-sweep --select=validation`, which picks each method's setting on
it and reports the picked settings on the test split."""

import copy
import glob
import json
import os

import numpy as np
import pytest

from l2r import config_checks
from l2r.cli import sweep
from l2r.configs import exp2, fig1
from l2r.data import plan, sources, tasks
from l2r.pipelines import fig1 as fig1_pipeline


def _ids(split) -> set:
    """Each example by content (the generated images carry independent noise, so they differ)."""
    return {img.tobytes() for img in split.images}


def _dataset(counts=(30, 7, 2), size=3) -> sources.Dataset:
    """Images that encode their own index, so that every example is identifiable."""
    labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(counts)])
    gen = np.random.default_rng(0)
    labels = labels[gen.permutation(len(labels))]
    idx = np.arange(len(labels))
    images = np.zeros((len(labels), size, size, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = idx % 256, idx // 256
    test = sources.Split(images[:4] + 1, labels[:4])
    return sources.Dataset("ids", sources.Split(images, labels), test, ("a", "b", "c"))


def test_validation_split_holds_out_a_share_of_each_class_of_the_training_data():
    data = _dataset()
    carved = tasks.validation_split(data, 0.2, seed=3)
    train_ids, val_ids = _ids(carved.train), _ids(carved.test)
    assert not train_ids & val_ids
    assert train_ids | val_ids == _ids(data.train)  # Nothing lost, nothing of the test split.
    assert not val_ids & _ids(data.test)
    per_class = np.bincount(carved.test.labels, minlength=3)
    np.testing.assert_array_equal(per_class, [6, 1, 1])  # round(0.2 n), at least 1, not all
    # Original order within each part; labels travel with their images.
    position = {img.tobytes(): i for i, img in enumerate(data.train.images)}
    for part in (carved.train, carved.test):
        order = [position[img.tobytes()] for img in part.images]
        assert order == sorted(order)
        np.testing.assert_array_equal(part.labels, data.train.labels[order])
    again = tasks.validation_split(data, 0.2, seed=3)
    np.testing.assert_array_equal(again.test.images, carved.test.images)
    other = tasks.validation_split(data, 0.2, seed=4)
    assert _ids(other.test) != val_ids


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_validation_split_refuses_a_share_outside_zero_one(fraction):
    with pytest.raises(sources.DataError, match=r"validation fraction .* must be in \(0, 1\)"):
        tasks.validation_split(_dataset(), fraction, 0)


def test_validation_split_refuses_a_class_with_one_training_example():
    with pytest.raises(sources.DataError, match=r"class 'c' has 1 training example.*at least 2"):
        tasks.validation_split(_dataset(counts=(5, 5, 1)), 0.1, 0)


@pytest.mark.parametrize("value", [1.0, 2.5, -0.5])
def test_config_check_names_the_field_and_the_range(value):
    config = fig1.get_config("smoke")
    config.validation = value
    with pytest.raises(config_checks.ConfigError, match=rf"validation={value}.*(\[0, 1\)|>= 0)"):
        fig1_pipeline.check_config(config)


def test_tasks_built_with_validation_on_never_see_the_test_split():
    config = fig1.get_config("smoke")
    raw = plan.load_dataset(config.data)
    config.validation = 0.25
    task_a, task_b, mean, std = plan.build_tasks(config)
    test_ids, train_ids = _ids(raw.test), _ids(raw.train)
    for task in (task_a, task_b):
        held, fit = _ids(task.test), _ids(task.train)
        assert held and not held & test_ids and held <= train_ids
        assert not held & fit
        assert len(task.test.labels) == round(0.25 * (len(task.train.labels) + len(held)))
    # The normalisation is that of the training part only.
    carved = plan.load_data(config)
    np.testing.assert_allclose(mean, tasks.normalization_stats(carved.train)[0])


def test_pools_with_validation_on_hold_out_within_their_own_classes():
    """Exp 2: the meta-test tasks' held-out examples come from the meta-test classes' training
    data, and the meta-training pool shares no class with the meta-test pool."""
    config = exp2.get_config("smoke")
    config.validation = 0.2
    task_a, task_b, _, _ = plan.build_tasks(config)
    train_pool, test_pool = plan.load_pools(config, task_a)
    tasks.assert_disjoint(meta_train=train_pool, meta_test=test_pool)
    raw = plan.load_dataset(config.pools.meta_test if config.pools.meta_test.source
                            else config.data)  # fmt: skip
    test_ids, train_ids = _ids(raw.test), _ids(raw.train)
    held = _ids(test_pool.test)
    assert held and not held & test_ids and held <= train_ids
    assert not held & _ids(train_pool.train) and not held & _ids(test_pool.train)


def _config(methods=("sgd", "sgd_x0.1")):
    config = fig1.get_config("smoke")
    config.num_seeds = 2
    config.task_b.methods = methods
    config.lock()
    return config


def test_select_takes_the_best_average_without_divergence_and_the_first_of_ties():
    def row(run, method, a, b, diverged=0):
        stat = lambda m: None if m is None else {"mean": m, "std": 0.0}  # noqa: E731
        avg = None if a is None else (a + b) / 2
        return {"run": run, "setting": {"x": run}, "method": method, "runs": 2,
                "diverged": diverged, "readout_A": stat(a), "readout_B": stat(b),
                "avg_acc": stat(avg)}  # fmt: skip

    rows = [
        row("0", "sgd", 0.5, 0.9), row("0", "ewc", 0.8, 0.9), row("0", "lwf", None, None, 2),
        row("1", "sgd", 0.6, 0.8), row("1", "ewc", 0.99, 0.99, 1), row("1", "lwf", None, None, 2),
        row("2", "sgd", 0.6, 0.8), row("2", "ewc", 0.7, 0.9),
    ]  # fmt: skip
    picked = sweep.select(rows)
    assert list(picked) == ["sgd", "ewc", "lwf"]
    assert picked["sgd"]["run"] == "0"  # 0.7 each: the first setting
    assert picked["ewc"]["run"] == "0"  # setting 1 scores higher but one seed diverged
    assert picked["lwf"] is None


@pytest.mark.slow
def test_selection_picks_what_a_brute_force_loop_over_validation_runs_picks(tmp_path):
    config = _config()
    sweeps = sweep.parse_sweeps(config, ["task_b.learning_rate=0.02,1.0"])
    selected = sweep.run_selection(config, str(tmp_path / "sweep"), sweeps)

    # Brute force: every setting run on its own with validation on, scored by hand.
    shared = str(tmp_path / "sweep" / "pretrain")  # Pre-training is not what is tested here.
    scores, tested = {}, {}
    for lr in (0.02, 1.0):
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            cfg.validation, cfg.task_b.learning_rate, cfg.pretrain.dir = 0.1, lr, shared
        results = fig1_pipeline.run(cfg, str(tmp_path / f"val_{lr}"))
        for method, hist in results["methods"].items():
            last = lambda k: np.mean(np.asarray(hist[k])[:, -1])  # noqa: E731, B023
            scores.setdefault(method, []).append((last("readout_A") + last("readout_B")) / 2)
    best = {m: (0.02, 1.0)[int(np.argmax(s))] for m, s in scores.items()}
    assert {s["method"]: s["setting"]["task_b.learning_rate"] for s in selected} == best
    assert len(set(best.values())) == 2, "the test should make the methods pick differently"
    for s in selected:
        assert s["validation"] == 0.1
        np.testing.assert_allclose(s["validation_score"], max(scores[s["method"]]), atol=1e-6)

    # The reported numbers are the picked setting's on the test split.
    for method, lr in best.items():
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            cfg.task_b.learning_rate, cfg.pretrain.dir = lr, shared
            cfg.task_b.methods = (method,)
        tested[method] = fig1_pipeline.run(cfg, str(tmp_path / f"test_{method}"))
        saved = json.loads(
            open(
                tmp_path
                / "sweep"
                / "test"
                / next(s["run"] for s in selected if s["method"] == method)
                / "results.json"
            ).read()
        )
        assert saved["config"]["validation"] == 0.0
        # The test run probes as configured; the validation runs at the start and end only.
        assert saved["steps"] == list(range(0, config.task_b.steps + 1, config.task_b.probe_every))
    for run in glob.glob(str(tmp_path / "sweep" / "00*" / "results.json")):
        assert json.loads(open(run).read())["steps"] == [0, config.task_b.steps]
    for s in selected:
        hist = tested[s["method"]]["methods"][s["method"]]
        np.testing.assert_allclose(
            s["test"]["readout_B"]["mean"], np.mean(np.asarray(hist["readout_B"])[:, -1]), atol=1e-6
        )
    table = open(tmp_path / "sweep" / "selected.md").read()
    assert (
        "validation score (%)" in table
        and "| sgd | 0.02 |" in table
        and "| sgd_x0.1 | 1.0 |" in table
    )
    assert "validation split (10%" in open(tmp_path / "sweep" / "sweep.md").read()
    assert os.path.exists(tmp_path / "sweep" / "selected.json")


@pytest.mark.slow
def test_validate_keeps_each_methods_best_value_and_tests_them_all_in_one_run(tmp_path):
    from l2r.cli import validate

    config = _config(("sgd_x0.1", "teacher", "lwf"))
    out = validate.run_validated(
        config, str(tmp_path / "v"), overrides=["task_b.lwf.coef=0.3,3"], sgd_scales=["1", "3"]
    )
    selected, results = out["selected"], out["results"]
    assert set(selected) == {"lwf", "sgd"}
    rows = json.loads(open(tmp_path / "v" / "select" / "lwf" / "sweep.json").read())["rows"]
    best = max(rows, key=lambda r: (sweep.score(r), -int(r["run"][:3])))
    assert selected["lwf"]["setting"] == best["setting"]
    assert selected["sgd"]["method"] in ("sgd", "sgd_x3")
    final = results["config"]
    assert final["validation"] == 0.0
    assert final["task_b"]["lwf"]["coef"] == best["setting"]["task_b.lwf.coef"]
    assert list(results["methods"]) == ["sgd_x0.1", "teacher", "lwf", selected["sgd"]["method"]]
    # The final run reuses the selection's test runs: the same numbers.
    for entry in selected.values():
        hist = results["methods"][entry["method"]]
        np.testing.assert_allclose(
            entry["test"]["readout_B"]["mean"], np.mean(np.asarray(hist["readout_B"])[:, -1]),
            atol=1e-7,
        )  # fmt: skip
    # Only the method without a grid runs for the first time; the teacher ran beside the sweeps.
    reused = {"teacher", "lwf", selected["sgd"]["method"]}
    assert set(results["timing"]["task_b_reused"]) == reused
    table = open(tmp_path / "v" / "validated.md").read()
    assert "| lwf | task_b.lwf.coef | 0.3, 3.0 |" in table
    assert "| sgd | task_b.methods | (sgd), (sgd_x3) |" in table
