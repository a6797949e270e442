"""Meta-validation: θ scored during meta-training on held-out training data, the best one kept.

With `meta.validate_every` = n > 0, a share `meta.validate_fraction` of each meta-training
class's training examples is held out before meta-training starts (`carve`): the episodes never
see it. Every n windows (and after the last), the current θ runs as the learned rule on
validation tasks, exactly as at meta-test (`l2r.compare`: `meta.validate_seeds` seeds,
`meta.validate_steps` steps per later task, readouts at the last step), and is scored by the
average readout accuracy over the tasks at the last step, the score `l2r-validate` selects the
baselines' hyper-parameters by. The meta-test then uses the θ with the best score.

The validation tasks hold no test example:
  - the later tasks: Exp 1's meta-training half DB1, or n-way tasks drawn from the
    meta-training pool (Exps 2-4; Exp 5: pairs of them, drawn as its episodes' are), trained on
    their kept examples, their readouts measured on the held-out ones;
  - the first task: its readout fitted on part of its training examples and measured on
    another part (`tasks.validation_split` with the same share). These images were seen in
    pre-training, so its accuracy is higher than on test images, by the same amount for every
    θ: what ranks θ is how much of it the rule keeps.
Neither split touches the meta-test tasks or any test split.
"""

import copy
import math
from typing import NamedTuple

import numpy as np
from absl import logging

from l2r import compare, rng
from l2r.data import plan as plan_lib
from l2r.data import tasks
from l2r.methods import registry
from l2r.methods.learned import Rule


class Plan(NamedTuple):
    """The data of a meta-validated run."""

    meta_train: tasks.Task  # What the episodes read: the meta-training data less the held out.
    task_a: tasks.Task  # The first task, its test split replaced by held-out training examples.
    tasks_b: list  # Validation sequences of later tasks, each a tuple (one task: Exps 1-4; two:
    # Exp 5): kept examples to train, held-out ones to test.


def enabled(config) -> bool:
    return bool(config.meta.get("validate_every", 0))


def carve(config, task_a: tasks.Task, meta_train: tasks.Task, class_table=None,
          pair_table=None) -> Plan:  # fmt: skip
    """Holds out `meta.validate_fraction` of each class of `meta_train` (and of the first task).

    The validation tasks: with `class_table` (int [T, n_way], pool labels: Exps 2-4), the
    first `meta.validate_tasks` n-way tasks drawn from the pool (seeded apart from the
    episodes'); with `pair_table` (int [T, 2, n_way]: Exp 5), as many (Task 2, Task 3) pairs,
    drawn as the episodes' are; with neither, the held-out data is one task, Exp 1's DB1.
    """
    m = config.meta
    seed = lambda what: rng.seed_for(config.seed, f"meta_validation/{what}")  # noqa: E731
    held = tasks.validation_split(meta_train, m.validate_fraction, seed("meta_train"))
    held_a = tasks.validation_split(task_a, m.validate_fraction, seed("task_a"))
    if pair_table is not None:
        n_way = np.asarray(pair_table).shape[2]
        disjoint = config.pools.get("disjoint_tasks", True)
        pairs = plan_lib.sample_task_pairs(held.num_classes, n_way, m.validate_tasks,
                                           seed("pairs"), disjoint)  # fmt: skip
        tasks_b = [tuple(tasks.make_task(held, row.tolist(), f"{held.name}/val-task{k}-{i}")
                         for k, row in zip((2, 3), pair, strict=True))
                   for i, pair in enumerate(pairs)]  # fmt: skip
    elif class_table is not None:
        n_way = np.asarray(class_table).shape[1]
        drawn = tasks.sample_nway_tasks(held, range(held.num_classes), n_way, m.validate_tasks,
                                        seed("tasks"))  # fmt: skip
        tasks_b = [(t,) for t in drawn]
    else:
        tasks_b = [(held,)]
    kept = tasks.Task(meta_train.name, held.train, meta_train.test, meta_train.class_names)
    return Plan(kept, held_a, tasks_b)


def validation_config(config):
    """The config of a validation run: the learned rule alone, `validate_seeds` seeds and
    `validate_steps` steps on each later task (0: the config's), probed at the start and at
    each task's end, no per-layer CKA."""
    cfg = copy.deepcopy(config)
    m = config.meta
    with cfg.unlocked():
        cfg.num_seeds = m.validate_seeds
        cfg.task_b.methods = ("learned",)
        cfg.readout.layer_cka_size = 0
        if m.validate_steps:
            for field in _step_fields(cfg):
                cfg.task_b[field] = m.validate_steps
        cfg.task_b.probe_every = math.gcd(*compare.phase_steps(cfg))
    return cfg


def _step_fields(config) -> list[str]:
    b = config.task_b
    return ["steps"] if "steps" in b else sorted(f for f in b.keys() if f.startswith("steps_"))


class Scorer:
    """Scores θ: the mean over validation tasks and seeds of the average last-step readout
    accuracy over the tasks (A and B; Exp 5: 1, 2 and 3), a fraction. Diverged runs score 0."""

    def __init__(self, config, model, pretrained, plan: Plan, mean, std):
        self.config, self.model, self.plan = validation_config(config), model, plan
        self.pretrained, self.mean, self.std = pretrained, mean, std

    def __call__(self, ml, theta, learning_rate) -> float:
        cfg, later = self.config, len(self.plan.tasks_b[0])
        context = registry.Context(rule=Rule(ml, theta, learning_rate),
                                   num_classes_1=self.plan.task_a.num_classes)  # fmt: skip
        if later == 1:
            method = registry.build("learned", self.model, cfg.task_b, context)
        else:
            method = registry.build_sequence("learned", self.model, cfg.task_b, later, context)
        scores = []
        for sequence in self.plan.tasks_b:
            out = compare.compare(cfg, self.model, self.pretrained,
                                  [self.plan.task_a, *sequence], self.mean, self.std, [method],
                                  shard_seeds=False)  # fmt: skip
            hist = out["methods"]["learned"]
            readouts = sorted(k for k in hist if k.startswith("readout_"))
            last = np.stack([np.asarray(hist[k])[:, -1] for k in readouts])
            finite = np.isfinite(last).all(0) & np.isfinite(np.asarray(hist["loss"])[:, -1])
            scores.append(np.where(finite, last.mean(0), 0.0).mean())
        score = float(np.mean(scores))
        logging.info("Meta-validation: average last-step readout accuracy %.4f", score)
        return score
