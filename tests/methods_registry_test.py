"""The methods registry: every learner by name, the learned rule and the teacher included; a
user's method registered from their own file runs like a built-in."""

import jax
import numpy as np
import pytest

from l2r import config_checks, metalearner, models
from l2r.configs import exp5, fig1
from l2r.methods import Method, registry
from l2r.methods.learned import Rule

TASK_B = exp5.get_config("smoke").task_b


@pytest.fixture(scope="module")
def model():
    return models.make_model("convnet", widths=(4,), groups=2)


def test_every_method_of_the_paper_is_registered():
    names = registry.names()
    for name in ("sgd", "teacher", "lwf", "ewc", "hat", "oml", "rep", "learned"):
        assert name in names
    assert registry.entry("sgd_x0.1") is not None and registry.entry("sgd_kernels_x2") is not None
    assert registry.entry("sgd_x") is None and registry.entry("nope") is None
    # Every built-in learns several tasks in turn (Exp 5).
    assert set(registry.names(sequences=True)) == set(names)


def test_sequences_give_one_method_per_task(model):
    config = fig1.get_config("smoke").task_b
    for name in ("sgd", "lwf", "ewc", "teacher"):
        (one,) = registry.build_sequence(name, model, config, 1, registry.Context(num_classes_1=3))
        assert one.name == name and one.switch is None
    for name in ("lwf", "ewc", "hat"):
        first, second = registry.build_sequence(name, model, TASK_B, 2)
        assert first.switch is None and second.switch is not None, name
    first, second = registry.build_sequence("teacher", model, TASK_B, 2,
                                            registry.Context(num_classes_1=3))  # fmt: skip
    assert first.uses_task_a and second.uses_task_a


def test_the_learned_rule_needs_a_rule(model):
    with pytest.raises(ValueError, match="meta-trained rule"):
        registry.build("learned", model, TASK_B)
    params = model.init(jax.random.key(0), (1, 8, 8, 1))
    taps = model.apply(params, np.zeros((2, 8, 8, 1), np.float32), taps=True).taps
    ml = metalearner.make(params, taps)
    rule = Rule(ml, ml.init(jax.random.key(1)), 0.1)
    method = registry.build("learned", model, TASK_B, registry.Context(rule=rule))
    assert method.name == "learned" and method.params["learning_rate"] == 0.1


def test_a_user_method_registers_and_passes_the_config_checks(model):
    @registry.register("halved_sgd_for_test")
    def build(name, model, task_b, context):
        sgd = registry.build("sgd", model, task_b)
        return Method(name, sgd.init, lambda s, b, k: sgd.step(s, b, k), sgd.network)

    config = fig1.get_config("smoke")
    config.task_b.methods = ("sgd", "halved_sgd_for_test")
    config_checks.check_methods(config, rule=False, meta_data=False)
    assert registry.build("halved_sgd_for_test", model, config.task_b).name == "halved_sgd_for_test"
    config.task_b.methods = ("sgd", "halved_sgd_fro_test")
    with pytest.raises(config_checks.ConfigError, match="halved_sgd_fro_test"):
        config_checks.check_methods(config, rule=False, meta_data=False)
    config.task_b.methods = ("learned",)
    with pytest.raises(config_checks.ConfigError, match="meta-trained rule"):
        config_checks.check_methods(config, rule=False, meta_data=False)
