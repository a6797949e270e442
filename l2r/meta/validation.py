"""Meta-validation: θ scored during meta-training on held-out training data, the best one kept.

With `meta.validate_every` = n > 0, a share `meta.validate_fraction` of each meta-training
class's training examples is held out before meta-training starts (`carve`): the episodes never
see it. Every n windows (and after the last), the current θ runs as the learned rule on
validation tasks, exactly as at meta-test (`l2r.compare`: `meta.validate_seeds` seeds,
`meta.validate_steps` Task-B steps, readouts at the last step), and is scored by the average
readout accuracy of Task A and Task B at the last step, the score `l2r-validate` selects the
baselines' hyper-parameters by. The meta-test then uses the θ with the best score.

The validation tasks hold no test example:
  - Task B: Exp 1's meta-training half DB1 (or, with pools, n-way tasks drawn from the
    meta-training pool), trained on its kept examples, its readout measured on the held-out
    ones;
  - Task A: its readout fitted on part of Task A's training examples and measured on another
    part (`tasks.validation_split` with the same share). These images were seen in pre-training,
    so its accuracy is higher than on test images, by the same amount for every θ: what ranks θ
    is how much of it the rule keeps.
Neither split touches the meta-test tasks or any test split.
"""

import copy
from typing import NamedTuple

import numpy as np
from absl import logging

from l2r import compare, rng
from l2r.data import tasks
from l2r.methods import registry
from l2r.methods.learned import Rule


class Plan(NamedTuple):
    """The data of a meta-validated run."""

    meta_train: tasks.Task  # What the episodes read: the meta-training data less the held out.
    task_a: tasks.Task  # Task A, its test split replaced by held-out training examples.
    tasks_b: list  # Validation Task-B tasks: kept examples to train, held-out ones to test.


def enabled(config) -> bool:
    return bool(config.meta.get("validate_every", 0))


def carve(config, task_a: tasks.Task, meta_train: tasks.Task, class_table=None) -> Plan:
    """Holds out `meta.validate_fraction` of each class of `meta_train` (and of Task A).

    `class_table` (int [T, n_way], pool labels): with pools, the validation tasks are the first
    `meta.validate_tasks` n-way tasks drawn from the pool (seeded apart from the episodes');
    without, the held-out data is one task, Exp 1's DB1.
    """
    m = config.meta
    seed = lambda what: rng.seed_for(config.seed, f"meta_validation/{what}")  # noqa: E731
    held = tasks.validation_split(meta_train, m.validate_fraction, seed("meta_train"))
    held_a = tasks.validation_split(task_a, m.validate_fraction, seed("task_a"))
    if class_table is None:
        tasks_b = [held]
    else:
        n_way = np.asarray(class_table).shape[1]
        tasks_b = tasks.sample_nway_tasks(held, range(held.num_classes), n_way,
                                          m.validate_tasks, seed("tasks"))  # fmt: skip
    kept = tasks.Task(meta_train.name, held.train, meta_train.test, meta_train.class_names)
    return Plan(kept, held_a, tasks_b)


def validation_config(config):
    """The config of a validation run: the learned rule alone, `validate_seeds` seeds and
    `validate_steps` Task-B steps, probed at the start and the end, no per-layer CKA."""
    cfg = copy.deepcopy(config)
    m = config.meta
    with cfg.unlocked():
        cfg.num_seeds = m.validate_seeds
        steps = m.validate_steps or config.task_b.steps
        cfg.task_b.steps = steps
        cfg.task_b.probe_every = steps
        cfg.task_b.methods = ("learned",)
        cfg.readout.layer_cka_size = 0
    return cfg


class Scorer:
    """Scores θ: the mean over validation tasks and seeds of the average last-step readout
    accuracy of Task A and Task B (a fraction). Diverged runs score 0."""

    def __init__(self, config, model, pretrained, plan: Plan, mean, std):
        self.config, self.model, self.plan = validation_config(config), model, plan
        self.pretrained, self.mean, self.std = pretrained, mean, std

    def __call__(self, ml, theta, learning_rate) -> float:
        cfg = self.config
        method = registry.build("learned", self.model, cfg.task_b,
                                registry.Context(rule=Rule(ml, theta, learning_rate)))  # fmt: skip
        scores = []
        for task in self.plan.tasks_b:
            out = compare.compare(cfg, self.model, self.pretrained, [self.plan.task_a, task],
                                  self.mean, self.std, [method], shard_seeds=False)  # fmt: skip
            hist = out["methods"]["learned"]
            last = np.stack([np.asarray(hist["readout_A"])[:, -1],
                             np.asarray(hist["readout_B"])[:, -1]])  # fmt: skip
            last = np.where(np.isfinite(last) & np.isfinite(np.asarray(hist["loss"])[:, -1]),
                            last, 0.0)  # fmt: skip
            scores.append(last.mean())
        score = float(np.mean(scores))
        logging.info("Meta-validation: average readout accuracy of A and B %.4f", score)
        return score
