"""Fig. 1: how much of Task A does a network's representation keep while it learns Task B?

Stages (each a pure function of the config and its inputs; pre-training is cached):
  1. data -> Task A, Task B (disjoint classes, asserted);
  2. Task-A pre-training (`l2r.pretrain`), reused when the same checkpoints exist;
  3. every method in `task_b.methods` on Task B over `num_seeds` seeds (`l2r.run_b`), probed
     every `task_b.probe_every` steps: readout accuracy on A and B, the original A head, CKA;
  4. artefacts in the workdir (`l2r.report`).
"""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from l2r import checkpoint, experiment, models, pretrain, report, rng, run_b, training
from l2r import workdir as workdir_lib
from l2r.data import tasks
from l2r.experiment import ConfigError, require
from l2r.methods import METHOD_NAMES, is_method_name, make_method


def check_config(config: ml_collections.ConfigDict) -> None:
    experiment.check_common(config)
    b = config.task_b
    require(
        len(b.methods) > 0,
        f"task_b.methods is empty; name at least one of {', '.join(METHOD_NAMES)}.",
    )
    for m in b.methods:
        require(
            is_method_name(m),
            f"task_b.methods has unknown method {m!r}; choose from "
            f"{', '.join(METHOD_NAMES)} or sgd_x<factor>.",
        )
    require(
        b.steps >= 1 and b.probe_every >= 1, "task_b.steps and task_b.probe_every must be >= 1."
    )
    require(
        b.steps % b.probe_every == 0,
        f"task_b.steps={b.steps} is not a multiple of task_b.probe_every={b.probe_every}; "
        "choose a probe interval that divides the number of steps.",
    )


def make_model(config) -> models.Model:
    m = config.model
    if m.name == "resnet":
        return models.make_model("resnet", depth=m.depth, widths=tuple(m.widths), groups=m.groups)
    return models.make_model(
        "convnet", widths=tuple(m.widths), groups=m.groups, hidden=m.hidden or None
    )


def build_tasks(config):
    """Loads the data and returns (Task A, Task B, per-channel mean, std)."""
    dataset = experiment.load_dataset(config.data)
    task_a, task_b = tasks.split_task(dataset, config.data.classes_a, config.data.classes_b)
    mean, std = tasks.normalization_stats(dataset.train)
    logging.info(
        "Task A: %s (%d train / %d test); Task B: %s (%d / %d)",
        ", ".join(task_a.class_names),
        len(task_a.train.labels),
        len(task_a.test.labels),
        ", ".join(task_b.class_names),
        len(task_b.train.labels),
        len(task_b.test.labels),
    )
    return task_a, task_b, mean, std


def check_sizes(config, task_a, task_b) -> None:
    n_a, n_b = len(task_a.train.labels), len(task_b.train.labels)
    experiment.check_batch("pretrain.batch_size", config.pretrain.batch_size, n_a, "Task A")
    experiment.check_batch("task_b.batch_size", config.task_b.batch_size, n_b, "Task B")
    if "teacher" in config.task_b.methods:
        experiment.check_batch(
            "task_b.teacher_batch_a", config.task_b.teacher_batch_a, n_a, "Task A"
        )


def probe_task(task, mean, std, cfg, stream_name, seed) -> training.DeviceTask:
    """The (optionally subsampled) copy of `task` that the probe fits and tests on."""
    train, test = task.train, task.test
    if cfg.train_size:
        train = tasks.subsample(train, cfg.train_size, rng.seed_for(seed, stream_name, 0))
    if cfg.test_size:
        test = tasks.subsample(test, cfg.test_size, rng.seed_for(seed, stream_name, 1))
    return training.to_device(tasks.Task(task.name, train, test, task.class_names), mean, std)


