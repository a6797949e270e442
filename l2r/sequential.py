"""Exp 5 (paper §5.6): three tasks in sequence, meta-trained and meta-tested end to end.

Task 1 is the pre-training task; Tasks 2 and 3 are n-way tasks drawn from a pool of classes
(meta-training) or from a disjoint pool (meta-test). Networks carry one head per task, with fixed
meanings: 'head_a' = Task 1, 'head_b' = Task 2, 'head_c' = Task 3.

Meta-training (Algorithm 1 with K = 3; `SequentialTrainer`, a `MetaTrainer` subclass, so the
windows, T-BPTT, restarts, curriculum and Orbax resume are those of `l2r.meta_train`):
  phase 0: the student learns Task 2 through the meta-learner; the teacher learns D_A ∪ D_B with
    D_A = Task 1, D_B = Task 2;
  phase 1: the student learns Task 3 (its own fresh head) from where phase 0 left it: student
    weights, LSTM state and teacher are all kept; D_A = Task 1 ∪ Task 2, D_B = Task 3; the loss
    threshold is the curriculum's plus `meta.switch_threshold_step` (§5.6: +5).
  An episode switches from phase 0 to phase 1 when its loss exceeds the threshold (§5.6) or after
  `meta.inner_steps` steps on Task 2, and restarts (new w0, LSTM state, tasks) when phase 1's loss
  exceeds its threshold, after `meta.inner_steps` steps on Task 3, or when it diverges. As in
  `l2r.meta_train`, switches and restarts happen at window ends: up to s − 1 steps after the
  threshold was crossed. Curriculum episodes count whole episodes (both phases).
  Departures: the paper gives no step limit for the phases (`meta.inner_steps` caps each); the
  teacher's A batch in phase 1 is half Task 1, half Task 2 (Algorithm 1 says only D_1..k-1).

Meta-test (`l2r.run_sequence`): for each drawn (Task 2, Task 3) pair and seed, every method
learns Task 2 for `task_b.steps_2` steps, then Task 3 for `task_b.steps_3` steps, probed every
`probe_every` steps on all three tasks (metrics readout_k, original_k for k = 1, 2, 3 and cka_1).
Learners that see only the current task (SGD, the learned rule, whose LSTM state carries across
the switch) train 'head_c' on Task 3 (`l2r.methods.multitask.on_task_3`); the teacher rehearses
every earlier task with its own head. Baselines with per-task state are not run here.
"""

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from l2r import (
    cl_metrics,
    distributed,
    experiment,
    forgetting,
    meta_train,
    pretrain,
    remember,
    report,
    rng,
    run_sequence,
    training,
)
from l2r import workdir as workdir_lib
from l2r.data import stream, tasks
from l2r.experiment import ConfigError, require
from l2r.meta.three_tasks import SequentialTrainer
from l2r.methods import Method, is_method_name, make_method
from l2r.methods.learned import make_learned
from l2r.methods.multitask import make_multitask_teacher, on_task_3
from l2r.run_sequence import READOUT

SUPPORTED = "sgd, sgd_x<factor>, teacher and learned"


def make_methods(config, model, trainer, theta, num_classes_1) -> list[tuple[Method, Method]]:
    """(Task-2 method, Task-3 method) of every name in `task_b.methods`."""
    out = []
    for name in config.task_b.methods:
        if name == "teacher":
            lr = config.task_b.learning_rate
            out.append(tuple(make_multitask_teacher(model, lr, num_classes_1, p) for p in (0, 1)))
            continue
        if name == "learned":
            method = make_learned(model, trainer.ml, theta, trainer.lr)
        else:
            method = make_method(name, model, config.task_b)
        out.append((method, on_task_3(method)))
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline: config checks, tasks, report.


class Plan(NamedTuple):
    task_1: tasks.Task
    meta_train: tasks.Task  # the pool of meta-training classes, labels 0..P-1
    pair_table: np.ndarray  # int32 [T, 2, n_way]: episode tasks (pool labels)
    meta_test: list  # [(Task 2, Task 3)] from the meta-test pool


def sample_task_pairs(num_classes: int, n_way: int, num: int, seed: int, disjoint: bool):
    """`num` (Task 2, Task 3) pairs of n-way tasks from classes 0..num_classes-1: int32
    [num, 2, n_way]. Disjoint: 2·n_way distinct classes; otherwise two different class sets.
    Deterministic in `seed`."""
    gen, rows = np.random.default_rng(seed), []
    for _ in range(num):
        if disjoint:
            rows.append(gen.choice(num_classes, 2 * n_way, replace=False).reshape(2, n_way))
            continue
        while True:
            pair = np.stack([gen.choice(num_classes, n_way, replace=False) for _ in range(2)])
            if set(pair[0]) != set(pair[1]):
                break
        rows.append(pair)
    return np.asarray(rows, np.int32).reshape(num, 2, n_way)


