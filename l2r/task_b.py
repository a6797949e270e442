"""One runner for learning K tasks in sequence after Task A, probed on every task as it goes.

Exps 1-4 learn one task (K = 1: Task B); Exp 5 learns two (K = 2: Tasks 2 and 3). A run is one
method over every seed, phase after phase (its state carried across, so the learned rule keeps
its LSTM memory), each phase a `lax.scan` over host-made index streams in chunks of
`probe_every` steps (one compiled call per phase, the same shapes every chunk) with a probe of
every task between chunks. Seeds are a mapped axis, split over the devices (`training.RunAxis`).
Every method sees the same batches, heads and starting networks for a seed, so differences
between methods are the methods'.

Each probe also measures per-layer CKA (`cka_layers`, `layer_cka`): every unit layer's output,
averaged over space, on the first task's first `readout.layer_cka_size` test images, against
the start network's (and, given the teacher's, against the teacher's at the same step).

A method's finished histories are cached by `l2r.histories`.
"""

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from l2r import console, models, probe, rng, tracking, training
from l2r.data import stream
from l2r.methods.base import Batch, Method


def display_order(metrics) -> list[str]:
    """The keys of probe `metrics` in display order: per task readout_X (a fresh linear readout
    on the frozen representation, §1) then original_X (the network's own head for task X; for
    the first task the pre-trained head, the paper's "Original"), tasks in order, and last
    cka_<first> (linear CKA of first-task representations to the start's). Needed because a
    dict comes back from the device with its keys sorted."""
    kinds = {"readout": 0, "original": 1}

    def rank(key):
        kind, _, task = key.partition("_")
        return (kind not in kinds, task, kinds.get(kind, 2))

    return sorted(metrics, key=rank)


class ProbeSets(NamedTuple):
    """Device-resident data the probe measures on (possibly subsampled for speed)."""

    tasks: tuple  # (training.DeviceTask, ...): readout fit on .train, accuracy on .test
    cka_size: int  # CKA uses the first cka_size test images of the first task
    # Per-layer CKA uses the first layer_cka_size test images of the first task (0: off) ...
    layer_cka_size: int = 0
    # ... at these layers, ((path, channels), ...) in network order (`cka_layers`).
    layers: tuple = ()


class Layers(NamedTuple):
    """A probe's per-layer view of the networks, on the first task's first `layer_cka_size`
    test images: each layer of `ProbeSets.layers` by its output averaged over space ([n, C_l]
    per layer, not the whole feature map: cheap to compute, keep and compare)."""

    reps: jax.Array  # [S, n, C]: the layers' pooled outputs, concatenated in network order
    cka: jax.Array  # [S, L]: linear CKA of each layer to the reference's (the start's)


class Snapshot(NamedTuple):
    """What a probe keeps of the networks besides its metrics: the references later probes
    compare with (`make_probe`'s `ref`)."""

    rep: jax.Array  # [S, cka_size, D]: first-task representations (cka_<first>'s reference)
    layers: Layers | None  # None: per-layer CKA is off


def cka_layers(model: models.Model, backbone, image_shape) -> dict[str, int]:
    """{layer path: channels} of the layers per-layer CKA measures, in network order: the
    model's unit layers (`Model.units`: every GroupNorm and dense layer, the outputs HAT gates;
    in a ResNet before the residual sum) that record a `Tap`; for a backbone without a layout,
    every layer that records one, in recording order; {} for one that records none or takes no
    `taps` argument (a user module: per-layer CKA is then off, and the log says why).

    Args:
      backbone: one network's backbone params (or their `jax.ShapeDtypeStruct`s).
      image_shape: (H, W, C) of the inputs.
    """
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    try:
        taps = jax.eval_shape(lambda p, x: model.apply(p, x, taps=True).taps, backbone, x)
    except TypeError as e:  # A module whose __call__ has no `taps`.
        logging.info("No per-layer CKA: model %s records no taps (%s).", model.name, e)
        return {}
    taps = taps or {}
    names = [u for u in model.units if u in taps] or list(taps)
    return {n: int(taps[n].outputs.shape[-1]) for n in names}


