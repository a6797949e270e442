"""Learning to remember, end to end (Exps. 1-4): pre-train, meta-train, meta-test, report.

Stages:
  1. data -> Task A and the meta-training / meta-test Task-B data (§5, Table 1):
       Exp 1: Task B's training examples split into halves DB1 (meta-training) and DB2
         (meta-test), the test split shared;
       Exps 2-4 (a `pools` config group): episodes learn n-way tasks drawn from a pool of
         meta-training classes; meta-test on `pools.meta_test_tasks` n-way tasks drawn from a
         disjoint pool (Exp 4: of another dataset);
  2. Task-A pre-training (`l2r.pretrain`, cached); Exp 3 (`meta.train_checkpoints` > 0):
     episodes start from the first `train_checkpoints` networks, the meta-test from the others;
  3. meta-training of θ (`l2r.meta_train`, Orbax checkpoints, resumable);
  4. meta-test: the learned rule and the baselines of `task_b.methods` over `num_seeds` seeds
     per meta-test task, probed identically (`l2r.forgetting.compare_methods`); the runs of all
     meta-test tasks are reported together (`num_seeds` × tasks runs per method);
  5. artefacts: Fig.-3-style curves, tables, the curriculum (Fig. 6) and δ histograms (Fig. 7).
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
    distributed,
    experiment,
    forgetting,
    meta_train,
    metalearner,
    pretrain,
    report,
    rng,
    run_b,
    training,
)
from l2r import workdir as workdir_lib
from l2r.data import stream, tasks
from l2r.experiment import ConfigError, require
from l2r.methods import METHOD_NAMES, is_method_name, make_method
from l2r.methods.learned import make_learned, student_step

REP_LOSSES = meta_train.REP_LOSSES


class MetaPlan(NamedTuple):
    """Which data meta-training and meta-test see."""

    meta_train: tasks.Task  # Exp 1: DB1; Exps 2-4: the pool of meta-training classes
    class_table: np.ndarray | None  # int32 [T, n_way] episode tasks (pool labels), or None
    meta_test: list  # [tasks.Task]: Exp 1: [DB2]; Exps 2-4: the n-way meta-test tasks


def _load_pool(config, pool) -> tasks.Task:
    """The pool of classes `pool.classes` of the dataset `pool` names ("" = the Task-A data),
    labels 0..P-1 in the order of `pool.classes`."""
    dataset = experiment.load_dataset(pool if pool.source else config.data)
    return tasks.make_task(dataset, pool.classes, f"{dataset.name}-pool")


def plan_tasks(config, task_a: tasks.Task, task_b: tasks.Task) -> MetaPlan:
    """Exp 1: DB1 / DB2 halves of Task B; with `pools`: the two pools and their n-way tasks."""
    if "pools" not in config:
        db1, db2 = tasks.halves(task_b, rng.seed_for(config.seed, "halves"))
        return MetaPlan(db1, None, [db2])
    p = config.pools
    train_pool, test_pool = load_pools(config, task_a)
    num_tasks = p.meta_train_tasks or config.meta.episodes
    seed_train = rng.seed_for(config.seed, "meta_train_tasks")
    seed_test = rng.seed_for(config.seed, "meta_test_tasks")
    table = tasks.sample_nway_classes(
        train_pool, range(train_pool.num_classes), p.n_way, num_tasks, seed_train
    )
    test = tasks.sample_nway_tasks(
        test_pool, range(test_pool.num_classes), p.n_way, p.meta_test_tasks, seed_test
    )
    return MetaPlan(train_pool, table, test)


def load_pools(config, task_a: tasks.Task) -> tuple[tasks.Task, tasks.Task]:
    """The meta-training and meta-test pools of `config.pools`, checked disjoint from each other
    (when drawn from one dataset) and from Task A, with Task A's image shape."""
    p = config.pools
    train_pool = _load_pool(config, p.meta_train)
    test_pool = _load_pool(config, p.meta_test)
    same = lambda a, b: (a.source or config.data.source) == (b.source or config.data.source)  # noqa: E731
    if same(p.meta_train, p.meta_test):
        tasks.assert_disjoint(meta_train_pool=train_pool, meta_test_pool=test_pool)
    for name, pool, loaded in (("meta_train", p.meta_train, train_pool),
                               ("meta_test", p.meta_test, test_pool)):  # fmt: skip
        if not pool.source or pool.source == config.data.source:
            tasks.assert_disjoint(**{"task_A": task_a, f"{name}_pool": loaded})
        shape_a, shape_p = task_a.train.images.shape[1:], loaded.train.images.shape[1:]
        if shape_a != shape_p:
            raise ConfigError(
                f"pools.{name} images are {shape_p} but Task A's are {shape_a}; set "
                f"pools.{name}.image_size (and matching channels) so the network sees one shape."
            )
    return train_pool, test_pool


