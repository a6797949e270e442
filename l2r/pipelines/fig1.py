"""Fig. 1: how much of Task A does a network's representation keep while it learns Task B?

Stages (each a pure function of the config and its inputs, each cached):
  1. data -> Task A, Task B (disjoint classes, asserted);
  2. Task-A pre-training (`l2r.pretrain`);
  3. every method in `task_b.methods` on Task B over `num_seeds` seeds (`l2r.compare`), probed
     every `task_b.probe_every` steps: readout accuracy on A and B, the original A head, CKA;
  4. artefacts in the workdir (`l2r.report`).
"""

import time

import ml_collections
from absl import logging

from l2r import (
    compare,
    config_checks,
    divergence,
    histories,
    pretrain,
    report,
    tracking,
    training,
)
from l2r.data import plan
from l2r.methods import registry
from l2r.models import registry as model_registry


def check_config(config: ml_collections.ConfigDict) -> None:
    config_checks.check_common(config)
    config_checks.check_methods(config, rule=False, meta_data=False)
    config_checks.check_steps(config)


def load(config: ml_collections.ConfigDict):
    """Task A, Task B, mean, std of `config`, checked against it (DataError, ConfigError)."""
    check_config(config)
    task_a, task_b_, mean, std = plan.build_tasks(config)
    config_checks.check_task_sizes(config, task_a, task_b_)
    return task_a, task_b_, mean, std


def run(config: ml_collections.ConfigDict, workdir: str, data=None) -> dict:
    """Runs the Fig.-1 experiment of `config` and writes its artefacts into `workdir`.
    `data`: what `load(config)` returned (None: loaded here)."""
    task_a, task_b_, mean, std = load(config) if data is None else data
    model = model_registry.from_config(config.model)
    t0 = time.time()
    writers = tracking.writers(workdir)
    stages = tracking.Stages(config.experiment, "pre-training", "Task B", "report")
    stages.begin("pre-training")
    data_a = training.to_device(task_a, mean, std)
    pretrained, pre_acc, pretrain_s = pretrain.pretrained_networks(config, model, data_a, workdir)
    starts, start_s = compare.method_starts(config, model, pretrained, data_a, None, workdir)
    methods = [registry.build(n, model, config.task_b) for n in config.task_b.methods]
    stages.begin("Task B")
    compared = compare.compare(config, model, pretrained, [task_a, task_b_], mean, std, methods,
                               starts, cache_dir=histories.cache_dir(config, workdir),
                               writers=writers)  # fmt: skip
    writers.close()
    results = {
        "experiment": config.experiment,
        "preset": config.preset,
        "config": config.to_dict(),
        **compared,
        "pretrain_test_accuracy": pre_acc,
        "provenance": tracking.provenance(),
    }
    divergence.mark_divergence(results)  # Warns, and keeps diverged runs out of the means.
    results["timing"].update(pretrain_s=pretrain_s, starts_s=start_s, total_s=time.time() - t0)
    stages.begin("report")
    paths = report.write_report(results, workdir, prefix="fig1")
    logging.info("Results at step %d:\n%s", results["steps"][-1], report.summary_table(results))
    logging.info("Wrote %s", ", ".join(paths.values()))
    return results


def first_task(data):
    """(the task pre-training learns, mean, std) of what `load` returned."""
    return data[0], data[2], data[3]
