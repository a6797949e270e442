"""Run learners through Task 2 and then Task 3 and probe all three tasks (Exp 5's meta-test).

As `l2r.run_b` for one task: seeds are a mapped axis, steps a `lax.scan` in chunks of
`probe_every` steps (`run_b.make_advance`) with a probe between chunks; every method sees the
same networks, heads and batches for a seed. A method's state carries across the switch (the
learned rule keeps its LSTM state). The probe fits a fresh linear readout on the frozen
representation for each of the three tasks (readout_k), and scores each task's own head
(original_k) and the CKA of Task-1 representations to the networks before Task 2 (cka_1).
"""

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from l2r import experiment, forgetting, models, probe, report, rng, run_b, training
from l2r.data import stream, tasks
from l2r.methods import Method
from l2r.methods.multitask import HEADS

READOUT = ("readout_1", "readout_2", "readout_3")  # per-task probe metrics, in task order
# Probe metrics in display order.
METRICS = ("readout_1", "original_1", "readout_2", "original_2", "readout_3", "original_3",
           "cka_1")  # fmt: skip


def make_streams(config, n_b: int, a_sizes, num_steps: int, task: int) -> run_b.Streams:
    """Batch indices of every seed for learning Task `task` (2 or 3): B from its n_b examples;
    A (the teacher's) balanced over the earlier tasks of sizes `a_sizes`, indexing their union."""
    cfg, s = config.task_b, config.num_seeds
    seeds_b = [rng.seed_for(config.seed, f"task_{task}_data", i) for i in range(s)]
    idx_b = stream.index_streams(n_b, cfg.batch_size, num_steps, seeds_b)
    parts, offset = [], 0
    # Earlier tasks share the batch equally, the first ones taking the remainder (as in
    # `SequentialTrainer.batches`).
    shares = [len(a) for a in np.array_split(np.arange(cfg.teacher_batch_a), len(a_sizes))]
    for j, (n, share) in enumerate(zip(a_sizes, shares, strict=True)):
        seeds = [rng.seed_for(config.seed, f"task_{task}_teacher_data", j, i) for i in range(s)]
        parts.append(offset + stream.index_streams(n, int(share), num_steps, seeds))
        offset += n
    aug_b = aug_a = None
    if config.data.augment:
        aug_b = training.augment_streams(cfg.batch_size, num_steps, seeds_b)
        seeds_a = [rng.seed_for(config.seed, f"task_{task}_teacher_aug", i) for i in range(s)]
        aug_a = training.augment_streams(cfg.teacher_batch_a, num_steps, seeds_a)
    return run_b.Streams(idx_b, np.concatenate(parts, axis=-1), aug_b, aug_a)


def make_probe(model: models.Model, readout_cfg: probe.ReadoutConfig, num_classes):
    """Jitted probe(networks_S, sets (three DeviceTasks), ref_rep_S or None) -> (metrics
    {readout_k, original_k: [S]} for k = 1, 2, 3 and cka_1, Task-1 test representations)."""

    @functools.partial(jax.jit, static_argnames="cka_size")
    def run(networks, sets, ref_rep, cka_size):
        def features(net, images, data):
            return training.features(model.apply, net["backbone"], images, data.mean, data.std)

        def one(net):
            return [
                (features(net, d.train_images, d), features(net, d.test_images, d)) for d in sets
            ]

        rep = training.map_seeds(one, networks)  # [(train [S, N, D], test [S, M, D])] per task
        metrics = {}
        tasks_ = zip(sets, HEADS, num_classes, rep, strict=True)
        for k, (data, head, n, (train, test)) in enumerate(tasks_, 1):
            metrics[f"readout_{k}"] = probe.readout_accuracies(
                train, data.train_labels, test, data.test_labels, n, readout_cfg
            )
            logits = jax.vmap(lambda net, r, h=head: models.apply_head(net[h], r))(networks, test)
            metrics[f"original_{k}"] = probe.head_accuracy(logits, data.test_labels)
        cka_rep = rep[0][1][:, :cka_size]
        ref = cka_rep if ref_rep is None else ref_rep
        metrics["cka_1"] = jax.vmap(probe.linear_cka)(cka_rep, ref)
        return metrics, cka_rep

    def probe_fn(networks, sets, cka_size, ref_rep=None):
        return run(networks, tuple(sets), ref_rep, cka_size=cka_size)

    return probe_fn


class Phase(NamedTuple):
    """One task of the meta-test sequence as a method sees it."""

    method: Method
    data_a: training.DeviceTask  # the earlier tasks (the teacher's A), labels as `multitask_loss`
    data_b: training.DeviceTask  # the task being learned
    streams: run_b.Streams


