"""Run Task-B learners over seeds and probe their representations along the way.

Seeds are a mapped axis (`training.map_seeds`); steps are a `lax.scan` over host-made index
streams, run in chunks of `probe_every` steps (one compiled call each, the same shapes every
time, so one compilation) with a probe between chunks. Every method sees exactly the same
batches, head-B initialisation and pre-trained network for a given seed, so differences between
methods are the methods'.

A method's probe histories are cached in the workdir (`cached_history`), keyed by everything
that determines them, so an interrupted comparison of many methods resumes at the first method
that had not finished, and adding a method to a finished run costs only that method.
"""

import functools
import hashlib
import json
import os
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from l2r import checkpoint, distributed, models, probe, report, rng, training
from l2r.data import stream
from l2r.methods import Batch, Method

# Probe metrics in display order. readout_X: a fresh linear readout on the frozen representation
# (§1); original_X: the network's own head for task X (for A, the pre-trained head, which Task-B
# SGD never updates: the paper's "Original"); cka_A: linear CKA to the pre-Task-B network.
METRICS = ("readout_A", "original_A", "readout_B", "original_B", "cka_A")


class ProbeSets(NamedTuple):
    """Device-resident data the probe measures on (possibly subsampled for speed)."""

    a: training.DeviceTask  # Task A: readout fit on .train, accuracy on .test
    b: training.DeviceTask  # Task B
    cka_size: int  # CKA uses the first cka_size Task-A test images


def make_probe(
    model: models.Model,
    readout_cfg: probe.ReadoutConfig,
    num_a: int,
    num_b: int,
    chunk: int | None = None,
):
    """Returns jitted probe(networks_S, sets, ref_rep_S, represent) -> (metrics {name: [S]},
    rep_S); `represent` is a method's task-dependent representation (`Method.represent`).
    `chunk`: seeds vmapped together (`training.map_seeds`, `probe.fit_readouts`); None: the
    backend's default."""

    @functools.partial(jax.jit, static_argnames=("cka_size", "represent"))
    def run(networks, sets_a, sets_b, ref_rep, cka_size, represent):
        def features(network, images, data, task):
            if represent is None:
                return training.features(
                    model.apply, network["backbone"], images, data.mean, data.std
                )
            apply = lambda net, x: models.Output(represent(net, x, task), None)  # noqa: E731
            return training.features(apply, network, images, data.mean, data.std)

        rep = training.map_seeds(
            lambda n: {
                "a_train": features(n, sets_a.train_images, sets_a, 0),
                "a_test": features(n, sets_a.test_images, sets_a, 0),
                "b_train": features(n, sets_b.train_images, sets_b, 1),
                "b_test": features(n, sets_b.test_images, sets_b, 1),
            },
            networks,
            chunk=chunk,
        )
        metrics = {
            "readout_A": probe.readout_accuracies(
                rep["a_train"],
                sets_a.train_labels,
                rep["a_test"],
                sets_a.test_labels,
                num_a,
                readout_cfg,
                chunk,
            ),
            "readout_B": probe.readout_accuracies(
                rep["b_train"],
                sets_b.train_labels,
                rep["b_test"],
                sets_b.test_labels,
                num_b,
                readout_cfg,
                chunk,
            ),
            "original_A": jax.vmap(
                lambda n, r: probe.head_accuracy(
                    models.apply_head(n["head_a"], r), sets_a.test_labels
                )
            )(networks, rep["a_test"]),
            "original_B": jax.vmap(
                lambda n, r: probe.head_accuracy(
                    models.apply_head(n["head_b"], r), sets_b.test_labels
                )
            )(networks, rep["b_test"]),
        }
        cka_rep = rep["a_test"][:, :cka_size]
        ref = cka_rep if ref_rep is None else ref_rep
        metrics["cka_A"] = jax.vmap(probe.linear_cka)(cka_rep, ref)
        return metrics, cka_rep

    def probe_fn(networks, sets: ProbeSets, ref_rep=None, represent=None):
        return run(networks, sets.a, sets.b, ref_rep, cka_size=sets.cka_size, represent=represent)

    return probe_fn


class Streams(NamedTuple):
    """Host-made batch indices (and augmentation draws) for every seed and step."""

    idx_b: np.ndarray  # int32 [S, T, B]
    idx_a: np.ndarray | None  # int32 [S, T, Ba] for methods that see Task A
    aug_b: training.Augment | None
    aug_a: training.Augment | None