@functools.partial(jax.jit, static_argnames="widths")
def layer_cka(x_SNC: jax.Array, y_SNC: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """[*S, L] linear CKA (`probe.linear_cka`), layer by layer, between two per-layer views
    [*S, n, C] of the same n inputs (`Layers.reps`: the layers' channels `widths`, C in all,
    concatenated in order); *S: any leading dims (seeds, probe steps)."""
    lead = x_SNC.shape[:-2]
    x = x_SNC.reshape((-1, *x_SNC.shape[-2:]))
    y = y_SNC.reshape((-1, *y_SNC.shape[-2:]))
    bounds = np.cumsum((0, *widths))
    cka = [jax.vmap(probe.linear_cka)(x[..., a:b], y[..., a:b])
           for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # fmt: skip
    return jnp.stack(cka, axis=-1).reshape((*lead, len(widths)))


def make_probe(model: models.Model, readout_cfg: probe.ReadoutConfig, names, heads, num_classes,
               chunk: int | None = None):  # fmt: skip
    """Returns probe(networks_S, sets, ref, method) -> (metrics {name: [S]}, Snapshot),
    measuring tasks `names` whose heads are `heads` and class counts `num_classes`.
    `ref`: the `Snapshot` of the networks the CKAs compare with (the start), or None: these
    networks themselves. `method`: the `Method` whose networks these are, for its
    task-dependent representation and layers (`Method.represent`, `Method.taps`; task k =
    index into `names`), or None for the backbone's. `chunk`: seeds vmapped together.

    Per-layer CKA (`Snapshot.layers`, when `sets.layer_cka_size` and `sets.layers`) runs as a
    separate compiled call: the other metrics' program is the same with it or without."""

    @functools.partial(jax.jit, static_argnames=("cka_size", "represent"))
    def run(networks, sets, ref_rep, cka_size, represent):
        def features(network, images, data, task):
            if represent is None:
                return training.features(
                    model.apply, network["backbone"], images, data.mean, data.std
                )
            apply = lambda net, x: models.Output(represent(net, x, task), None)  # noqa: E731
            return training.features(apply, network, images, data.mean, data.std)

        rep = training.map_seeds(
            lambda n: [
                (features(n, d.train_images, d, k), features(n, d.test_images, d, k))
                for k, d in enumerate(sets)
            ],
            networks,
            chunk=chunk,
        )  # [(train [S, N, D], test [S, M, D])] per task
        metrics = {}
        for name, data, head, n, (train, test) in zip(names, sets, heads, num_classes, rep,
                                                      strict=True):  # fmt: skip
            metrics[f"readout_{name}"] = probe.readout_accuracies(
                train, data.train_labels, test, data.test_labels, n, readout_cfg, chunk
            )
            metrics[f"original_{name}"] = jax.vmap(
                lambda net, r, h=head, d=data: probe.head_accuracy(
                    models.apply_head(net[h], r), d.test_labels
                )
            )(networks, test)
        cka_rep = rep[0][1][:, :cka_size]
        ref = cka_rep if ref_rep is None else ref_rep
        metrics[f"cka_{names[0]}"] = jax.vmap(probe.linear_cka)(cka_rep, ref)
        return metrics, cka_rep

    @functools.partial(jax.jit, static_argnames=("layers", "size", "taps"))
    def run_layers(networks, data, ref_reps, layers, size, taps):
        def apply(network, x):
            if taps is None:
                out = model.apply(network["backbone"], x, taps=True).taps
            else:  # The method's own forward pass on the first task (HAT: its Task-A gates).
                out = taps(network, x, 0)
            return models.Output(jnp.concatenate([out[k].outputs for k, _ in layers], -1), None)

        reps = training.map_seeds(
            lambda n: training.features(apply, n, data.test_images[:size], data.mean, data.std),
            networks,
            chunk=chunk,
        )  # [S, size, C]
        ref = reps if ref_reps is None else ref_reps
        return Layers(reps, layer_cka(reps, ref, tuple(w for _, w in layers)))

    def probe_fn(networks, sets: ProbeSets, ref: Snapshot | None = None,
                 method: Method | None = None):  # fmt: skip
        represent = None if method is None else method.represent
        metrics, rep = run(networks, tuple(sets.tasks), None if ref is None else ref.rep,
                           cka_size=sets.cka_size, represent=represent)  # fmt: skip
        layers = None
        if sets.layer_cka_size and sets.layers:
            ref_reps = None if ref is None or ref.layers is None else ref.layers.reps
            layers = run_layers(networks, sets.tasks[0], ref_reps, layers=tuple(sets.layers),
                                size=sets.layer_cka_size,
                                taps=None if method is None else method.taps)  # fmt: skip
        return metrics, Snapshot(rep, layers)

    return probe_fn


class Streams(NamedTuple):
    """Host-made batch indices (and augmentation draws) of one phase, every seed and step."""

    idx_b: np.ndarray  # int32 [S, T, B]: the task being learned
    idx_a: np.ndarray | None  # int32 [S, T, Ba]: the earlier tasks, for methods that see them
    aug_b: training.Augment | None
    aug_a: training.Augment | None


def make_streams(config, n_b: int, n_a: int, num_seeds: int) -> Streams:
    """Task B's streams after Task A (K = 1): B from its n_b examples, A from Task A's n_a."""
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


def sequence_streams(config, n_b: int, a_sizes, num_steps: int, task: int) -> Streams:
    """Streams of learning task number `task` (2, 3, ...) after tasks of sizes `a_sizes`: B
    from its n_b examples; A (what rehearsing methods see) balanced over the earlier tasks,
    indexing their union (`tasks.union` order)."""
    cfg, s = config.task_b, config.num_seeds
    seeds_b = [rng.seed_for(config.seed, f"task_{task}_data", i) for i in range(s)]
    idx_b = stream.index_streams(n_b, cfg.batch_size, num_steps, seeds_b)
    parts, offset = [], 0
    # Earlier tasks share the batch equally, the first ones taking the remainder (as the
    # three-task meta-training episodes do).
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
    return Streams(idx_b, np.concatenate(parts, axis=-1), aug_b, aug_a)


class Phase(NamedTuple):
    """One task of the sequence as a method learns it."""

    method: Method
    data_a: training.DeviceTask  # the earlier tasks (a rehearsing method's "A")
    data_b: training.DeviceTask  # the task being learned
    streams: Streams


def make_advance(method: Method, chunk: int | None = None):
    """Jitted (states_S, (keys, idx_b, idx_a, aug_b, aug_a), data_a=, data_b=) -> (states_S,
    mean step metrics [S]) over one chunk of steps; `chunk`: seeds vmapped together."""

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
    def advance(states, xs, data_a, data_b):
        keys, idx_b, idx_a, aug_b, aug_a = xs

        def one_seed(state, keys, idx_b, idx_a, aug_b, aug_a):
            carry = (state, data_a, data_b)
            (state, _, _), metrics = jax.lax.scan(step, carry, (keys, idx_b, idx_a, aug_b, aug_a))
            return state, jax.tree.map(jnp.mean, metrics)

        return training.map_seeds(one_seed, states, keys, idx_b, idx_a, aug_b, aug_a,
                                  chunk=chunk)  # fmt: skip

    return advance


def switch_states(method: Method, states, keys, data_done, chunk: int | None = None):
    """`method.switch` over the seeds: the states after the previous task, made this one's."""
    switch = jax.jit(lambda states, keys, data: training.map_seeds(
        lambda st, k: method.switch(st, data, k), states, keys, chunk=chunk
    ))  # fmt: skip
    return switch(states, keys, data_done)


class Run(NamedTuple):
    """A method's run through its phases (`run_phases`), or what the cache kept of one
    (`load_history`)."""

    history: dict  # {metric: float array [S, P]} over probe steps 0, probe_every, ..., the last
    train_s: float  # seconds training
    probe_s: float  # seconds probing
    # Per-layer CKA ({} when off): "to_pretrained" [S, P, L] to the start; "to_teacher"
    # [S, P, L] to the teacher's layers at the same step, when given them (and, in the cache,
    # "teacher_key": the teacher's `history_key` they were measured against); "reps"
    # [S, P, n, C], the per-layer views themselves (`Layers.reps`), when asked to keep them.
    layers: dict


def run_phases(phases, networks0, config, probe_fn, probe_sets: ProbeSets, initial_probe,
               seeds: training.RunAxis | None = None,
               writer: tracking.MetricWriter = tracking.NOOP, teacher=None,
               keep_reps: bool = False) -> Run:  # fmt: skip
    """Runs one method through `phases` for every seed, probing every `task_b.probe_every`
    steps; its state carries across phases. Each probe's seed means (and the mean loss) go to
    `writer` as soon as they are measured, at their step.

    Args:
      phases: [Phase], in order; the first phase's method initialises the state.
      networks0: stacked starting networks [S, ...], placed by `seeds` like the phases' data
        and `probe_sets`.
      initial_probe: (metrics {name: [S]} on the host, `Snapshot`) of `networks0`, shared by
        the methods that start from them; None: probe the method's initial states (its own
        start or representation) and use that.
      seeds: where the seeds run (split over the devices, or not: the default).
      writer: where the probes stream to (`tracking.writers(workdir)("task_b/<method>")`).
      teacher: the teacher's per-layer views at every probe step, float [S, P, n, C] on the
        host (its `Run.layers["reps"]`), to measure per-layer CKA to; None: none.
      keep_reps: return this method's per-layer views (`Run.layers["reps"]`), as the
        teacher's are kept for the others.

    Returns:
      The `Run`.
    """
    seeds = seeds or training.RunAxis(0, enabled=False)
    first = phases[0].method
    num_seeds = phases[0].streams.idx_b.shape[0]
    base_keys = seeds.split(
        jnp.stack([rng.key_for(config.seed, f"task_b_{first.name}", s) for s in range(num_seeds)])
    )
    states = jax.jit(
        lambda nets, keys, data_a: training.map_seeds(
            lambda n, k: first.init(n, data_a, k), nets, keys, chunk=seeds.chunk
        )
    )(networks0, base_keys, phases[0].data_a)
    if initial_probe is None:
        metrics0, ref = probe_fn(jax.vmap(first.network)(states), probe_sets, None, first)
        initial_probe = seeds.host(metrics0), ref
    metrics0, ref = initial_probe
    history = {k: [np.asarray(metrics0[k])] for k in display_order(metrics0)}
    history["loss"] = [np.full(num_seeds, np.nan)]
    layers = {}  # {"to_pretrained", "to_teacher", "reps": [[S, ...] per probe step]}

    def record_layers(snapshot, p: int) -> None:
        """Keeps the per-layer view of probe step number `p` (on the host)."""
        view = None if snapshot is None else snapshot.layers
        if view is None:
            return
        got = {"to_pretrained": view.cka, **({"reps": view.reps} if keep_reps else {})}
        if teacher is not None:
            widths = tuple(w for _, w in probe_sets.layers)
            got["to_teacher"] = layer_cka(view.reps, seeds.split(teacher[:, p]), widths)
        for k, v in seeds.host(got).items():
            layers.setdefault(k, []).append(np.asarray(v))

    record_layers(ref, 0)
    writer.write_scalars(0, tracking.seed_means({k: v[0] for k, v in history.items()
                                                 if k != "loss"}))  # fmt: skip
    train_s = probe_s = 0.0
    every = config.task_b.probe_every
    total = sum(p.streams.idx_b.shape[1] for p in phases)
    progress = console.Progress(total, f"{first.name} x{num_seeds}")
    first_readout = next(iter(history))
    timer = {"t0": 0.0}  # when the chunk being run was dispatched
    offset = 0
    for i, phase in enumerate(phases):
        method, st = phase.method, phase.streams
        if i > 0 and method.switch is not None:  # The next task begins (Exp 5).
            switch_keys = seeds.split(jnp.stack([
                rng.key_for(config.seed, f"task_b_{first.name}_switch", s, i)
                for s in range(num_seeds)
            ]))  # fmt: skip
            states = switch_states(method, states, switch_keys, phases[i - 1].data_b, seeds.chunk)
        advance = make_advance(method, seeds.chunk)
        uses_a = method.uses_task_a

        def xs_for(start, stop, st=st, offset=offset, uses_a=uses_a):
            timer["t0"] = time.time()
            steps = jnp.arange(offset + start, offset + stop)
            keys_ = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))(base_keys, steps)
            return (keys_, *seeds.split((
                st.idx_b[:, start:stop],
                st.idx_a[:, start:stop] if uses_a else None,
                training.slice_steps(st.aug_b, start, stop),
                training.slice_steps(st.aug_a, start, stop) if uses_a else None,
            )))  # fmt: skip

        def on_chunk(stop, states, step_metrics, method=method, offset=offset):
            """Probes every task after the chunk and records it."""
            nonlocal train_s, probe_s
            jax.block_until_ready(states)
            step_metrics = seeds.host(step_metrics)
            t1 = time.time()
            train_s += t1 - timer["t0"]
            metrics, snapshot = probe_fn(jax.vmap(method.network)(states), probe_sets, ref, method)
            metrics = seeds.host(metrics)
            record_layers(snapshot, len(history["loss"]))
            probe_s += time.time() - t1
            for k in metrics0:
                history[k].append(np.asarray(metrics[k]))
            history["loss"].append(np.asarray(step_metrics["loss"]))
            means = tracking.seed_means({k: v[-1] for k, v in history.items()})
            writer.write_scalars(offset + stop, means)
            return {"loss": float(np.mean(step_metrics["loss"])),
                    first_readout: float(np.mean(metrics[first_readout]))}  # fmt: skip

        chunk = functools.partial(advance, data_a=phase.data_a, data_b=phase.data_b)
        progress.compiling("the steps and the probe" if i == 0 else f"the steps of phase {i + 1}")
        states, _ = training.run_chunked(chunk, states, st.idx_b.shape[1], every, xs_for,
                                         progress, on_chunk, offset)  # fmt: skip
        offset += st.idx_b.shape[1]
    history = {k: np.stack(v, axis=1) for k, v in history.items()}
    return Run(history, train_s, probe_s, {k: np.stack(v, axis=1) for k, v in layers.items()})
