"""Learning to remember, end to end (Exp. 1): pre-train, meta-train, meta-test, report.

Stages:
  1. data -> Task A, Task B; B's training examples split into halves DB1 (meta-training) and DB2
     (meta-test), the test split shared (§5.2, Table 1);
  2. Task-A pre-training (`l2r.pretrain`, cached);
  3. meta-training of θ on A / DB1 (`l2r.meta_train`, Orbax checkpoints, resumable);
  4. meta-test on DB2: the learned rule and the baselines of `task_b.methods` over `num_seeds`
     seeds, probed identically (`l2r.forgetting.compare_methods`);
  5. artefacts: Fig.-3-style curves, tables, the curriculum (Fig. 6) and δ histograms (Fig. 7).
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from l2r import experiment, forgetting, meta_train, metalearner, pretrain, report, rng, training
from l2r import workdir as workdir_lib
from l2r.data import stream, tasks
from l2r.experiment import require
from l2r.methods import METHOD_NAMES, is_method_name, make_method
from l2r.methods.learned import make_learned, student_step

REP_LOSSES = meta_train.REP_LOSSES


def check_config(config: ml_collections.ConfigDict) -> None:
    experiment.check_common(config)
    b, m = config.task_b, config.meta
    names = (*METHOD_NAMES, "learned")
    for name in b.methods:
        require(name == "learned" or is_method_name(name),
                f"task_b.methods has unknown method {name!r}; choose from {names}.")  # fmt: skip
    require(b.steps >= 1 and b.probe_every >= 1 and b.steps % b.probe_every == 0,
            f"task_b.steps={b.steps} must be a positive multiple of task_b.probe_every="
            f"{b.probe_every}.")  # fmt: skip
    require(m.rep_loss in REP_LOSSES, f"meta.rep_loss={m.rep_loss!r}; choose one of {REP_LOSSES}.")
    require(m.gate in metalearner.GATES, f"meta.gate={m.gate!r}; choose one of "
            f"{metalearner.GATES}.")  # fmt: skip
    require(m.num_episodes_parallel >= 1, "meta.num_episodes_parallel must be >= 1.")
    require(m.episodes >= 1 and m.inner_steps >= 1, "meta.episodes, meta.inner_steps must be >= 1.")
    require(1 <= m.tbptt <= m.tbptt_max, f"meta.tbptt={m.tbptt} must be in [1, tbptt_max].")
    require(m.curriculum_every >= 1, "meta.curriculum_every must be >= 1.")
    require(m.learning_rate > 0 and m.loss_scale > 0, "meta.learning_rate, loss_scale must be > 0.")


def delta_histograms(model, trainer, theta, network, data_b, idx_b, num_steps):
    """δ of every backbone leaf over the first `num_steps` meta-test steps of one seed (Fig. 7)."""

    @jax.jit
    def collect(network, idx):
        def body(carry, ib):
            net, mem = carry
            x_b, y_b = training.gather(data_b, ib)
            net, mem, _, deltas = student_step(model, trainer.ml, theta, trainer.lr, net, mem,
                                               x_b, y_b)  # fmt: skip
            return (net, mem), deltas

        return jax.lax.scan(body, (network, trainer.ml.init_state()), idx)[1]

    deltas = jax.device_get(collect(network, idx_b[:num_steps]))
    flat = jax.tree_util.tree_flatten_with_path(deltas)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(v).ravel() for path, v in flat}


def plot_meta(history, deltas, workdir) -> list[str]:
    """Fig. 6 (threshold and T-BPTT steps against episodes) and Fig. 7 (δ per layer)."""
    paths = []
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(history["episodes_done"], history["threshold"], label="loss threshold")
    ax.set(xlabel="episodes", ylabel="loss threshold")
    ax2 = ax.twinx()
    ax2.plot(history["episodes_done"], history["tbptt"], "C1--", label="T-BPTT steps")
    ax2.set(ylabel="T-BPTT steps")
    fig.legend(loc="lower right", fontsize="small")
    paths.append(report.save_figure(fig, os.path.join(workdir, "fig6_curriculum.png")))
    fig = Figure(figsize=(7, 0.35 * len(deltas) + 1.5))
    ax = fig.add_subplot()
    names = list(deltas)
    ax.boxplot([deltas[n] for n in names], vert=False, showfliers=False)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=6)
    ax.axvline(1.0, color="k", lw=0.5, ls=":")
    ax.axvline(0.0, color="r", lw=0.5)
    ax.set(xlabel="δ (1 = SGD; < 0 = gradient ascent)", title="Fig. 7: gates at meta-test")
    paths.append(report.save_figure(fig, os.path.join(workdir, "fig7_delta.png")))
    return paths


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs Exp. 1 of `config` and writes its artefacts into `workdir`."""
    check_config(config)
    task_a, task_b, mean, std = forgetting.build_tasks(config)
    db1, db2 = tasks.halves(task_b, rng.seed_for(config.seed, "halves"))
    forgetting.check_sizes(config, task_a, db2)
    experiment.check_batch("task_b.batch_size", config.task_b.batch_size, len(db1.train.labels),
                           "Task B (meta-training half)")  # fmt: skip
    workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    model = forgetting.make_model(config)
    t0 = time.time()
    data_a = training.to_device(task_a, mean, std)
    pretrained, pre_acc, pretrain_s = pretrain.pretrained_networks(config, model, data_a, workdir)

    t1 = time.time()
    data_b1 = training.to_device(db1, mean, std)
    trainer, state, history = meta_train.meta_train(
        config, model, pretrained, data_a, data_b1, os.path.join(workdir, "meta")
    )
    meta_s = time.time() - t1

    methods = []
    for name in config.task_b.methods:
        if name == "learned":
            methods.append(make_learned(model, trainer.ml, state.theta, trainer.lr))
        else:
            methods.append(make_method(name, model, config.task_b))
    compared = forgetting.compare_methods(config, model, pretrained, task_a, db2, mean, std,
                                          methods)  # fmt: skip
    results = {
        "experiment": config.experiment,
        "preset": config.preset,
        "config": config.to_dict(),
        **compared,
        "pretrain_test_accuracy": pre_acc,
        "meta": {k: list(v) for k, v in history.items()},
    }
    results["timing"].update(pretrain_s=pretrain_s, meta_train_s=meta_s,
                             total_s=time.time() - t0)  # fmt: skip
    paths = report.write_report(results, workdir, prefix=config.experiment)
    net0 = forgetting.initial_networks(config, pretrained, db2.num_classes,
                                       model.representation_dim)  # fmt: skip
    net0 = jax.tree.map(lambda a: jnp.asarray(a[0]), net0)
    data_b2 = training.to_device(db2, mean, std)
    idx = np.asarray(
        stream.index_stream(
            len(db2.train.labels),
            config.task_b.batch_size,
            min(config.task_b.steps, 100),
            rng.seed_for(config.seed, "fig7"),
        )  # fmt: skip
    )
    deltas = delta_histograms(model, trainer, state.theta, net0, data_b2, idx, len(idx))
    for path in plot_meta(history, deltas, workdir):
        paths[os.path.splitext(os.path.basename(path))[0]] = path
    logging.info("Results at step %d:\n%s", results["steps"][-1], report.summary_table(results))
    logging.info("Wrote %s", ", ".join(paths.values()))
    return results