def make_streams(config, n_b: int, n_a: int, num_seeds: int) -> Streams:
    cfg = config.task_b
    seeds_b = [rng.seed_for(config.seed, "task_b_data", s) for s in range(num_seeds)]
    seeds_a = [rng.seed_for(config.seed, "task_b_teacher_data", s) for s in range(num_seeds)]
    idx_b = stream.index_streams(n_b, cfg.batch_size, cfg.steps, seeds_b)
    idx_a = stream.index_streams(n_a, cfg.teacher_batch_a, cfg.steps, seeds_a)
    aug_b = aug_a = None
    if config.data.augment:
        aug_b = training.augment_streams(cfg.batch_size, cfg.steps, seeds_b)
        aug_a = training.augment_streams(cfg.teacher_batch_a, cfg.steps, seeds_a)
    return Streams(idx_b, idx_a, aug_b, aug_a)


def make_advance(method: Method, chunk: int | None = None):
    """Jitted (states_S, data_a, data_b, xs) -> (states_S, mean metrics [S]) over one chunk of
    steps; `chunk`: seeds vmapped together (`training.map_seeds`)."""

    def step(carry, xs):
        state, data_a, data_b = carry
        key, idx_b, idx_a, aug_b, aug_a = xs
        x_b, y_b = training.gather(data_b, idx_b, aug_b)
        x_a = y_a = None
        if method.uses_task_a:
            x_a, y_a = training.gather(data_a, idx_a, aug_a)
        state, metrics = method.step(state, Batch(x_b, y_b, x_a, y_a), key)
        return (state, data_a, data_b), metrics

    @jax.jit
    def advance(states, data_a, data_b, keys, idx_b, idx_a, aug_b, aug_a):
        def one_seed(state, keys, idx_b, idx_a, aug_b, aug_a):
            carry = (state, data_a, data_b)
            (state, _, _), metrics = jax.lax.scan(step, carry, (keys, idx_b, idx_a, aug_b, aug_a))
            return state, jax.tree.map(jnp.mean, metrics)

        return training.map_seeds(one_seed, states, keys, idx_b, idx_a, aug_b, aug_a,
                                  chunk=chunk)  # fmt: skip

    return advance


def run_method(
    method: Method,
    networks0,
    data_a,
    data_b,
    streams: Streams,
    config,
    probe_fn,
    probe_sets: ProbeSets,
    initial_probe,
    seeds: training.RunAxis | None = None,
):
    """Runs `method` on Task B for every seed, probing every `task_b.probe_every` steps.

    Args:
      networks0: stacked initial networks [S, ...] ({'backbone','head_a','head_b'}), placed
        by `seeds`, like `data_a`, `data_b` and `probe_sets` (see `forgetting.compare_methods`).
      initial_probe: (metrics {name: [S]} on the host, reference CKA representation [S, n, D])
        of the networks before Task B, shared by the methods that start from them; None: probe
        the method's initial states (its own start or representation) and use that.
      seeds: where the seeds run (split over the devices, or not: the default).

    Returns:
      ({metric: float array [S, P]} over probe steps 0, probe_every, ..., steps; seconds spent
      training; seconds spent probing).
    """
    cfg = config.task_b
    seeds = seeds or training.RunAxis(0, enabled=False)
    num_seeds = streams.idx_b.shape[0]
    base_keys = seeds.split(
        jnp.stack([rng.key_for(config.seed, f"task_b_{method.name}", s) for s in range(num_seeds)])
    )
    states = jax.jit(
        lambda nets, keys, data_a: training.map_seeds(
            lambda n, k: method.init(n, data_a, k), nets, keys, chunk=seeds.chunk
        )
    )(networks0, base_keys, data_a)
    if initial_probe is None:
        metrics0, ref_rep = probe_fn(
            jax.vmap(method.network)(states), probe_sets, None, method.represent
        )
        initial_probe = seeds.host(metrics0), ref_rep
    metrics0, ref_rep = initial_probe
    advance = make_advance(method, seeds.chunk)
    history = {k: [np.asarray(metrics0[k])] for k in METRICS if k in metrics0}
    history["loss"] = [np.full(num_seeds, np.nan)]
    train_s = probe_s = 0.0
    progress = report.Progress(cfg.steps, f"task B {method.name} x{num_seeds}")
    for start in range(0, cfg.steps, cfg.probe_every):
        stop = start + cfg.probe_every
        steps = jnp.arange(start, stop)
        keys = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))(base_keys, steps)
        t0 = time.time()
        xs = seeds.split((
            streams.idx_b[:, start:stop],
            streams.idx_a[:, start:stop] if method.uses_task_a else None,
            training.slice_steps(streams.aug_b, start, stop),
            training.slice_steps(streams.aug_a, start, stop) if method.uses_task_a else None,
        ))  # fmt: skip
        states, step_metrics = advance(states, data_a, data_b, keys, *xs)
        jax.block_until_ready(states)
        step_metrics = seeds.host(step_metrics)
        t1 = time.time()
        metrics, _ = probe_fn(
            jax.vmap(method.network)(states), probe_sets, ref_rep, method.represent
        )
        metrics = seeds.host(metrics)
        probe_s += time.time() - t1
        train_s += t1 - t0
        for k in history:
            if k != "loss":
                history[k].append(np.asarray(metrics[k]))
        history["loss"].append(np.asarray(step_metrics["loss"]))
        progress.update(
            stop,
            loss=float(np.mean(step_metrics["loss"])),
            readout_A=float(np.mean(metrics["readout_A"])),
        )
    return {k: np.stack(v, axis=1) for k, v in history.items()}, train_s, probe_s