def initial_networks(config, pretrained, num_classes_b: int, rep_dim: int):
    """Per Task-B seed s: checkpoint s % n, and a fresh Task-B head (the same for every method).

    `pretrained` is stacked [n, ...] {'backbone', 'head', ...}; entries besides these two (a
    method's own pre-trained state, e.g. HAT's {'hat': {'emb_a'}}) are passed on as they are."""
    n = jax.tree.leaves(pretrained["backbone"])[0].shape[0]
    ckpt = np.arange(config.num_seeds) % n
    heads_b = [
        models.init_head(rng.key_for(config.seed, "head_b", s), rep_dim, num_classes_b)
        for s in range(config.num_seeds)
    ]
    pick = lambda tree: jax.tree.map(lambda a: a[ckpt], tree)  # noqa: E731
    extra = {k: pick(v) for k, v in pretrained.items() if k not in ("backbone", "head")}
    return {
        **extra,
        "backbone": pick(pretrained["backbone"]),
        "head_a": pick(pretrained["head"]),
        "head_b": jax.tree.map(lambda *h: np.stack(h), *heads_b),
    }


def method_starts(config, model, pretrained, data_a, data_meta, workdir, n_way=None):
    """The starting networks of the methods of `task_b.methods` that do not start from the
    plain Task-A network (§4): HAT (pre-trained with masks), Rep (pre-trained on A and the
    meta-training classes) and OML (the pre-trained backbone meta-trained for fast readouts).

    Args:
      data_meta: the meta-training data (Exp 1: DB1; Exps 2-5: the pool of meta-training
        classes), or None where there is none (Fig. 1): Rep and OML then cannot run.
      n_way: classes per OML episode (None: all meta-training classes at once).

    Returns:
      ({method name: stacked [n, ...] {'backbone', 'head', ...}}, {method name: seconds}).
    """
    from l2r.methods import hat, oml, rep

    names, starts, seconds = config.task_b.methods, {}, {}
    if "hat" in names:
        nets, _, seconds["hat"] = hat.pretrain_hat(config, model, data_a, workdir)
        starts["hat"] = {"backbone": nets["backbone"], "head": nets["head"],
                         "hat": {"emb_a": nets["emb_a"]}}  # fmt: skip
    if ("rep" in names or "oml" in names) and data_meta is None:
        raise ConfigError(
            "task_b.methods names rep/oml, which need meta-training data; this experiment has "
            "none (Fig. 1). Run them in exp1..exp4, or drop them from task_b.methods."
        )
    if "rep" in names:
        starts["rep"], _, seconds["rep"] = rep.pretrain_rep(config, model, data_a, data_meta,
                                                            workdir)  # fmt: skip
    if "oml" in names:
        key = rng.key_for(config.seed, "oml")
        starts["oml"], seconds["oml"] = oml.oml_starts(config, model, pretrained, data_meta, key,
                                                       workdir, n_way)  # fmt: skip
    return starts, seconds


