"""experiments.sweep: flag parsing and validation (fast), and a two-setting smoke sweep (slow)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from l2r.cli import sweep
from l2r.configs import fig1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
    config = fig1.get_config("smoke")
    config.task_b.methods = ("sgd",)
    config.lock()  # As config_flags hands it over.
    return config


def test_values_parse_to_the_field_types():
    sweeps = sweep.parse_sweeps(
        smoke_config(),
        [
            "task_b.learning_rate=0.05,1",
            "task_b.steps=10,20",
            "data.augment=true,False",
            "task_b.ewc.fisher='true',empirical",
            "task_b.methods=(sgd,sgd_x0.1),('teacher',)",
            "model.widths=(8,16),[4]",
        ],
    )
    assert sweeps == [
        ("task_b.learning_rate", [0.05, 1.0]),
        ("task_b.steps", [10, 20]),
        ("data.augment", [True, False]),
        ("task_b.ewc.fisher", ["true", "empirical"]),
        ("task_b.methods", [("sgd", "sgd_x0.1"), ("teacher",)]),
        ("model.widths", [(8, 16), (4,)]),
    ]
    assert isinstance(sweeps[0][1][1], float) and isinstance(sweeps[1][1][0], int)
    grid = sweep.settings(sweeps[:2])
    assert grid == [
        {"task_b.learning_rate": 0.05, "task_b.steps": 10},
        {"task_b.learning_rate": 0.05, "task_b.steps": 20},
        {"task_b.learning_rate": 1.0, "task_b.steps": 10},
        {"task_b.learning_rate": 1.0, "task_b.steps": 20},
    ]


@pytest.mark.parametrize(
    "specs, words",
    [
        ([], ["at least one --sweep"]),
        (["task_b.ewc.cof=1,2"], ["task_b.ewc.cof", "coef", "Did you mean task_b.ewc.coef"]),
        (["taskb.learning_rate=0.1"], ["'taskb'", "task_b"]),
        (["task_b.ewc=1"], ["group", "task_b.ewc.coef"]),
        (["seed.x=1"], ["seed is a value"]),
        (["task_b.steps=10,1.5"], ["'1.5'", "task_b.steps", "int", "--sweep=task_b.steps=1,2"]),
        (["data.augment=maybe"], ["data.augment", "bool", "true,false"]),
        (["task_b.learning_rate=fast"], ["'fast'", "task_b.learning_rate", "float"]),
        (["task_b.learning_rate"], ["<field>=<v1>,<v2>"]),
        (["task_b.learning_rate=0.1,"], ["empty value"]),
        (["seed=1", "seed=2"], ["swept twice"]),
    ],
)
def test_bad_flags_are_named_with_a_fix(specs, words):
    with pytest.raises(sweep.SweepError) as info:
        sweep.parse_sweeps(smoke_config(), specs)
    for word in words:
        assert word in str(info.value)


def test_a_setting_that_fails_the_experiment_checks_stops_the_sweep_before_it_runs(tmp_path):
    sweeps = sweep.parse_sweeps(smoke_config(), ["task_b.probe_every=10,7"])
    with pytest.raises(sweep.SweepError, match=r"task_b.probe_every=7.*multiple"):
        sweep.run_sweep(smoke_config(), str(tmp_path / "w"), sweeps)
    assert not os.path.exists(tmp_path / "w")
    bad_method = sweep.parse_sweeps(smoke_config(), ["task_b.methods=(sgd,),(sgd,nope)"])
    with pytest.raises(sweep.SweepError, match="nope"):
        sweep.run_sweep(smoke_config(), str(tmp_path / "w"), bad_method)
    assert not os.path.exists(tmp_path / "w")


def test_cli_rejects_a_bad_sweep_key_before_anything_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sweep",
            "--config=experiments/configs/fig1.py:smoke",
            f"--workdir={tmp_path}/w",
            "--sweep=task_b.learning_rate=0.1,0.2",
            "--sweep=task_b.lwf.temprature=1,2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "task_b.lwf.temprature" in proc.stderr and "task_b.lwf.temperature" in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_smoke_sweep_runs_every_setting_shares_pretraining_and_resumes(tmp_path):
    workdir = str(tmp_path / "sweep")
    config = smoke_config()
    sweeps = sweep.parse_sweeps(config, ["task_b.learning_rate=0.05,0.1"])
    rows = sweep.run_sweep(config, workdir, sweeps)

    runs = ["000_task_b.learning_rate=0.05", "001_task_b.learning_rate=0.1"]
    assert [r["run"] for r in rows] == runs and {r["method"] for r in rows} == {"sgd"}
    for name, lr in zip(runs, (0.05, 0.1), strict=True):
        saved = json.loads(open(os.path.join(workdir, name, "results.json")).read())
        assert saved["config"]["task_b"]["learning_rate"] == lr
        assert saved["config"]["pretrain"]["dir"] == os.path.join(workdir, "pretrain")
        assert os.path.exists(os.path.join(workdir, name, "results.md"))
    # One set of pre-trained checkpoints (one config fingerprint), shared by both settings.
    assert len(os.listdir(os.path.join(workdir, "pretrain"))) == 1
    assert len(os.listdir(os.path.join(workdir, "task_b"))) == 2  # one per learning rate
    for r in rows:
        for stat in ("readout_A_before", "readout_A", "readout_B"):
            assert 0 <= r[stat]["mean"] <= 1 and r[stat]["std"] >= 0
        np.testing.assert_allclose(
            r["forgetting_A"]["mean"], r["readout_A_before"]["mean"] - r["readout_A"]["mean"]
        )
    # Same pre-trained network and data, different learning rates: same start, different end.
    assert rows[0]["readout_A_before"] == rows[1]["readout_A_before"]
    assert rows[0]["readout_B"] != rows[1]["readout_B"]

    table = open(os.path.join(workdir, "sweep.md")).read()
    assert "2/2 settings done" in table
    assert "| run | task_b.learning_rate | method | readout A before (%)" in table
    assert "| 000 | 0.05 | sgd |" in table and "| 001 | 0.1 | sgd |" in table
    saved = json.loads(open(os.path.join(workdir, "sweep.json")).read())
    assert saved["keys"] == ["task_b.learning_rate"] and len(saved["rows"]) == 2
    assert saved["rows"][1]["setting"] == {"task_b.learning_rate": 0.1}

    # Run again: finished settings are reused, not rerun, with the same numbers.
    t0 = time.time()
    again = sweep.run_sweep(config, workdir, sweeps)
    assert time.time() - t0 < 5
    assert again == rows
    # A different base config in the same workdir is refused rather than silently mixed.
    other = smoke_config()
    with other.unlocked():
        other.num_seeds = 1
    with pytest.raises(
        sweep.SweepError, match=r"different config.*\(differs in num_seeds\).*--overwrite"
    ):
        sweep.run_sweep(other, workdir, sweeps)


def test_a_baseline_sweep_runs_the_other_methods_once(tmp_path):
    workdir = str(tmp_path / "sweep")
    config = smoke_config()
    with config.unlocked():
        config.task_b.methods = ("sgd", "ewc")
    rows = sweep.run_sweep(config, workdir, sweep.parse_sweeps(config, ["task_b.ewc.coef=0.5,50"]))
    runs = sorted({r["run"] for r in rows})
    reused = [
        json.loads(open(os.path.join(workdir, run, "results.json")).read())["timing"]
        for run in runs
    ]
    assert [t["task_b_reused"] for t in reused] == [[], ["sgd"]]
    by = {(r["run"], r["method"]): r for r in rows}
    # SGD ran once and both settings report its numbers; EWC ran per coefficient.
    assert by[(runs[0], "sgd")]["readout_B"] == by[(runs[1], "sgd")]["readout_B"]
    assert by[(runs[0], "ewc")]["readout_A"] != by[(runs[1], "ewc")]["readout_A"]