@functools.cache
def code_digest() -> str:
    """SHA-256 of the l2r package's Python sources: cached results are reused by the same code
    only."""
    root = pathlib.Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# The `task_b` subgroups that configure one method each: a method's cache key holds its own
# subgroup only, so a sweep of one baseline's hyper-parameter reuses the other methods' runs.
METHOD_GROUPS = ("lwf", "ewc", "hat", "oml", "rep")


def cache_dir(config, workdir: str) -> str:
    """Where finished Task-B histories are cached: `task_b.cache_dir` or <workdir>/task_b."""
    return config.task_b.get("cache_dir") or os.path.join(workdir, "task_b")


def history_key(config, method: Method, start, data_digest: str) -> str:
    """Hash of everything a method's Task-B histories depend on: its name and `params`, its
    starting networks, the data (`data_digest`: both tasks and their normalisation, by
    content), the seeds, the `task_b` group (its shared fields and the method's own subgroup,
    see `METHOD_GROUPS`), the `readout` and `model` groups, and the code."""
    task_b = {
        k: v
        for k, v in config.task_b.to_dict().items()
        if k not in ("methods", "cache_dir") and (k not in METHOD_GROUPS or k == method.name)
    }
    blob = {
        "method": method.name,
        "params": None if method.params is None else checkpoint.digest(method.params),
        "start": checkpoint.digest(start),
        "data": data_digest,
        "augment": config.data.augment,
        "seed": config.seed,
        "num_seeds": config.num_seeds,
        "task_b": task_b,
        "readout": config.readout.to_dict(),
        "model": config.model.to_dict(),
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_history(path: str | None, run):
    """`run()` -> (history, train_s, probe_s) of `run_method`, saved to `path` (.npz), or read
    from it when a finished file is there; `path` None: no cache. Process 0 writes (through a
    temporary name, so a killed run leaves no half file); every process reads.

    Returns:
      (history, train_s, probe_s, reused: whether they were read from `path`).
    """
    if path is None:
        return (*run(), False)
    found = np.asarray(os.path.exists(path))
    if jax.process_count() > 1:  # One decision for all processes: they run collectives.
        found = multihost_utils.broadcast_one_to_all(found)
    if found:
        with np.load(path) as f:
            history = {k: f[k] for k in f.files if not k.startswith("_")}
            train_s, probe_s = float(f["_train_s"]), float(f["_probe_s"])
        logging.info("Reusing the Task-B histories in %s (trained for %.0f s then).", path,
                     train_s)  # fmt: skip
        return history, train_s, probe_s, True
    history, train_s, probe_s = run()
    if distributed.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **history, _train_s=train_s, _probe_s=probe_s)
        os.replace(tmp, path)
    return history, train_s, probe_s, False
