"""l2r-agree: Welch's z of two runs' seed statistics against an independent computation, runs
from one distribution agree, a shifted one does not, and bad input is one line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from l2r.cli import agree

STEPS = [0, 50, 100]


def _results(rng, shift=0.0, seeds=5, methods=("sgd", "lwf")):
    out = {}
    for m in methods:
        hist = {k: rng.uniform(0.6, 0.9, (seeds, len(STEPS))) for k in ("readout_A", "readout_B")}
        hist["readout_A"][:, -1] += shift
        hist["loss"] = rng.uniform(0.1, 1.0, (seeds, len(STEPS)))
        hist["loss"][:, 0] = np.nan
        out[m] = {k: v.tolist() for k, v in hist.items()}
    return {"experiment": "fig1", "preset": "cpu", "steps": STEPS, "seeds": list(range(seeds)),
            "methods": out}  # fmt: skip


def test_z_is_welchs_statistic_of_each_seed_statistic():
    rng = np.random.default_rng(0)
    a, b = _results(rng), _results(rng, seeds=4)
    rows = {(r["method"], r["stat"]): r for r in agree.agreement(a, b)}
    assert {s for _, s in rows} == {"readout_A_before", "readout_A", "forgetting_A",
                                    "readout_B", "avg_acc"}  # fmt: skip
    for method in ("sgd", "lwf"):
        xa = np.asarray(a["methods"][method]["readout_A"])
        xb = np.asarray(b["methods"][method]["readout_A"])
        fa, fb = xa[:, 0] - xa[:, -1], xb[:, 0] - xb[:, -1]  # Forgetting per seed.
        for stat, (va, vb) in {"readout_A": (xa[:, -1], xb[:, -1]),
                               "forgetting_A": (fa, fb)}.items():  # fmt: skip
            se = np.sqrt(va.var(ddof=1) / len(va) + vb.var(ddof=1) / len(vb))
            row = rows[(method, stat)]
            np.testing.assert_allclose(row["z"], (vb.mean() - va.mean()) / se, rtol=1e-6)
            assert (row["a"]["n"], row["b"]["n"]) == (5, 4)


def test_runs_of_one_distribution_agree_and_a_shifted_one_does_not():
    rng = np.random.default_rng(1)
    draw = lambda: _results(rng, seeds=20)  # noqa: E731
    alarms = [not r["agrees"] for _ in range(40) for r in agree.agreement(draw(), draw())]
    assert np.mean(alarms) < 0.1  # |z| < 2: about 5% false alarms.
    a = _results(rng, seeds=20)
    shifted = _results(rng, shift=-0.2, seeds=20)  # Task A forgotten 20 points more.
    bad = {(r["method"], r["stat"]) for r in agree.agreement(a, shifted) if not r["agrees"]}
    assert {("sgd", "readout_A"), ("sgd", "forgetting_A"), ("lwf", "readout_A")} <= bad


def test_identical_runs_agree_and_only_shared_methods_are_compared():
    rng = np.random.default_rng(2)
    a = _results(rng)
    b = json.loads(json.dumps(a))
    del b["methods"]["lwf"]
    rows = agree.agreement(a, b)
    assert {r["method"] for r in rows} == {"sgd"}
    assert all(r["agrees"] and r["z"] == 0 for r in rows)


@pytest.mark.parametrize("shift,status", [(0.0, 0), (-0.3, 1)])
def test_the_command_prints_the_table_and_exits_by_agreement(tmp_path, shift, status):
    rng = np.random.default_rng(3)
    for name, s in (("a", 0.0), ("b", shift)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(rng, shift=s)))
    proc = subprocess.run([sys.executable, "-m", "l2r.cli.agree", str(tmp_path / "a"),
                           str(tmp_path / "b")], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == status, proc.stderr
    assert "| sgd | readout_A |" in proc.stdout
    (tmp_path / "c").mkdir()
    proc = subprocess.run([sys.executable, "-m", "l2r.cli.agree", str(tmp_path / "a"),
                           str(tmp_path / "c")], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "results.json" in proc.stderr
