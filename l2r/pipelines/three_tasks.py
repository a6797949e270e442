"""Exp 5 (paper §5.6): three tasks in sequence, meta-trained and meta-tested end to end.

Task 1 is the pre-training task; Tasks 2 and 3 are n-way tasks drawn from a pool of classes
(meta-training) or from a disjoint pool (meta-test). Networks carry one head per task, with fixed
meanings: 'head_a' = Task 1, 'head_b' = Task 2, 'head_c' = Task 3.

Meta-training: Algorithm 1 with K = 3, the episodes of `l2r.meta.three_tasks` (Task 2, then
Task 3 from where Task 2 left the student; the switch and its departures are documented there),
run by the same windows, curriculum and resume as Exps 1-4.

Meta-test (`l2r.compare` with K = 2): for each drawn (Task 2, Task 3) pair and seed, every method
learns Task 2 for `task_b.steps_2` steps, then Task 3 for `task_b.steps_3` steps, its state
carried across the switch (`Method.switch`), probed every `probe_every` steps on all three tasks
(readout_k, original_k for k = 1, 2, 3 and cka_1). SGD and the learned rule train 'head_c' on
Task 3; the teacher rehearses every earlier task with its own head; LwF distils every earlier
head, EWC accumulates every earlier task's Fisher, HAT keeps one mask per task, OML and Rep
start from their own networks.
"""

import os
import time

import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from l2r import (
    cl_metrics,
    compare,
    config_checks,
    distributed,
    divergence,
    histories,
    plots,
    pretrain,
    report,
    tracking,
    training,
)
from l2r.config_checks import require
from l2r.data import plan, tasks
from l2r.meta import figures, loop, three_tasks, validation
from l2r.methods import registry
from l2r.methods.learned import Rule
from l2r.models import registry as model_registry

READOUT = ("readout_1", "readout_2", "readout_3")  # per-task probe metrics, in task order


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no data: run before anything is loaded or trained."""
    config_checks.check_common(config, task_b=False)  # Exp 5's later tasks are `pools`.
    config_checks.check_meta(config)
    config_checks.check_methods(config, num_tasks=2)
    config_checks.check_steps(config, ("steps_2", "steps_3"))
    b, p = config.task_b, config.pools
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


def check_sizes(config, seq: plan.SequencePlan) -> None:
    """The batch sizes fit every task (the teacher's A batch is half Task 1, half Task 2)."""
    n_1 = len(seq.task_1.train.labels)
    b = config.task_b
    config_checks.check_batch("pretrain.batch_size", config.pretrain.batch_size, n_1, "Task 1")
    half = b.teacher_batch_a - b.teacher_batch_a // 2
    config_checks.check_batch("task_b.teacher_batch_a / 2", half, n_1, "Task 1")
    for task_2, task_3 in seq.meta_test:
        for name, t in (("Task 2", task_2), ("Task 3", task_3)):
            config_checks.check_batch("task_b.batch_size", b.batch_size, len(t.train.labels),
                                      name)  # fmt: skip
        config_checks.check_batch("task_b.teacher_batch_a / 2", half,
                                  len(task_2.train.labels), "Task 2")  # fmt: skip


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
        *report.layer_cka_sections(results),
        "## Curves", *(report.curves_table(results, m) for m in READOUT),
    ]  # fmt: skip
    text = "\n\n".join(parts) + "\n"
    return report.write_atomic(os.path.join(workdir, "results.md"), text.encode())


def plot_tasks(results, workdir, prefix="exp5") -> str:
    """Fig. 5: readout accuracy on Tasks 1, 2 and 3 against steps, one panel per task, styled
    and labelled as `plots.curves_figure` does; a PNG with its PDF, returns the PNG's path."""
    steps = np.asarray(results["steps"])
    methods = list(results["methods"])
    styles = plots.method_styles(methods)
    fig = Figure(figsize=(15, 3.8), layout="constrained")
    axes = fig.subplots(1, 3, sharex=True)
    dropped = divergence.dropped_rows(results)  # Diverged runs are left out of the means.
    handles = {}
    for ax, metric in zip(axes, READOUT, strict=True):
        for name, hist in results["methods"].items():
            n_runs, drop = divergence.num_runs(results, name), dropped.get(name, [])
            label = plots.legend_label(name, len(drop), n_runs)
            acc = 100 * divergence.kept(np.asarray(hist[metric], np.float64), drop)
            alpha = plots.band_alpha(len(methods), name)
            handles[name] = plots.draw_mean_std(ax, steps, acc, styles[name], label, alpha)
        ax.axvline(results["switch_step"], color="k", lw=0.5, ls=":")
        ax.set(title=plots.metric_title(metric), xlabel="steps (Task 2, then Task 3)")
        plots.integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="readout accuracy (%)")
    fig.legend(list(handles.values()), [h.get_label() for h in handles.values()],
               loc="outside right center", fontsize="small")  # fmt: skip
    return plots.save_figure(fig, os.path.join(workdir, f"{prefix}_tasks.png"))


