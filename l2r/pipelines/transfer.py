"""Learning to remember, end to end (Exps. 1-4): pre-train, meta-train, meta-test, report.

Stages:
  1. data -> Task A and the meta-training / meta-test Task-B data (§5, Table 1;
     `l2r.data.plan.transfer_plan`): Exp 1 splits Task B into halves DB1 / DB2; Exps 2-4 (a
     `pools` config group) draw n-way tasks from disjoint class pools (Exp 4: of another
     dataset);
  2. Task-A pre-training (`l2r.pretrain`, cached); Exp 3 (`meta.train_checkpoints` > 0):
     episodes start from the first `train_checkpoints` networks, the meta-test from the others;
  3. meta-training of θ (`l2r.meta`, Orbax checkpoints, cached and resumable);
  4. meta-test: the learned rule and the baselines of `task_b.methods` over `num_seeds` seeds
     per meta-test task, probed identically (`l2r.compare`); the runs of all meta-test tasks
     are reported together (`num_seeds` × tasks runs per method);
  5. artefacts: Fig.-3-style curves, tables, the curriculum (Fig. 6) and δ histograms (Fig. 7).
"""

import os
import time

import ml_collections
from absl import logging

from l2r import (
    compare,
    config_checks,
    distributed,
    divergence,
    histories,
    pretrain,
    report,
    tracking,
    training,
)
from l2r.config_checks import require
from l2r.data import plan
from l2r.meta import figures, loop, validation
from l2r.methods import registry
from l2r.methods.learned import Rule
from l2r.models import registry as model_registry


def check_config(config: ml_collections.ConfigDict) -> None:
    config_checks.check_common(config)
    config_checks.check_methods(config)
    config_checks.check_steps(config)
    config_checks.check_meta(config)
    if "pools" in config:
        p = config.pools
        require(p.n_way >= 2, f"pools.n_way={p.n_way}; n-way tasks need at least 2 classes.")
        require(p.meta_test_tasks >= 1, "pools.meta_test_tasks must be >= 1.")
        for name in ("meta_train", "meta_test"):
            classes = p[name].classes
            require(len(classes) >= p.n_way,
                    f"pools.{name}.classes has {len(classes)} classes, fewer than "
                    f"pools.n_way={p.n_way}.")  # fmt: skip


def load(config: ml_collections.ConfigDict):
    """Task A, the meta-training / meta-test plan, mean and std of `config`, checked against
    it (DataError, ConfigError)."""
    check_config(config)
    task_a, task_b_, mean, std = plan.build_tasks(config)
    meta_plan = plan.transfer_plan(config, task_a, task_b_)
    for task in meta_plan.meta_test:
        config_checks.check_task_sizes(config, task_a, task)
    n_meta = len(meta_plan.meta_train.train.labels)
    config_checks.check_batch("task_b.batch_size", config.task_b.batch_size, n_meta,
                              "the meta-training data")  # fmt: skip
    return task_a, meta_plan, mean, std


def run(config: ml_collections.ConfigDict, workdir: str, data=None) -> dict:
    """Runs Exp. 1-4 of `config` and writes its artefacts into `workdir`.
    `data`: what `load(config)` returned (None: loaded here)."""
    task_a, meta_plan, mean, std = load(config) if data is None else data
    model = model_registry.from_config(config.model)
    t0 = time.time()
    learn = "learned" in config.task_b.methods  # Baselines alone need no meta-training.
    writers = tracking.writers(workdir)
    stages = tracking.Stages(config.experiment, "pre-training", "meta-training" if learn else None,
                             "meta-test", "report")  # fmt: skip
    stages.begin("pre-training")
    data_a = training.to_device(task_a, mean, std)
    pretrained, pre_acc, pretrain_s = pretrain.pretrained_networks(config, model, data_a, workdir)

    train_nets, test_nets = compare.split_checkpoints(config, pretrained)
    t1 = time.time()
    data_meta = training.to_device(meta_plan.meta_train, mean, std)
    rule, history = None, {}
    if learn:
        stages.begin("meta-training")
        episodes_data, scorer = data_meta, None
        if validation.enabled(config):  # Episodes never see the held-out examples.
            held = validation.carve(config, task_a, meta_plan.meta_train, meta_plan.class_table)
            episodes_data = training.to_device(held.meta_train, mean, std)
            scorer = validation.Scorer(config, model, train_nets, held, mean, std)
        run, state, history = loop.meta_train(config, model, train_nets, data_a, episodes_data,
                                              os.path.join(workdir, "meta"),
                                              class_table=meta_plan.class_table,
                                              writer=writers("meta"), validate=scorer)  # fmt: skip
        theta = state.theta if run.best_theta is None else run.best_theta
        # The meta-test runs in every process on its own devices.
        rule = Rule(run.ml, distributed.local_copy(theta), run.lr)
    meta_s = time.time() - t1
    stages.begin("meta-test")
    n_way = config.pools.n_way if "pools" in config else None
    starts, start_s = compare.method_starts(config, model, test_nets, data_a, data_meta, workdir,
                                            n_way)  # fmt: skip
    context = registry.Context(rule=rule)
    methods = [registry.build(n, model, config.task_b, context) for n in config.task_b.methods]
    parts, cache = [], histories.cache_dir(config, workdir)
    for i, task in enumerate(meta_plan.meta_test):  # Several tasks: a TensorBoard run each.
        prefix = "task_b" if len(meta_plan.meta_test) == 1 else f"task_b/test{i}"
        parts.append(compare.compare(config, model, test_nets, [task_a, task], mean, std, methods,
                                     starts, cache_dir=cache, writers=writers,
                                     run_prefix=prefix))  # fmt: skip
    writers.close()
    compared = compare.merge_runs(parts)
    results = {
        "experiment": config.experiment,
        "preset": config.preset,
        "config": config.to_dict(),
        **compared,
        "pretrain_test_accuracy": pre_acc,
        "meta": {k: list(v) for k, v in history.items()},
        "provenance": tracking.provenance(),
    }
    divergence.mark_divergence(results)  # Warns, and keeps diverged runs out of the means.
    results["timing"].update(pretrain_s=pretrain_s, meta_train_s=meta_s, starts_s=start_s,
                             total_s=time.time() - t0)  # fmt: skip
    stages.begin("report")
    if "pools" in config:
        results["meta_test_tasks"] = [list(t.class_names) for t in meta_plan.meta_test]
    paths = report.write_artefacts(results, workdir, prefix=config.experiment)
    if rule is not None:
        task = meta_plan.meta_test[0]
        for path in figures.meta_figures(config, model, rule, history, task, task.num_classes,
                                         test_nets, mean, std, workdir,
                                         config.task_b.steps):  # fmt: skip
            paths[os.path.splitext(os.path.basename(path))[0]] = path
    paths["json"] = report.write_results_json(results, workdir)  # Last: the run is finished.
    logging.info("Results at step %d:\n%s", results["steps"][-1], report.summary_table(results))
    logging.info("Wrote %s", ", ".join(paths.values()))
    return results


def first_task(data):
    """(the task pre-training learns, mean, std) of what `load` returned."""
    return data[0], data[2], data[3]