def split_checkpoints(config, pretrained):
    """(meta-training networks, meta-test networks): Exp 3 holds out the checkpoints from
    `meta.train_checkpoints` on; otherwise both use all of them."""
    k = config.meta.train_checkpoints
    if not k:
        return pretrained, pretrained
    return (jax.tree.map(lambda a: a[:k], pretrained), jax.tree.map(lambda a: a[k:], pretrained))


def merge_runs(parts: list[dict]) -> dict:
    """The comparisons of several meta-test tasks as one: runs stacked along the seed axis."""
    first = parts[0]
    methods = {
        name: {k: np.concatenate([p["methods"][name][k] for p in parts]) for k in hist}
        for name, hist in first["methods"].items()
    }
    runs = sum(len(p["seeds"]) for p in parts)
    timing = {
        "task_b_s": {n: sum(p["timing"]["task_b_s"][n] for p in parts) for n in methods},
        "probe_s": sum(p["timing"]["probe_s"] for p in parts),
        "task_b_reused": sorted({n for p in parts for n in p["timing"].get("task_b_reused", ())}),
    }
    return {"steps": first["steps"], "seeds": list(range(runs)), "methods": methods,
            "timing": timing}  # fmt: skip


def check_config(config: ml_collections.ConfigDict) -> None:
    experiment.check_common(config)
    b = config.task_b
    names = (*METHOD_NAMES, "learned")
    for name in b.methods:
        require(name == "learned" or is_method_name(name),
                f"task_b.methods has unknown method {name!r}; choose from {names}.")  # fmt: skip
    require(b.steps >= 1 and b.probe_every >= 1 and b.steps % b.probe_every == 0,
            f"task_b.steps={b.steps} must be a positive multiple of task_b.probe_every="
            f"{b.probe_every}.")  # fmt: skip
    check_meta(config)
    if "pools" in config:
        p = config.pools
        require(p.n_way >= 2, f"pools.n_way={p.n_way}; n-way tasks need at least 2 classes.")
        require(p.meta_test_tasks >= 1, "pools.meta_test_tasks must be >= 1.")
        for name in ("meta_train", "meta_test"):
            classes = p[name].classes
            require(len(classes) >= p.n_way,
                    f"pools.{name}.classes has {len(classes)} classes, fewer than "
                    f"pools.n_way={p.n_way}.")  # fmt: skip


