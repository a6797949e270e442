"""The paper's claims as checks: numbers from an independent computation on generated results,
verdicts that follow the criteria, missing methods said, and the command line script."""

import json
import subprocess
import sys

import numpy as np

from l2r import reproduction

STEPS = [0, 100, 200, 300, 400, 500]


def _history(rng, start, end, seeds=5, metrics=("readout_A", "readout_B", "original_A")):
    """[S, P] curves from `start` to `end` (fractions) per metric, with seed noise."""
    h = {}
    for m in metrics:
        line = np.linspace(start.get(m, 0.9), end.get(m, 0.9), len(STEPS))
        h[m] = (line + rng.normal(0, 0.005, (seeds, len(STEPS)))).tolist()
    h["loss"] = np.full((seeds, len(STEPS)), 0.5).tolist()
    return h


def _two_tasks(rng, experiment="exp2", forgetting=None, b_end=None):
    forgetting = forgetting or {"sgd": 0.12, "ewc": 0.11, "lwf": 0.10, "learned": 0.04}
    b_end = b_end or {"sgd": 0.95, "ewc": 0.95, "lwf": 0.94, "learned": 0.93}
    methods = {m: _history(rng, {"readout_A": 0.95, "readout_B": 0.5},
                           {"readout_A": 0.95 - f, "readout_B": b_end[m]})
               for m, f in forgetting.items()}  # fmt: skip
    provenance = {"command": ["/x/experiments/validate.py", "--c"], "commit": "abc1234def",
                  "dirty": False, "time_utc": "2026-12-05T10:00:00+00:00"}  # fmt: skip
    return {"experiment": experiment, "preset": "cpu", "steps": STEPS, "seeds": list(range(5)),
            "methods": methods, "provenance": provenance}  # fmt: skip


def test_fig1_drop_at_step_300_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    sgd = _history(rng, {"readout_A": 0.95, "original_A": 0.95},
                   {"readout_A": 0.70, "original_A": 0.40})  # fmt: skip
    results = {"experiment": "fig1", "preset": "cpu", "steps": STEPS, "seeds": list(range(5)),
               "methods": {"sgd": sgd}}  # fmt: skip
    c = reproduction.check(results)
    a = np.asarray(sgd["readout_A"])
    drop = 100 * (a[:, 0] - a[:, 3])  # Step 300 is column 3.
    assert f"readout A −{drop.mean():.1f} ± {drop.std(ddof=1):.1f}" in c.ours
    assert c.parts == (True, True) and c.verdict == "reproduced"
    # A smaller drop than the paper's 15 points: partly (the original head still drops more).
    sgd_small = _history(rng, {"readout_A": 0.95, "original_A": 0.95},
                         {"readout_A": 0.80, "original_A": 0.40})  # fmt: skip
    c = reproduction.check({**results, "methods": {"sgd": sgd_small}})
    assert c.parts == (False, True) and c.verdict == "partly"
    c = reproduction.check({**results, "steps": [0, 250, 500]})
    assert c.verdict == "no data"


def test_two_task_claim_compares_forgetting_and_the_task_b_gap():
    rng = np.random.default_rng(1)
    c = reproduction.check(_two_tasks(rng))
    assert c.verdict == "reproduced" and len(c.parts) == 4
    # The learned rule forgets more than LwF, and is 5 points behind on B.
    worse = _two_tasks(rng, forgetting={"sgd": 0.12, "ewc": 0.11, "lwf": 0.03, "learned": 0.04},
                       b_end={"sgd": 0.95, "ewc": 0.95, "lwf": 0.94, "learned": 0.90})  # fmt: skip
    c = reproduction.check(worse)
    assert c.parts == (True, True, False, False) and c.verdict == "partly"
    b = {m: 100 * np.asarray(h["readout_B"])[:, -1].mean() for m, h in worse["methods"].items()}
    assert f"({b['sgd'] - b['learned']:+.1f} behind)" in c.ours
    # Baselines the claim names but the run lacks are said next to the verdict.
    few = _two_tasks(rng, forgetting={"sgd": 0.12, "learned": 0.04},
                     b_end={"sgd": 0.95, "learned": 0.94})  # fmt: skip
    c = reproduction.check(few)
    assert c.verdict == "reproduced (without ewc, lwf: not run)"
    assert reproduction.check(_two_tasks(rng, forgetting={"sgd": 0.1},
                                         b_end={"sgd": 0.9})).verdict == "no data"  # fmt: skip


def test_the_script_prints_a_row_per_run_with_its_command(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("exp2_cpu", "exp4_cpu"):
        (tmp_path / name).mkdir()
        exp = name.split("_")[0]
        (tmp_path / name / "results.json").write_text(json.dumps(_two_tasks(rng, exp)))
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduction",
                           str(tmp_path / "exp2_cpu"), str(tmp_path / "exp4_cpu")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("**reproduced**") == 2
    assert "`python -m experiments.validate --c` (commit abc1234, 2026-12-05)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduction", str(tmp_path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
