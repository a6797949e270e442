"""The paper's own recipe, run end to end on CPU: `exp1:paper` with its exact network and
meta-training (ResNet-32-GN, Algorithm 1's meta-update every inner step, Huber × 300 on raw
representations, tanh gates, 4 episodes in flight, T-BPTT 5), its data swapped for a generated
CIFAR-shaped image folder and its budgets cut to a few steps and two windows by command-line
overrides alone: the code path a GPU user of the `paper` presets runs, so that they do not meet
its first bug."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from l2r.configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Budgets only: the network, the meta-learner and Algorithm 1's settings stay the paper's.
BUDGET = [
    "--config.num_seeds=1",
    "--config.pretrain.steps=3",
    "--config.pretrain.batch_size=16",
    "--config.task_b.steps=2",
    "--config.task_b.probe_every=2",
    "--config.task_b.batch_size=8",
    "--config.task_b.teacher_batch_a=8",
    "--config.readout.steps=5",
    "--config.readout.train_size=40",
    "--config.readout.test_size=20",
    "--config.readout.cka_size=20",
    "--config.meta.max_windows=2",
    "--config.meta.checkpoint_minutes=0",
    "--config.task_b.methods=('learned',)",  # The rule's meta-test; SGD's path is tested elsewhere.
]


def cifar_like_folder(root, per_class=(12, 4)):
    """root/{train,test}/<CIFAR-10 class>/*.jpg: 32x32 RGB noise, a brightness per class."""
    gen = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c, name in enumerate(common.CIFAR10_5A + common.CIFAR10_5B):
            os.makedirs(root / split / name)
            for i in range(n):
                pixels = np.clip(gen.normal(20 + 20 * c, 30, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg")
    return root


@pytest.mark.slow
def test_exp1_paper_recipe_runs_on_a_cpu(tmp_path):
    data = cifar_like_folder(tmp_path / "cifar10")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", "--config=exp1:paper", f"--workdir={workdir}",
           "--config.data.source=image_folder", f"--config.data.root={data}", *BUDGET]  # fmt: skip
    env = {**os.environ, "L2R_CACHE": str(tmp_path / "cache")}  # The decoded images go here.
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    with open(workdir / "config.json") as f:
        config = json.load(f)
    model, meta = config["model"], config["meta"]
    assert (model["name"], model["depth"], tuple(model["widths"])) == ("resnet", 32, (16, 32, 64))
    assert meta["update_every_step"] and meta["rep_loss"] == "huber" and meta["gate"] == "tanh"
    assert (meta["loss_scale"], meta["num_episodes_parallel"], meta["tbptt"]) == (300.0, 4, 5)
    with open(workdir / "results.json") as f:
        results = json.load(f)
    history = results["meta"]
    assert len(history["loss"]) == 2 and np.all(np.isfinite(history["loss"]))
    assert set(results["methods"]) == {"learned"}
    assert not results["diverged"]
