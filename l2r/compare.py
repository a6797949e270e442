"""Every method × seed on one protocol: the comparison all pipelines report.

`compare` takes the tasks in order (Task A, then the K tasks learned after it), the methods
(one `Method` per later task each) and the pre-trained networks, and runs each method with the
same starting networks, fresh heads and batches per seed through `l2r.task_b`, probing every
task. Methods that do not start from the plain Task-A network (HAT, Rep, OML, §4) get their
own starts from `method_starts`. `merge_runs` stacks the comparisons of several meta-test
tasks along the seed axis.

Per-layer CKA (`task_b.cka_layers`) is measured against two references: each method's start
network, and the multi-task teacher at the same probe step and seed when the teacher is
compared. So that the teacher's per-layer views are at hand for every other method, the
teacher runs (or is read from the cache) first, and only its views are kept (in its cache file);
each other method's CKA to it is measured as the method runs and cached with the teacher's
`history_key`, so a cached method whose teacher has since changed runs again. The teacher's
cache file holds S × P × `readout.layer_cka_size` × (the unit layers' channels) float32 (Fig. 1
`paper`, ResNet-32: 5 × 21 × 500 × 1232, about 260 MB); the others' hold only [S, P, L].
"""

import functools
import os
import time

import jax
import numpy as np
from absl import logging

from l2r import checkpoint, histories, models, probe, rng, task_b, tracking, training
from l2r.config_checks import ConfigError
from l2r.data import tasks
from l2r.methods.base import Method

HEADS = ("head_a", "head_b", "head_c", "head_d", "head_e")  # task k's head: HEADS[k]
TEACHER = "teacher"  # The method per-layer CKA is also measured against (`to_teacher`).
LAYER_REFERENCES = ("to_pretrained", "to_teacher")  # results["layer_cka"]'s references


def readout_config(config) -> probe.ReadoutConfig:
    r = config.readout
    return probe.ReadoutConfig(
        solver=r.solver, steps=r.steps, learning_rate=r.learning_rate, l2=r.l2
    )


def probe_task(task, mean, std, cfg, stream_name, seed) -> training.DeviceTask:
    """The (optionally subsampled) copy of `task` that the probe fits and tests on."""
    train, test = task.train, task.test
    if cfg.train_size:
        train = tasks.subsample(train, cfg.train_size, rng.seed_for(seed, stream_name, 0))
    if cfg.test_size:
        test = tasks.subsample(test, cfg.test_size, rng.seed_for(seed, stream_name, 1))
    return training.to_device(tasks.Task(task.name, train, test, task.class_names), mean, std)


def initial_networks(config, pretrained, num_classes, rep_dim: int):
    """Per seed s: checkpoint s % n, and a fresh head for each later task (class counts
    `num_classes`, an int for one), the same for every method.

    `pretrained` is stacked [n, ...] {'backbone', 'head', ...}; entries besides these two (a
    method's own pre-trained state, e.g. HAT's {'hat': {'emb_a'}}) are passed on as they are.
    Returns {'backbone', 'head_a', 'head_b', ...} stacked over seeds."""
    num_classes = [num_classes] if isinstance(num_classes, int) else list(num_classes)
    n = jax.tree.leaves(pretrained["backbone"])[0].shape[0]
    ckpt = np.arange(config.num_seeds) % n
    pick = lambda tree: jax.tree.map(lambda a: a[ckpt], tree)  # noqa: E731
    extra = {k: pick(v) for k, v in pretrained.items() if k not in ("backbone", "head")}
    nets = {**extra, "backbone": pick(pretrained["backbone"]), "head_a": pick(pretrained["head"])}
    for head, classes in zip(HEADS[1:], num_classes, strict=False):
        heads = [models.init_head(rng.key_for(config.seed, head, s), rep_dim, classes)
                 for s in range(config.num_seeds)]  # fmt: skip
        nets[head] = jax.tree.map(lambda *h: np.stack(h), *heads)
    return nets


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
            "none (Fig. 1). Run them in exp1..exp5, or drop them from task_b.methods."
        )
    if "rep" in names:
        starts["rep"], _, seconds["rep"] = rep.pretrain_rep(config, model, data_a, data_meta,
                                                            workdir)  # fmt: skip
    if "oml" in names:
        key = rng.key_for(config.seed, "oml")
        starts["oml"], seconds["oml"] = oml.oml_starts(config, model, pretrained, data_meta, key,
                                                       workdir, n_way)  # fmt: skip
    return starts, seconds


def split_checkpoints(config, pretrained):
    """(meta-training networks, meta-test networks): Exp 3 holds out the checkpoints from
    `meta.train_checkpoints` on; otherwise both use all of them."""
    k = config.meta.train_checkpoints
    if not k:
        return pretrained, pretrained
    return (jax.tree.map(lambda a: a[:k], pretrained), jax.tree.map(lambda a: a[k:], pretrained))


def phase_steps(config) -> list[int]:
    """Steps on each later task: `task_b.steps` (one task) or `steps_2`, `steps_3`, ..."""
    b = config.task_b
    if "steps" in b:
        return [b.steps]
    count = sum(1 for f in b.keys() if f.startswith("steps_"))
    return [b[f"steps_{k}"] for k in range(2, 2 + count)]


