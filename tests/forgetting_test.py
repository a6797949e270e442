"""End to end: the Fig.-1 pipeline on generated data, its artefacts, determinism, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments.configs import fig1
from l2r import forgetting
from l2r import workdir as workdir_lib
from l2r.data.sources import DataError
from l2r.experiment import ConfigError


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
        return forgetting.run(config, str(workdir))


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
    # Same workdir, --overwrite: the pre-trained checkpoint is found and reused.
    again = run_locked(smoke_config(), workdir, overwrite=True)
    assert again["timing"]["pretrain_s"] < 1.0
    # Fresh workdir: everything recomputed from the seed.
    fresh = run_locked(smoke_config(), tmp_path / "fresh")
    for other in (again, fresh):
        for name, metrics in first["methods"].items():
            for metric, values in metrics.items():
                np.testing.assert_array_equal(
                    values, other["methods"][name][metric], err_msg=f"{name}/{metric}"
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