def check_meta(config: ml_collections.ConfigDict) -> None:
    """Checks the `meta` group (Algorithm 1 and the meta-learner)."""
    m = config.meta
    require(m.rep_loss in REP_LOSSES, f"meta.rep_loss={m.rep_loss!r}; choose one of {REP_LOSSES}.")
    require(m.gate in metalearner.GATES, f"meta.gate={m.gate!r}; choose one of "
            f"{metalearner.GATES}.")  # fmt: skip
    require(m.num_episodes_parallel >= 1, "meta.num_episodes_parallel must be >= 1.")
    n_dev = jax.device_count()
    require(not m.get("shard_episodes", True) or m.num_episodes_parallel % n_dev == 0,
            f"meta.num_episodes_parallel={m.num_episodes_parallel} episodes cannot be split "
            f"evenly over {n_dev} devices: make it a multiple of {n_dev}, or set "
            "meta.shard_episodes=False to run them all on one device.")  # fmt: skip
    require(m.episodes >= 1 and m.inner_steps >= 1, "meta.episodes, meta.inner_steps must be >= 1.")
    require(1 <= m.tbptt <= m.tbptt_max, f"meta.tbptt={m.tbptt} must be in [1, tbptt_max].")
    require(m.curriculum_every >= 1, "meta.curriculum_every must be >= 1.")
    require(m.learning_rate > 0 and m.loss_scale > 0, "meta.learning_rate, loss_scale must be > 0.")
    n_ckpt = config.pretrain.num_checkpoints
    require(
        0 <= m.train_checkpoints < n_ckpt,
        f"meta.train_checkpoints={m.train_checkpoints} must be 0 or leave at least one of the "
        f"pretrain.num_checkpoints={n_ckpt} networks for the meta-test (Exp 3).",
    )


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
    plan = plan_tasks(config, task_a, task_b)
    for task in plan.meta_test:
        forgetting.check_sizes(config, task_a, task)
    experiment.check_batch("task_b.batch_size", config.task_b.batch_size,
                           len(plan.meta_train.train.labels), "the meta-training data")  # fmt: skip
    workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    model = forgetting.make_model(config)
    t0 = time.time()
    data_a = training.to_device(task_a, mean, std)
    pretrained, pre_acc, pretrain_s = pretrain.pretrained_networks(config, model, data_a, workdir)

    train_nets, test_nets = split_checkpoints(config, pretrained)
    t1 = time.time()
    data_meta = training.to_device(plan.meta_train, mean, std)
    learned = "learned" in config.task_b.methods
    trainer = state = None
    history = {}
    if learned:  # Baselines alone need no meta-training, only the same protocol.
        trainer, state, history = meta_train.meta_train(
            config, model, train_nets, data_a, data_meta, os.path.join(workdir, "meta"),
            class_table=plan.class_table,
        )  # fmt: skip
        # The meta-test runs in every process on its own devices.
        state = state._replace(theta=distributed.local_copy(state.theta))
    meta_s = time.time() - t1
    n_way = config.pools.n_way if "pools" in config else None
    starts, start_s = forgetting.method_starts(config, model, test_nets, data_a, data_meta,
                                               workdir, n_way)  # fmt: skip

    methods = []
    for name in config.task_b.methods:
        if name == "learned":
            methods.append(make_learned(model, trainer.ml, state.theta, trainer.lr))
        else:
            methods.append(make_method(name, model, config.task_b))
    compared = merge_runs([
        forgetting.compare_methods(config, model, test_nets, task_a, task, mean, std, methods,
                                   starts, cache_dir=run_b.cache_dir(config, workdir))
        for task in plan.meta_test
    ])  # fmt: skip
    results = {
        "experiment": config.experiment,
        "preset": config.preset,
        "config": config.to_dict(),
        **compared,
        "pretrain_test_accuracy": pre_acc,
        "meta": {k: list(v) for k, v in history.items()},
    }
    results["timing"].update(pretrain_s=pretrain_s, meta_train_s=meta_s, starts_s=start_s,
                             total_s=time.time() - t0)  # fmt: skip
    if "pools" in config:
        results["meta_test_tasks"] = [list(t.class_names) for t in plan.meta_test]
    paths = report.write_report(results, workdir, prefix=config.experiment)
    if learned:
        for path in meta_figures(config, model, trainer, state, history, plan, test_nets, mean,
                                 std, workdir):  # fmt: skip
            paths[os.path.splitext(os.path.basename(path))[0]] = path
    logging.info("Results at step %d:\n%s", results["steps"][-1], report.summary_table(results))
    logging.info("Wrote %s", ", ".join(paths.values()))
    return results


def meta_figures(config, model, trainer, state, history, plan, test_nets, mean, std, workdir):
    """Figs. 6 and 7 of a meta-trained rule: its curriculum and its gates on a meta-test task."""
    db2 = plan.meta_test[0]
    net0 = forgetting.initial_networks(config, test_nets, db2.num_classes,
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
    return plot_meta(history, deltas, workdir)