def plan_tasks(config) -> Plan:
    """Task 1, the pools (checked disjoint), the episodes' task pairs and the meta-test pairs."""
    dataset = experiment.load_dataset(config.data)
    task_1 = tasks.make_task(dataset, config.data.classes_a, "1")
    train_pool, test_pool = remember.load_pools(config, task_1)
    p = config.pools
    num = p.meta_train_tasks or config.meta.episodes
    seed_train = rng.seed_for(config.seed, "meta_train_pairs")
    seed_test = rng.seed_for(config.seed, "meta_test_pairs")
    table = sample_task_pairs(train_pool.num_classes, p.n_way, num, seed_train, p.disjoint_tasks)
    test = sample_task_pairs(test_pool.num_classes, p.n_way, p.meta_test_tasks, seed_test,
                             p.disjoint_tasks)  # fmt: skip
    meta_test = [
        tuple(tasks.make_task(test_pool, row.tolist(), f"{test_pool.name}/task{k}-{i}")
              for k, row in zip((2, 3), pair, strict=True))
        for i, pair in enumerate(test)
    ]  # fmt: skip
    return Plan(task_1, train_pool, table, meta_test)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no data: run before anything is loaded or trained."""
    experiment.check_common(config, task_b=False)  # Exp 5's later tasks are `pools`.
    remember.check_meta(config)
    b, p = config.task_b, config.pools
    for name in b.methods:
        per_task_state = name in ("lwf", "ewc", "hat", "oml", "rep")
        require(name == "learned" or (is_method_name(name) and not per_task_state),
            f"task_b.methods has {name!r}; Exp 5 runs {SUPPORTED} (the baselines with per-task "
            "state, lwf/ewc/hat/oml/rep, are not implemented for three tasks).")  # fmt: skip
    for k in ("steps_2", "steps_3"):
        require(b[k] >= 1 and b.probe_every >= 1 and b[k] % b.probe_every == 0,
                f"task_b.{k}={b[k]} must be a positive multiple of task_b.probe_every="
                f"{b.probe_every}.")  # fmt: skip
    require(b.teacher_batch_a >= 2, "task_b.teacher_batch_a must be >= 2 (Tasks 1 and 2).")
    require(config.meta.switch_threshold_step >= 0, "meta.switch_threshold_step must be >= 0.")
    require(p.n_way >= 2, f"pools.n_way={p.n_way}; n-way tasks need at least 2 classes.")
    require(p.meta_test_tasks >= 1, "pools.meta_test_tasks must be >= 1.")
    if p.disjoint_tasks:
        need, how, fix = 2 * p.n_way, "with no class in common", ", or pools.disjoint_tasks=False"
    else:
        need, how, fix = p.n_way + 1, "of different classes", ""
    for name in ("meta_train", "meta_test"):
        n = len(p[name].classes)
        require(n >= need, f"pools.{name}.classes has {n} classes; two {p.n_way}-way tasks {how} "
                f"need {need}: lower pools.n_way or enlarge the pool{fix}.")  # fmt: skip


def _check_sizes(config, plan: Plan) -> None:
    n_1 = len(plan.task_1.train.labels)
    b = config.task_b
    experiment.check_batch("pretrain.batch_size", config.pretrain.batch_size, n_1, "Task 1")
    half = b.teacher_batch_a - b.teacher_batch_a // 2
    experiment.check_batch("task_b.teacher_batch_a / 2", half, n_1, "Task 1")
    for task_2, task_3 in plan.meta_test:
        for name, t in (("Task 2", task_2), ("Task 3", task_3)):
            experiment.check_batch("task_b.batch_size", b.batch_size, len(t.train.labels), name)
        experiment.check_batch("task_b.teacher_batch_a / 2", half, len(task_2.train.labels),
                               "Task 2")  # fmt: skip


def write_markdown(results, workdir) -> str:
    steps, switch, ends = results["steps"], results["switch_step"], results["task_ends"]
    parts = [
        f"# l2r results: {results['experiment']} (three tasks)",
        f"Preset `{results['preset']}`; {len(results['seeds'])} runs (seeds × task pairs); "
        f"Task 2 for steps 0-{switch}, Task 3 for steps {switch}-{steps[-1]}.",
        f"## At the switch (step {switch})", report.summary_table(results, step=switch),
        "## At the end", report.summary_table(results),
        "## Continual-learning view (readout accuracy; rows: after Task 1, 2, 3)",
        cl_metrics.markdown_table(results, READOUT, ends),
        "## Curves", *(report.curves_table(results, m) for m in READOUT),
    ]  # fmt: skip
    text = "\n\n".join(parts) + "\n"
    return report.write_atomic(os.path.join(workdir, "results.md"), text.encode())


def plot_tasks(results, workdir, prefix="exp5") -> str:
    """Fig. 5: readout accuracy on Tasks 1, 2 and 3 against steps, one panel per task."""
    steps = np.asarray(results["steps"])
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3, sharex=True)
    for k, (ax, metric) in enumerate(zip(axes, READOUT, strict=True), 1):
        for i, (name, hist) in enumerate(results["methods"].items()):
            acc = 100 * np.asarray(hist[metric], np.float64)
            mean, std = acc.mean(0), acc.std(0, ddof=1 if len(acc) > 1 else 0)
            ax.plot(steps, mean, color=f"C{i}", label=name)
            ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.2, lw=0)
        ax.axvline(results["switch_step"], color="k", lw=0.5, ls=":")
        ax.set(title=f"Task {k} readout", xlabel="steps (Task 2, then Task 3)")
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="readout accuracy (%)")
    axes[0].legend(fontsize="small")
    return report.save_figure(fig, os.path.join(workdir, f"{prefix}_tasks.png"))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs Exp. 5 of `config` and writes its artefacts into `workdir`."""
    check_config(config)
    plan = plan_tasks(config)
    _check_sizes(config, plan)
    mean, std = tasks.normalization_stats(experiment.load_dataset(config.data).train)
    workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    model = forgetting.make_model(config)
    t0 = time.time()
    data_1 = training.to_device(plan.task_1, mean, std)
    pretrained, pre_acc, pretrain_s = pretrain.pretrained_networks(config, model, data_1, workdir)
    train_nets, test_nets = remember.split_checkpoints(config, pretrained)

    t1 = time.time()
    pool = training.to_device(plan.meta_train, mean, std)
    trainer = SequentialTrainer(config, model, train_nets, data_1, pool, plan.pair_table)
    trainer, state, history = meta_train.meta_train(
        config, model, train_nets, data_1, pool, os.path.join(workdir, "meta"), trainer=trainer
    )
    state = state._replace(theta=distributed.local_copy(state.theta))  # for the meta-test
    meta_s = time.time() - t1
    methods = make_methods(config, model, trainer, state.theta, plan.task_1.num_classes)
    compared = remember.merge_runs([
        run_sequence.compare_methods(config, model, test_nets, plan.task_1, task_2, task_3,
                                     mean, std, methods)
        for task_2, task_3 in plan.meta_test
    ])  # fmt: skip
    results = {
        "experiment": config.experiment,
        "preset": config.preset,
        "config": config.to_dict(),
        **compared,
        "switch_step": config.task_b.steps_2,
        # Probe columns where Tasks 1, 2, 3 end: the rows of the accuracy matrix (cl_metrics).
        "task_ends": [
            0,
            compared["steps"].index(config.task_b.steps_2),
            len(compared["steps"]) - 1,
        ],
        "pretrain_test_accuracy": pre_acc,
        "meta": {k: list(v) for k, v in history.items()},
        "meta_test_tasks": [[list(t.class_names) for t in pair] for pair in plan.meta_test],
    }
    results["timing"].update(pretrain_s=pretrain_s, meta_train_s=meta_s, total_s=time.time() - t0)
    paths = {"json": report.write_results_json(results, workdir),
             "markdown": write_markdown(results, workdir),
             "exp5_tasks": plot_tasks(results, workdir, prefix=config.experiment)}  # fmt: skip
    report.write_curves_to_tensorboard(results, os.path.join(workdir, "tb"))
    task_2 = plan.meta_test[0][0]
    net0 = run_sequence.initial_networks(
        config, test_nets, task_2.num_classes, model.representation_dim
    )
    net0 = jax.tree.map(lambda a: jnp.asarray(a[0]), net0)
    n_steps = min(config.task_b.steps_2, 100)
    idx = stream.index_stream(len(task_2.train.labels), config.task_b.batch_size, n_steps,
                              rng.seed_for(config.seed, "fig7"))  # fmt: skip
    data_2 = training.to_device(task_2, mean, std)
    deltas = remember.delta_histograms(model, trainer, state.theta, net0, data_2, idx, n_steps)
    for path in remember.plot_meta(history, deltas, workdir):
        paths[os.path.splitext(os.path.basename(path))[0]] = path
    logging.info("Results at step %d:\n%s", results["steps"][-1], report.summary_table(results))
    logging.info("Wrote %s", ", ".join(paths.values()))
    return results


__all__ = ["ConfigError", "check_config", "run"]