def compare_methods(
    config,
    model,
    pretrained,
    task_a,
    task_b,
    mean,
    std,
    methods,
    starts=None,
    shard_seeds=True,
    cache_dir=None,
) -> dict:
    """Runs every `Method` of `methods` on Task B over `num_seeds` seeds, probed identically.

    The seeds are split over every device of every process when they divide evenly (and
    `shard_seeds`); otherwise every process runs them all on its first device.

    Every method starts from `pretrained`, or from `starts[name]` where given (see
    `method_starts`), with the same Task-B heads and batches. A method with its own start or a
    task-dependent representation (`Method.represent`) gets its own step-0 probe, which is
    also its CKA reference.

    With a `cache_dir`, each method's histories are saved there as `<name>-<key>.npz`
    (`run_b.history_key`) and reused by a later call with the same key.

    Returns:
      {"methods": {name: {metric: [S, P]}}, "steps", "seeds",
       "timing": {"task_b_s": {name: seconds its Task-B training took, when it ran},
                  "probe_s": seconds spent probing in this call,
                  "task_b_reused": names read from `cache_dir`}}.
    """
    streams = run_b.make_streams(
        config, len(task_b.train.labels), len(task_a.train.labels), config.num_seeds
    )
    seeds = training.RunAxis(config.num_seeds, "Task-B seeds", enabled=shard_seeds)
    data_a = seeds.replicate(training.to_device(task_a, mean, std))
    data_b = seeds.replicate(training.to_device(task_b, mean, std))
    starts = starts or {}
    start_of = lambda name: seeds.split(initial_networks(  # noqa: E731
        config, starts.get(name, pretrained), task_b.num_classes, model.representation_dim
    ))  # fmt: skip
    networks0 = start_of(None)
    sets = run_b.ProbeSets(
        a=seeds.replicate(probe_task(task_a, mean, std, config.readout, "probe_a", config.seed)),
        b=seeds.replicate(probe_task(task_b, mean, std, config.readout, "probe_b", config.seed)),
        cka_size=min(config.readout.cka_size or len(task_a.test.labels), len(task_a.test.labels)),
    )
    probe_fn = run_b.make_probe(model, experiment.readout_config(config), task_a.num_classes,
                                task_b.num_classes, seeds.chunk)  # fmt: skip
    probe_s = 0.0  # Seconds spent probing in this call (cached histories cost none).
    initial = None

    def initial_probe():
        """The probe of `networks0`, shared by the methods that start from them; run once,
        and only if some method is not in the cache."""
        nonlocal initial, probe_s
        if initial is None:
            t1 = time.time()
            metrics0, ref_rep = probe_fn(networks0, sets)
            initial = seeds.host(metrics0), ref_rep
            logging.info(
                "Before Task B: readout A %.2f%%, original A %.2f%%",
                100 * float(np.mean(initial[0]["readout_A"])),
                100 * float(np.mean(initial[0]["original_A"])),
            )
            probe_s += time.time() - t1
        return initial

    histories, train_times, reused = {}, {}, []
    if cache_dir is not None:
        splits = [(t.train.images, t.train.labels, t.test.images, t.test.labels)
                  for t in (task_a, task_b)]  # fmt: skip
        data_digest = checkpoint.digest([mean, std, splits])
    for method in methods:
        own = method.name in starts or method.represent is not None
        path = None
        if cache_dir is not None:
            key = run_b.history_key(config, method, starts.get(method.name, pretrained),
                                    data_digest)  # fmt: skip
            path = os.path.join(cache_dir, f"{method.name}-{key}.npz")
        history, train_s, method_probe_s, was_cached = run_b.cached_history(
            path,
            lambda method=method, own=own: run_b.run_method(
                method, start_of(method.name) if own else networks0, data_a, data_b, streams,
                config, probe_fn, sets, None if own else initial_probe(), seeds,
            ),
        )  # fmt: skip
        histories[method.name] = history
        train_times[method.name] = train_s
        if was_cached:
            reused.append(method.name)
        else:
            probe_s += method_probe_s
    return {
        "steps": list(range(0, config.task_b.steps + 1, config.task_b.probe_every)),
        "seeds": list(range(config.num_seeds)),
        "methods": histories,
        "timing": {"task_b_s": train_times, "probe_s": probe_s, "task_b_reused": reused},
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the Fig.-1 experiment of `config` and writes its artefacts into `workdir`."""
    check_config(config)
    task_a, task_b, mean, std = build_tasks(config)
    check_sizes(config, task_a, task_b)
    # Everything is validated: from here on the workdir is written to.
    workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    model = make_model(config)
    t0 = time.time()
    data_a = training.to_device(task_a, mean, std)
    pretrained, pre_acc, pretrain_s = pretrain.pretrained_networks(config, model, data_a, workdir)
    starts, start_s = method_starts(config, model, pretrained, data_a, None, workdir)
    methods = [make_method(n, model, config.task_b) for n in config.task_b.methods]
    compared = compare_methods(config, model, pretrained, task_a, task_b, mean, std, methods,
                               starts, cache_dir=run_b.cache_dir(config, workdir))  # fmt: skip
    results = {
        "experiment": config.experiment,
        "preset": config.preset,
        "config": config.to_dict(),
        **compared,
        "pretrain_test_accuracy": pre_acc,
    }
    results["timing"].update(pretrain_s=pretrain_s, starts_s=start_s, total_s=time.time() - t0)
    paths = report.write_report(results, workdir, prefix="fig1")
    logging.info("Results at step %d:\n%s", results["steps"][-1], report.summary_table(results))
    logging.info("Wrote %s", ", ".join(paths.values()))
    return results


__all__ = ["ConfigError", "run", "check_config"]