def load(config: ml_collections.ConfigDict):
    """The three-task plan of `config` and the data's mean and std, checked against it
    (DataError, ConfigError)."""
    check_config(config)
    seq = plan.sequence_plan(config)
    check_sizes(config, seq)
    mean, std = tasks.normalization_stats(plan.load_data(config).train)
    return seq, mean, std


def run(config: ml_collections.ConfigDict, workdir: str, data=None) -> dict:
    """Runs Exp. 5 of `config` and writes its artefacts into `workdir`.
    `data`: what `load(config)` returned (None: loaded here)."""
    seq, mean, std = load(config) if data is None else data
    model = model_registry.from_config(config.model)
    t0 = time.time()
    learn = "learned" in config.task_b.methods  # Baselines alone need no meta-training.
    writers = tracking.writers(workdir)
    stages = tracking.Stages(config.experiment, "pre-training", "meta-training" if learn else None,
                             "meta-test", "report")  # fmt: skip
    stages.begin("pre-training")
    data_1 = training.to_device(seq.task_1, mean, std)
    pretrained, pre_acc, pretrain_s = pretrain.pretrained_networks(config, model, data_1, workdir)
    train_nets, test_nets = compare.split_checkpoints(config, pretrained)

    t1 = time.time()
    pool = training.to_device(seq.meta_train, mean, std)
    rule, history = None, {}
    if learn:
        stages.begin("meta-training")
        episodes_pool, scorer = pool, None
        if validation.enabled(config):  # Episodes never see the held-out examples.
            held = validation.carve(config, seq.task_1, seq.meta_train,
                                    pair_table=seq.pair_table)  # fmt: skip
            episodes_pool = training.to_device(held.meta_train, mean, std)
            scorer = validation.Scorer(config, model, train_nets, held, mean, std)
        episodes = three_tasks.three_tasks(config, model, train_nets, data_1, episodes_pool,
                                           seq.pair_table)  # fmt: skip
        run, state, history = loop.meta_train(config, model, train_nets, data_1, episodes_pool,
                                              os.path.join(workdir, "meta"), episodes,
                                              writer=writers("meta"), validate=scorer)  # fmt: skip
        theta = state.theta if run.best_theta is None else run.best_theta
        # The meta-test runs in every process on its own devices.
        rule = Rule(run.ml, distributed.local_copy(theta), run.lr)
    meta_s = time.time() - t1
    stages.begin("meta-test")
    starts, start_s = compare.method_starts(config, model, test_nets, data_1, pool, workdir,
                                            config.pools.n_way)  # fmt: skip
    context = registry.Context(rule=rule, num_classes_1=seq.task_1.num_classes)
    methods = [registry.build_sequence(n, model, config.task_b, 2, context)
               for n in config.task_b.methods]  # fmt: skip
    parts, cache = [], histories.cache_dir(config, workdir)
    for i, (task_2, task_3) in enumerate(seq.meta_test):  # Several pairs: a TensorBoard run each.
        prefix = "task_b" if len(seq.meta_test) == 1 else f"task_b/test{i}"
        parts.append(compare.compare(config, model, test_nets, [seq.task_1, task_2, task_3], mean,
                                     std, methods, starts, cache_dir=cache, writers=writers,
                                     run_prefix=prefix))  # fmt: skip
    writers.close()
    compared = compare.merge_runs(parts)
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
        "meta_test_tasks": [[list(t.class_names) for t in pair] for pair in seq.meta_test],
        "provenance": tracking.provenance(),
    }
    divergence.mark_divergence(results)  # Warns, and keeps diverged runs out of the means.
    results["timing"].update(pretrain_s=pretrain_s, meta_train_s=meta_s, starts_s=start_s,
                             total_s=time.time() - t0)  # fmt: skip
    stages.begin("report")
    paths = {"markdown": write_markdown(results, workdir),
             "csv": report.write_csv(results, workdir),
             "exp5_tasks": plot_tasks(results, workdir, prefix=config.experiment)}  # fmt: skip
    layer_cka = plots.plot_layer_cka(results, workdir, prefix=config.experiment)
    if layer_cka:
        paths[f"{config.experiment}_layer_cka"] = layer_cka
    report.write_curves_to_tensorboard(results, os.path.join(workdir, "tb"))
    if rule is not None:
        task_2, task_3 = seq.meta_test[0]
        for path in figures.meta_figures(config, model, rule, history, task_2,
                                         [task_2.num_classes, task_3.num_classes], test_nets,
                                         mean, std, workdir, config.task_b.steps_2):  # fmt: skip
            paths[os.path.splitext(os.path.basename(path))[0]] = path
    paths["json"] = report.write_results_json(results, workdir)  # Last: the run is finished.
    logging.info("Results at step %d:\n%s", results["steps"][-1], report.summary_table(results))
    logging.info("Wrote %s", ", ".join(paths.values()))
    return results


def first_task(data):
    """(the task pre-training learns, mean, std) of what `load` returned."""
    return data[0].task_1, data[1], data[2]
