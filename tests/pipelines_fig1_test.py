"""The Fig.-1 pipeline on generated data: its artefacts, determinism, caches, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from l2r import histories, metalearner, models
from l2r import workdir as workdir_lib
from l2r.config_checks import ConfigError
from l2r.configs import fig1
from l2r.data.sources import DataError
from l2r.methods import make_method, make_sgd
from l2r.methods.learned import make_learned
from l2r.pipelines import fig1 as fig1_pipeline


def smoke_config(**overrides):
    config = fig1.get_config("smoke")
    for dotted, value in overrides.items():
        node = config
        *path, leaf = dotted.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def run_locked(config, workdir, overwrite=False):
    with workdir_lib.locked(str(workdir), overwrite):
        return fig1_pipeline.run(config, str(workdir))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    return workdir, run_locked(smoke_config(), workdir)


def test_smoke_run_writes_every_artefact(smoke_run):
    workdir, results = smoke_run
    for name in (
        "config.json",
        "results.json",
        "results.md",
        "fig1_task_A.png",
        "fig1_task_B.png",
        "fig1_cka.png",
    ):
        assert os.path.getsize(workdir / name) > 0, name
    assert any(f.startswith("events") for f in os.listdir(workdir / "tb"))
    with Image.open(workdir / "fig1_task_A.png") as im:
        assert im.size[0] > 100
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["steps"] == [0, 10, 20]
    assert set(saved["methods"]) == {"sgd", "sgd_x0.1", "teacher"}
    for method in saved["methods"].values():
        acc = np.asarray(method["readout_A"], dtype=float)
        assert acc.shape == (2, 3) and np.all((acc >= 0) & (acc <= 1))
        np.testing.assert_allclose(np.asarray(method["cka_A"], dtype=float)[:, 0], 1.0, atol=1e-4)
    md = (workdir / "results.md").read_text()
    assert "teacher" in md and "readout_A" in md
    # The pre-trained network learned Task A (3 synthetic classes; chance is 33%).
    assert min(saved["pretrain_test_accuracy"]) > 0.6


def test_same_seed_same_numbers_and_checkpoints_are_reused(smoke_run, tmp_path):
    workdir, first = smoke_run
    assert first["timing"]["task_b_reused"] == []
    # Same workdir, --overwrite: the pre-trained checkpoint and every method's Task-B histories
    # are found and reused.
    again = run_locked(smoke_config(), workdir, overwrite=True)
    assert again["timing"]["pretrain_s"] < 1.0
    assert again["timing"]["task_b_reused"] == ["sgd", "sgd_x0.1", "teacher"]
    # Fresh workdir: everything recomputed from the seed.
    fresh = run_locked(smoke_config(), tmp_path / "fresh")
    assert fresh["timing"]["task_b_reused"] == []
    for other in (again, fresh):
        for name, metrics in first["methods"].items():
            for metric, values in metrics.items():
                np.testing.assert_array_equal(
                    values, other["methods"][name][metric], err_msg=f"{name}/{metric}"
                )


def test_task_b_cache_is_keyed_by_what_shapes_the_histories(smoke_run, tmp_path):
    workdir, first = smoke_run
    shutil.copytree(workdir, tmp_path / "w")
    cache = tmp_path / "w" / "task_b"
    assert len(os.listdir(cache)) == 3 and not any(f.endswith(".tmp") for f in os.listdir(cache))
    # Every method cached: nothing trains and nothing is probed, not even the start.
    again = run_locked(smoke_config(), tmp_path / "w", overwrite=True)
    assert sorted(again["timing"]["task_b_reused"]) == sorted(first["methods"])
    assert again["timing"]["probe_s"] == 0.0
    # An added method runs alone; the others come from the cache.
    more = run_locked(smoke_config(**{"task_b.methods": ("sgd", "sgd_x0.3")}), tmp_path / "w",
                      overwrite=True)  # fmt: skip
    assert more["timing"]["task_b_reused"] == ["sgd"]
    np.testing.assert_array_equal(more["methods"]["sgd"]["readout_A"],
                                  first["methods"]["sgd"]["readout_A"])  # fmt: skip
    # A changed Task-B setting, readout or seed count misses the cache.
    for change in ({"task_b.learning_rate": 0.05}, {"readout.steps": 7}, {"num_seeds": 1}):
        other = run_locked(smoke_config(**change, **{"task_b.methods": ("sgd",)}), tmp_path / "w",
                           overwrite=True)  # fmt: skip
        assert other["timing"]["task_b_reused"] == [], change


def test_cache_key_follows_the_start_the_data_and_the_learned_rule():
    config = smoke_config()
    model = models.make_model("convnet", widths=(4,), groups=2, hidden=4)
    start = {"w": np.zeros(3, np.float32)}
    sgd = make_sgd(model, 0.1, "sgd")
    key = histories.history_key(config, [sgd], start, "data")
    assert key == histories.history_key(config, [sgd], start, "data")
    assert key != histories.history_key(config, [sgd], {"w": np.ones(3, np.float32)}, "data")
    assert key != histories.history_key(config, [sgd], start, "other data")
    # The learned rule: another θ, learning rate or gate is another key.
    params = model.init(jax.random.key(0), (1, 8, 8, 1))
    x = np.zeros((2, 8, 8, 1), np.float32)
    taps = model.apply(params, x, taps=True).taps
    ml = metalearner.make(params, taps)
    theta = ml.init(jax.random.key(1))
    learned = [
        make_learned(model, ml, theta, 0.1),
        make_learned(model, ml, jax.tree.map(lambda a: a + 1, theta), 0.1),
        make_learned(model, ml, theta, 0.2),
        make_learned(model, metalearner.make(params, taps, metalearner.Config(gate="exp")),
                     theta, 0.1),
    ]  # fmt: skip
    assert len({histories.history_key(config, [m], start, "data") for m in learned}) == 4
    # A baseline's own subgroup is in its key only: EWC's coefficient leaves SGD's key alone.
    other = smoke_config(**{"task_b.ewc.coef": 10.0, "task_b.cache_dir": "/elsewhere"})
    ewc = make_method("ewc", model, config.task_b)
    assert histories.history_key(other, [sgd], start, "data") == key
    assert histories.history_key(other, [ewc], start, "data") != histories.history_key(
        config, [ewc], start, "data"
    )


def test_different_seed_different_numbers(smoke_run, tmp_path):
    _, first = smoke_run
    other = run_locked(smoke_config(seed=1, **{"task_b.methods": ("sgd",)}), tmp_path)
    assert not np.array_equal(
        first["methods"]["sgd"]["loss"][:, 1:], other["methods"]["sgd"]["loss"][:, 1:]
    )


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        ({"data.classes_b": (2, 3, 4)}, DataError, "2"),
        ({"data.classes_b": ("3", "4", "no-such-class")}, DataError, "no-such-class"),
        ({"task_b.batch_size": 100_000}, ConfigError, "task_b.batch_size"),
        ({"pretrain.batch_size": 100_000}, ConfigError, "pretrain.batch_size"),
        ({"task_b.methods": ("sgd", "sdg")}, ConfigError, "sdg"),
        ({"task_b.probe_every": 7}, ConfigError, "probe_every"),
        ({"model.groups": 3}, ConfigError, "model.groups"),
        (
            {"data.source": "image_folder", "data.root": "/nonexistent/l2r"},
            DataError,
            "/nonexistent/l2r",
        ),
    ],
)
def test_bad_input_fails_fast_and_leaves_workdir_intact(smoke_run, overrides, error, words):
    workdir, _ = smoke_run
    before = {f: (workdir / f).read_bytes() for f in ("results.json", "config.json")}
    with pytest.raises(error, match=None) as info:
        run_locked(smoke_config(**overrides), workdir, overwrite=True)
    assert words in str(info.value)
    after = {f: (workdir / f).read_bytes() for f in before}
    assert before == after


def test_unreadable_image_is_named(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("a", "b", "c", "d"):
            os.makedirs(root / split / cls)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                    root / split / cls / f"{i}.png"
                )
    (root / "train" / "b" / "broken.png").write_bytes(b"not a png")
    config = smoke_config(
        **{
            "data.source": "image_folder",
            "data.root": str(root),
            "data.classes_a": ("a", "b"),
            "data.classes_b": ("c", "d"),
        }
    )
    with pytest.raises(DataError, match="broken.png"):
        run_locked(config, tmp_path / "work")


def test_finished_results_are_not_overwritten(smoke_run):
    workdir, _ = smoke_run
    before = (workdir / "results.json").read_bytes()
    with pytest.raises(workdir_lib.WorkdirError, match="--overwrite"):
        run_locked(smoke_config(), workdir)
    assert (workdir / "results.json").read_bytes() == before


def test_a_workdir_in_use_is_refused(tmp_path):
    with workdir_lib.locked(str(tmp_path)):
        with pytest.raises(workdir_lib.WorkdirError, match="in use"):
            with workdir_lib.locked(str(tmp_path)):
                pass
    with workdir_lib.locked(str(tmp_path)):  # Released when the first run ends.
        pass


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_rejects_mistyped_key_before_anything_runs(tmp_path):
    proc = run_cli(
        "--config=experiments/configs/fig1.py:smoke",
        f"--workdir={tmp_path}/w",
        "--config.task_b.stpes=3",
    )
    assert proc.returncode != 0
    assert "stpes" in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_cli_reports_bad_input_with_exit_code(tmp_path):
    proc = run_cli(
        "--config=experiments/configs/fig1.py:smoke",
        f"--workdir={tmp_path}/w",
        "--config.task_b.methods=('sgd','nope')",
    )
    assert proc.returncode == 2, proc.stderr
    assert "nope" in proc.stderr