def run_phases(name, phases, networks0, data_1, config, measure, initial):
    """One method over every seed through `phases` (state carried across), probed every
    `task_b.probe_every` steps.

    Args:
      measure: (networks_S, ref_rep_S) -> (metrics, rep): the probe on this task sequence.
      initial: `measure` of `networks0`, shared by the methods (all start from them).

    Returns:
      ({metric: [S, P]}, seconds training, seconds probing).
    """
    cfg, s = config.task_b, config.num_seeds
    keys = jnp.stack([rng.key_for(config.seed, f"task_b_{name}", i) for i in range(s)])
    init = phases[0].method.init
    states = jax.jit(lambda nets, keys, data: training.map_seeds(
        lambda n, k: init(n, data, k), nets, keys))(networks0, keys, data_1)  # fmt: skip
    metrics0, ref_rep = initial
    history = {k: [np.asarray(metrics0[k])] for k in METRICS}
    history["loss"] = [np.full(s, np.nan)]
    train_s = probe_s = 0.0
    offset = 0
    total = sum(p.streams.idx_b.shape[1] for p in phases)
    progress = report.Progress(total, f"tasks 2, 3 {name} x{s}")
    for phase in phases:
        advance, st = run_b.make_advance(phase.method), phase.streams
        uses_a = phase.method.uses_task_a
        for start in range(0, st.idx_b.shape[1], cfg.probe_every):
            stop = start + cfg.probe_every
            steps = jnp.arange(offset + start, offset + stop)
            step_keys = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))(keys, steps)
            t0 = time.time()
            states, step_metrics = advance(
                states, phase.data_a, phase.data_b, step_keys, st.idx_b[:, start:stop],
                st.idx_a[:, start:stop] if uses_a else None,
                training.slice_steps(st.aug_b, start, stop),
                training.slice_steps(st.aug_a, start, stop) if uses_a else None,
            )  # fmt: skip
            jax.block_until_ready(states)
            t1 = time.time()
            networks = jax.vmap(phase.method.network)(states)
            metrics = jax.device_get(measure(networks, ref_rep)[0])
            probe_s += time.time() - t1
            train_s += t1 - t0
            for k in METRICS:
                history[k].append(np.asarray(metrics[k]))
            history["loss"].append(np.asarray(step_metrics["loss"]))
            progress.update(offset + stop, loss=float(np.mean(step_metrics["loss"])),
                            readout_1=float(np.mean(metrics["readout_1"])))  # fmt: skip
        offset += st.idx_b.shape[1]
    return {k: np.stack(v, axis=1) for k, v in history.items()}, train_s, probe_s


def initial_networks(config, pretrained, n_way: int, rep_dim: int):
    """Per seed: the checkpoint and fresh Task-2 heads of `forgetting.initial_networks`, and a
    fresh Task-3 head (the same for every method)."""
    nets = forgetting.initial_networks(config, pretrained, n_way, rep_dim)
    heads = [models.init_head(rng.key_for(config.seed, "head_c", s), rep_dim, n_way)
             for s in range(config.num_seeds)]  # fmt: skip
    return {**nets, "head_c": jax.tree.map(lambda *h: np.stack(h), *heads)}


def compare_methods(config, model, pretrained, task_1, task_2, task_3, mean, std, methods):
    """Every (Task-2, Task-3) method pair of `methods` on one task sequence, over `num_seeds`
    seeds, with the same networks, heads and batches. Returns the dict of
    `forgetting.compare_methods` (steps 0..steps_2 + steps_3)."""
    b = config.task_b
    dev = lambda t: training.to_device(t, mean, std)  # noqa: E731
    data_1, data_2, data_3 = dev(task_1), dev(task_2), dev(task_3)
    data_12 = dev(tasks.union(task_1, task_2))
    n_1, n_2, n_3 = (len(t.train.labels) for t in (task_1, task_2, task_3))
    streams_2 = make_streams(config, n_2, (n_1,), b.steps_2, task=2)
    streams_3 = make_streams(config, n_3, (n_1, n_2), b.steps_3, task=3)
    networks0 = initial_networks(config, pretrained, task_2.num_classes, model.representation_dim)
    sets = [forgetting.probe_task(t, mean, std, config.readout, f"probe_{k}", config.seed)
            for k, t in enumerate((task_1, task_2, task_3), 1)]  # fmt: skip
    cka_size = min(config.readout.cka_size or len(task_1.test.labels), len(task_1.test.labels))
    num_classes = (task_1.num_classes, task_2.num_classes, task_3.num_classes)
    probe_fn = make_probe(model, experiment.readout_config(config), num_classes)
    measure = lambda nets, ref=None: probe_fn(nets, sets, cka_size, ref)  # noqa: E731
    t0 = time.time()
    initial = measure(networks0)
    probe_s = time.time() - t0
    histories, train_times = {}, {}
    for m2, m3 in methods:
        phases = (Phase(m2, data_1, data_2, streams_2), Phase(m3, data_12, data_3, streams_3))
        hist, train_s, method_probe_s = run_phases(m2.name, phases, networks0, data_1, config,
                                                   measure, initial)  # fmt: skip
        histories[m2.name], train_times[m2.name] = hist, train_s
        probe_s += method_probe_s
        end = " / ".join(f"{100 * hist[k][:, -1].mean():.1f}%" for k in READOUT)
        logging.info("%s: readout on Tasks 1 / 2 / 3 at the end: %s", m2.name, end)
    return {
        "steps": list(range(0, b.steps_2 + b.steps_3 + 1, b.probe_every)),
        "seeds": list(range(config.num_seeds)),
        "methods": histories,
        "timing": {"task_b_s": train_times, "probe_s": probe_s},
    }
