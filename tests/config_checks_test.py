"""The config checks every pipeline runs before loading anything: each bad value stops with one
line naming the field, and every preset of every experiment passes."""

import importlib
import math

import pytest

from l2r.config_checks import ConfigError
from l2r.pipelines import PIPELINES

EXPERIMENTS = ("fig1", "exp1", "exp2", "exp3", "exp4", "exp5")


def config_of(experiment, preset="smoke", **overrides):
    config = importlib.import_module(f"l2r.configs.{experiment}").get_config(preset)
    for dotted, value in overrides.items():
        node = config
        *path, leaf = dotted.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def check(config):
    importlib.import_module(PIPELINES[config.experiment]).check_config(config)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_passes(experiment):
    module = importlib.import_module(f"l2r.configs.{experiment}")
    for preset in module.PRESETS:
        check(module.get_config(preset))


@pytest.mark.parametrize(
    "experiment, overrides, words",
    [
        ("fig1", {"task_b.learning_rate": math.nan}, "task_b.learning_rate=nan"),
        ("fig1", {"task_b.learning_rate": -0.1}, "task_b.learning_rate=-0.1"),
        ("fig1", {"task_b.learning_rate": 0.0}, "task_b.learning_rate=0.0"),
        ("fig1", {"pretrain.learning_rate": math.inf}, "pretrain.learning_rate=inf"),
        ("fig1", {"readout.learning_rate": math.nan}, "readout.learning_rate=nan"),
        ("fig1", {"task_b.batch_size": -3}, "task_b.batch_size=-3"),
        ("fig1", {"task_b.batch_size": 0}, "task_b.batch_size=0"),
        ("fig1", {"task_b.lwf.coef": math.nan}, "task_b.lwf.coef=nan"),
        ("exp1", {"task_b.methods": ()}, "task_b.methods is empty"),
        ("exp1", {"meta.checkpoint_minutes": -1.0}, "meta.checkpoint_minutes=-1.0"),
        ("exp1", {"meta.max_windows": -1}, "meta.max_windows=-1"),
        ("exp1", {"meta.tbptt": 8, "meta.tbptt_max": 8}, "meta.tbptt_max=8"),
        ("exp1", {"meta.inner_steps_min": 7}, "meta.inner_steps_min=7"),
        ("exp1", {"meta.inner_steps_min": -2}, "meta.inner_steps_min=-2"),
        ("exp5", {"task_b.steps_3": 0}, "task_b.steps_3=0"),
        ("exp2", {"task_b.ewc.coef": -1.0}, "task_b.ewc.coef=-1.0"),
    ],
)
def test_a_bad_value_stops_at_once_with_one_line_naming_it(experiment, overrides, words):
    config = config_of(experiment, **overrides)
    with pytest.raises(ConfigError) as info:
        check(config)  # the pipeline's checks: nothing is loaded, compiled or trained
    message = str(info.value)
    assert words in message and "\n" not in message, message
