"""End to end: every smoke preset, run as `python -m experiments.run` runs it, gives the numbers
the code gave before the l2r/ restructure (`tests/golden/`, to 1e-6), so later changes are held
to them too. A deliberate change of the numbers re-records the goldens in the same commit
(`python -m tests.golden_numbers record WORKDIR NAME`) and says why."""

import importlib

import pytest

from experiments.configs import exp1, exp2, exp3, exp4, exp5, fig1
from l2r.pipelines import PIPELINES
from tests import golden_numbers

ALL_FIG1 = ("sgd", "sgd_x0.1", "lwf", "ewc", "hat", "teacher")
ALL = ("sgd", "sgd_x0.1", "lwf", "ewc", "hat", "oml", "rep", "teacher", "learned")

# (config module, methods override or None, the goldens the run must reproduce)
PRESETS = {
    "fig1": (fig1, ALL_FIG1, ("fig1_smoke", "fig1_smoke_all")),
    "exp1": (exp1, ALL, ("exp1_smoke", "exp1_smoke_all")),
    "exp2": (exp2, None, ("exp2_smoke",)),
    "exp3": (exp3, None, ("exp3_smoke",)),
    "exp4": (exp4, None, ("exp4_smoke",)),
    "exp5": (exp5, None, ("exp5_smoke",)),
}


def run_smoke(name, workdir):
    module, methods, _ = PRESETS[name]
    config = module.get_config("smoke")
    if methods is not None:
        config.task_b.methods = methods
    pipeline = importlib.import_module(PIPELINES[config.experiment])
    return pipeline.run(config, str(workdir))


@pytest.mark.parametrize(
    "name",
    [
        "fig1",
        "exp1",
        "exp5",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("exp2", "exp3", "exp4")),
    ],
)
def test_smoke_presets_give_the_recorded_numbers(name, tmp_path):
    got = golden_numbers.numbers(run_smoke(name, tmp_path))
    for golden in PRESETS[name][2]:
        assert golden_numbers.differences(golden_numbers.load(golden), got) == [], golden