def compare(config, model, pretrained, task_list, mean, std, methods, starts=None, names=None,
            shard_seeds=True, cache_dir=None, writers: tracking.Writers = tracking.NO_WRITERS,
            run_prefix: str = "task_b") -> dict:  # fmt: skip
    """Runs every method of `methods` through the tasks after the first over `num_seeds` seeds.

    Args:
      task_list: [Task A, Task B] (K = 1) or [Task 1, Task 2, ..., Task K+1].
      methods: per method, its `Method` for each later task (a tuple of K; a bare `Method`
        when K = 1).
      starts: {method name: stacked start networks} for the methods with their own start
        (`method_starts`); the others start from `pretrained`.
      names: the tasks' names in metric keys: ("A", "B") when K = 1, else ("1", "2", ...).
      shard_seeds: split the seeds over every device of every process when they divide
        evenly; otherwise every process runs them all on its first device.
      cache_dir: where each method's histories are saved as `<name>-<key>.npz`
        (`histories.history_key`) and reused by a later call with the same key.
      writers: each method's probes stream to its run `<run_prefix>/<name>` of these as they
        are measured (a reused method's, when it is read); `tracking.writers(workdir)`.

    Returns:
      {"methods": {name: {metric: [S, P]}}, "steps", "seeds",
       "timing": {"task_b_s": {name: seconds its training took, when it ran},
                  "probe_s": seconds spent probing in this call,
                  "task_b_reused": names read from `cache_dir`},
       "layer_cka": {"layers": [L layer paths, in network order],
                     "to_pretrained": {name: [S, P, L]}, "to_teacher": {name: [S, P, L]}}}.
      `layer_cka` (absent when `readout.layer_cka_size` is 0 or the model records no taps):
      linear CKA, per layer (`task_b.cka_layers`: each unit layer's output averaged over space),
      on the first task's first `layer_cka_size` probe test images, to the method's start
      network (at step 0, the pre-Task-B network, or the method's own start: as `cka_<first>`)
      and to the teacher at the same probe step and seed (every method, the teacher's own CKA
      being 1; empty when the teacher is not among `methods`). Methods with a task-dependent
      representation are measured through their own first-task forward pass (`Method.taps`:
      HAT's Task-A gates), or through the plain backbone when they give none.
    """
    k_tasks = len(task_list) - 1
    names = names or (("A", "B") if k_tasks == 1 else tuple(str(i + 1) for i in range(k_tasks + 1)))
    methods = [(m,) if isinstance(m, Method) else tuple(m) for m in methods]
    steps = phase_steps(config)
    s = config.num_seeds
    seeds = training.RunAxis(s, "Task-B seeds", enabled=shard_seeds)
    dev = lambda t: seeds.replicate(training.to_device(t, mean, std))  # noqa: E731
    learned = [dev(t) for t in task_list]
    sizes = [len(t.train.labels) for t in task_list]
    earlier, phases = learned[0], []
    for k in range(1, k_tasks + 1):  # (data_a, data_b, streams) of learning task k
        if k == 1 and k_tasks == 1:  # Exps 1-4 keep their own stream names (and numbers).
            streams = task_b.make_streams(config, sizes[1], sizes[0], s)
        else:
            streams = task_b.sequence_streams(config, sizes[k], sizes[:k], steps[k - 1], k + 1)
        if k > 1:
            earlier = dev(functools.reduce(tasks.union, task_list[:k]))
        phases.append((earlier, learned[k], streams))
    starts = starts or {}
    num_classes = [t.num_classes for t in task_list]
    start_of = lambda name: seeds.split(initial_networks(  # noqa: E731
        config, starts.get(name, pretrained), num_classes[1:], model.representation_dim
    ))  # fmt: skip
    networks0 = start_of(None)
    first = task_list[0]
    probe_sets = tuple(seeds.replicate(probe_task(t, mean, std, config.readout,
                                                  f"probe_{n.lower()}", config.seed))
                       for t, n in zip(task_list, names, strict=True))  # fmt: skip
    layer_size = min(config.readout.get("layer_cka_size", 0), probe_sets[0].test_labels.shape[0])
    layers = {}
    if layer_size:
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                           networks0["backbone"])  # fmt: skip
        layers = task_b.cka_layers(model, one, first.test.images.shape[1:])
    sets = task_b.ProbeSets(
        tasks=probe_sets,
        cka_size=min(config.readout.cka_size or len(first.test.labels), len(first.test.labels)),
        layer_cka_size=layer_size if layers else 0,
        layers=tuple(layers.items()),
    )
    probe_fn = task_b.make_probe(model, readout_config(config), names, HEADS[: k_tasks + 1],
                                 num_classes, seeds.chunk)  # fmt: skip
    probe_s = 0.0  # Seconds spent probing in this call (cached histories cost none).
    initial = None

    def initial_probe():
        """The probe of `networks0`, shared by the methods that start from them; run once,
        and only if some method is not in the cache."""
        nonlocal initial, probe_s
        if initial is None:
            t1 = time.time()
            metrics0, snapshot = probe_fn(networks0, sets)
            initial = seeds.host(metrics0), snapshot
            logging.info(
                "Before the first phase: readout %s %.2f%%, original %s %.2f%%",
                names[0],
                100 * float(np.mean(initial[0][f"readout_{names[0]}"])),
                names[0],
                100 * float(np.mean(initial[0][f"original_{names[0]}"])),
            )
            probe_s += time.time() - t1
        return initial

    method_histories, train_times, reused, layer_cka = {}, {}, [], {}
    probe_steps = list(range(0, sum(steps) + 1, config.task_b.probe_every))
    if cache_dir is not None:
        splits = [(t.train.images, t.train.labels, t.test.images, t.test.labels)
                  for t in task_list]  # fmt: skip
        data_digest = checkpoint.digest([mean, std, splits])
    display = [m[0].name for m in methods]
    with_teacher = bool(layers) and TEACHER in display
    teacher = teacher_key = None  # The teacher's per-layer views [S, P, n, C] and cache key.
    # The teacher first, so that every other method can be measured against it.
    for per_phase in sorted(methods, key=lambda m: m[0].name != TEACHER):
        name = per_phase[0].name
        own = name in starts or per_phase[0].represent is not None
        path = key = None
        if cache_dir is not None:
            key = histories.history_key(
                config, per_phase, starts.get(name, pretrained), data_digest
            )
            path = os.path.join(cache_dir, f"{name}-{key}.npz")
        run_phases = [task_b.Phase(m, *p) for m, p in zip(per_phase, phases, strict=True)]
        is_teacher, vs_teacher = with_teacher and name == TEACHER, with_teacher and name != TEACHER
        found = histories.load_history(path)
        if found is not None and layers:
            kept = found.layers
            stale = ("to_pretrained" not in kept or (is_teacher and "reps" not in kept)
                     or (vs_teacher and kept.get("teacher_key") != teacher_key))  # fmt: skip
            if stale:
                logging.info("Running %s again: its cached per-layer CKA was measured against "
                             "another teacher (or none).", name)  # fmt: skip
                found = None
        writer = writers(f"{run_prefix}/{name}")
        if found is None:
            run = task_b.run_phases(
                run_phases, start_of(name) if own else networks0, config, probe_fn, sets,
                None if own else initial_probe(), seeds, writer,
                teacher=teacher if vs_teacher else None, keep_reps=is_teacher,
            )  # fmt: skip
            saved = dict(run.layers)
            if vs_teacher and teacher_key is not None:
                saved["teacher_key"] = teacher_key
            histories.save_history(path, run.history, run.train_s, run.probe_s, saved)
            probe_s += run.probe_s
        else:
            run = found
            tracking.write_history(writer, probe_steps, run.history)
            reused.append(name)
        method_histories[name] = run.history
        train_times[name] = run.train_s
        if layers:
            refs = LAYER_REFERENCES if vs_teacher else LAYER_REFERENCES[:1]
            layer_cka[name] = {k: run.layers[k] for k in refs}
        if is_teacher:
            teacher, teacher_key = run.layers["reps"], key
            widths = tuple(layers.values())
            layer_cka[name]["to_teacher"] = np.asarray(task_b.layer_cka(teacher, teacher, widths))
    out = {
        "steps": probe_steps,
        "seeds": list(range(s)),
        "methods": {n: method_histories[n] for n in display},
        "timing": {
            "task_b_s": {n: train_times[n] for n in display},
            "probe_s": probe_s,
            "task_b_reused": [n for n in display if n in reused],
        },
    }
    if layers:
        out["layer_cka"] = {
            "layers": list(layers),
            **{
                ref: {n: layer_cka[n][ref] for n in display if ref in layer_cka[n]}
                for ref in LAYER_REFERENCES
            },
        }
    return out


def merge_runs(parts: list[dict]) -> dict:
    """The comparisons of several meta-test tasks as one: runs stacked along the seed axis
    (per-layer CKA's too)."""
    first = parts[0]
    methods = {
        name: {k: np.concatenate([p["methods"][name][k] for p in parts]) for k in hist}
        for name, hist in first["methods"].items()
    }
    runs = sum(len(p["seeds"]) for p in parts)
    merged = {}
    if "layer_cka" in first:
        merged["layer_cka"] = {
            "layers": first["layer_cka"]["layers"],
            **{ref: {n: np.concatenate([p["layer_cka"][ref][n] for p in parts])
                     for n in first["layer_cka"][ref]}
               for ref in LAYER_REFERENCES},
        }  # fmt: skip
    timing = {
        "task_b_s": {n: sum(p["timing"]["task_b_s"][n] for p in parts) for n in methods},
        "probe_s": sum(p["timing"]["probe_s"] for p in parts),
        "task_b_reused": sorted({n for p in parts for n in p["timing"].get("task_b_reused", ())}),
    }
    return {"steps": first["steps"], "seeds": list(range(runs)), "methods": methods,
            "timing": timing, **merged}  # fmt: skip
