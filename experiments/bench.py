r"""Benchmarks whose figures are ratios measured side by side in one process.

  python -m experiments.bench                      # everything below
  python -m experiments.bench --only=sgd           # SGD step rates (ResNet-32-GN, cpu net)
  python -m experiments.bench --only=probe         # all probe fits of fig1:cpu vs scikit-learn
  python -m experiments.bench --only=meta          # meta-training rates and compiled memory

Timings on shared machines drift 10-40% between runs (PERF-NOTES.md): compare rows of one run,
not rows of different runs. Each timing is the median of `--repeats` after a warm-up call.
"""

import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("only", ["sgd", "probe", "meta"], "Sections to run: sgd, probe, meta.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions per measurement (median reported).")


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # Warm-up: compilation and first run.
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {jax.device_count()}x {jax.devices()[0].device_kind}, jax {jax.__version__}"


# ----------------------------------------------------------------------------------------------
# SGD steps


def sgd_rates(model_name, model_kwargs, batch, input_shape, scan_steps, repeats):
    """Steps/s of one SGD step standalone and inside a `lax.scan`, canonical vs stock convs."""
    from l2r import models, training

    rows = {}
    for impl in ("canonical", "stock"):
        model = models.make_model(model_name, conv_impl=impl, **model_kwargs)
        key = jax.random.key(0)
        params = {
            "backbone": model.init(key, (1, *input_shape)),
            "head": models.init_head(key, model.representation_dim, 10),
        }
        x = jax.random.normal(key, (scan_steps, batch, *input_shape))
        y = jax.random.randint(key, (scan_steps, batch), 0, 10)

        def loss_fn(p, x, y, model=model):
            rep = model.apply(p["backbone"], x).representation
            return training.cross_entropy(models.apply_head(p["head"], rep), y)

        def step(p, xy, loss_fn=loss_fn):
            g = jax.grad(loss_fn)(p, *xy)
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

        one = jax.jit(step)
        scanned = jax.jit(lambda p, xs, step=step: jax.lax.scan(step, p, xs)[0])
        args = (params, x, y)
        t_one = median_seconds(lambda f=one, a=args: f(a[0], (a[1][0], a[2][0]))[0], repeats)
        t_scan = median_seconds(lambda f=scanned, a=args: f(a[0], a[1:]), repeats) / scan_steps
        rows[f"{impl} standalone"] = t_one
        rows[f"{impl} in scan({scan_steps})"] = t_scan
    return rows


def bench_sgd(repeats):
    print("\n## SGD step rate (steps/s; higher is better)\n")
    cases = [
        # Stock convs in a ResNet-32 scan take ~45 s a step here: 2 steps, 2 repeats.
        (
            "ResNet-32-GN, batch 128, 32x32x3",
            "resnet",
            dict(depth=32, widths=(16, 32, 64)),
            128,
            (32, 32, 3),
            2,
            2,
        ),
        (
            "fig1:cpu convnet (16/32/32, dense 32), batch 64, 28x28x1",
            "convnet",
            dict(widths=(16, 32, 32), hidden=32),
            64,
            (28, 28, 1),
            10,
            repeats,
        ),
    ]
    print("| model | variant | ms/step | steps/s | vs canonical in scan |")
    print("|---|---|---|---|---|")
    for title, name, kwargs, batch, shape, steps, reps in cases:
        rows = sgd_rates(name, kwargs, batch, shape, steps, reps)
        ref = rows[f"canonical in scan({steps})"]
        for variant, s in rows.items():
            print(f"| {title} | {variant} | {1e3 * s:.1f} | {1 / s:.2f} | {s / ref:.2f}x |")


# ----------------------------------------------------------------------------------------------
# Probe fits


def bench_probe(repeats):
    """All readout fits of `fig1.py:cpu` (same counts and sizes) in l2r vs scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from experiments.configs import fig1
    from l2r import experiment, probe

    config = fig1.get_config("cpu")
    probes = config.task_b.steps // config.task_b.probe_every
    # Step 0 is shared by the methods; every later probe fits one readout per seed and task.
    num_fits = (1 + probes * len(config.task_b.methods)) * config.num_seeds * 2
    # Sizes of fig1:cpu: readout subsets, representation width, 5 classes per task.
    n, m, k, s = config.readout.train_size, config.readout.test_size, 5, config.num_seeds
    d = config.model.hidden or config.model.widths[-1]
    x_tr, y_tr, x_te, y_te = probe._bench_data(s, n, m, d, k, seed=0)  # one probe's worth
    calls = num_fits // s
    print(
        f"\n## Probe fits of fig1:cpu: {num_fits} readouts on [{n}, {d}] features, {k} classes"
        f" (timed: one probe call of {s} fits, x{calls})\n"
    )

    cfg = experiment.readout_config(config)
    xj_tr, yj_tr, xj_te, yj_te = map(jnp.asarray, (x_tr, y_tr, x_te, y_te))
    rows = {}
    for name, c in (
        ("l2r adam (paper: 500 steps, lr 0.1)", cfg),
        ("l2r lbfgs", cfg._replace(solver="lbfgs")),
    ):
        fn = jax.jit(lambda a, b, c_=c: probe.readout_accuracies(a, yj_tr, b, yj_te, k, c_))
        rows[name] = (
            median_seconds(lambda fn=fn: fn(xj_tr, xj_te), repeats) * calls,
            float(np.mean(fn(xj_tr, xj_te))),
        )

    def sklearn_fits():
        accs = []
        with threadpool_limits(1):  # Two BLAS threads on 2 shared cores ran 10-30x slower.
            for a, b in zip(x_tr, x_te, strict=True):
                mu, sd = a.mean(0), a.std(0) + 1e-6
                clf = LogisticRegression(max_iter=500).fit((a - mu) / sd, y_tr)
                accs.append(clf.score((b - mu) / sd, y_te))
        return np.mean(accs)

    t = []
    for _ in range(max(2, repeats // 2)):
        t0 = time.perf_counter()
        acc = sklearn_fits()
        t.append(time.perf_counter() - t0)
    rows["scikit-learn LogisticRegression (lbfgs, 1 thread)"] = (statistics.median(t) * calls, acc)
    ref = rows["scikit-learn LogisticRegression (lbfgs, 1 thread)"][0]
    print("| solver | seconds for all fits | vs scikit-learn | mean test accuracy |")
    print("|---|---|---|---|")
    for name, (sec, acc) in rows.items():
        print(f"| {name} | {sec:.1f} | {sec / ref:.2f}x | {100 * acc:.2f}% |")


# ----------------------------------------------------------------------------------------------
# Meta-training


def _meta_setup(preset, overrides, image_shape, num_classes=5, n=512):
    """A MetaTrainer of exp1:<preset>'s model on random uint8 data (rates do not depend on it)."""
    from experiments.configs import exp1
    from l2r import forgetting, meta_train, pretrain, training

    config = exp1.get_config(preset)
    for k, v in overrides.items():
        config.meta[k] = v
    model = forgetting.make_model(config)
    gen = np.random.default_rng(0)

    def task(offset):
        images = gen.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.int32)
        mean, std = np.full(image_shape[-1], 0.5, np.float32), np.full(image_shape[-1], 0.25)
        return training.DeviceTask(*map(jnp.asarray, (images, labels, images, labels, mean,
                                                      std.astype(np.float32))))  # fmt: skip

    data_a, data_b = task(0), task(1)
    net = pretrain.init_network(model, jax.random.key(0), (1, *image_shape), num_classes)
    pretrained = jax.tree.map(lambda a: a[None], net)
    return config, model, meta_train.MetaTrainer(config, model, pretrained, data_a, data_b)


def _window_seconds(trainer, s, repeats):
    state = trainer.init()
    idx_a, idx_b = trainer.batches(0, s)
    window = trainer._window_fn(s)
    thr = jnp.float32(1e9)  # no restarts: every window does the same work
    run = lambda: window(state, trainer.inputs, idx_a, idx_b, thr)[0]  # noqa: E731
    return median_seconds(run, repeats)


def _teacher_step_seconds(trainer, repeats, steps=10):
    from l2r import training
    from l2r.methods import Batch

    inp = trainer.inputs
    state = trainer.init()
    net = jax.tree.map(lambda a: a[0], state.episodes.teacher)
    idx_a, idx_b = trainer.batches(0, steps)

    @jax.jit
    def run(net, ia, ib):
        def body(n, i):
            x_a, y_a = training.gather(inp.data_a, i[0])
            x_b, y_b = training.gather(inp.data_b, i[1])
            return trainer.teacher.step(n, Batch(x_b, y_b, x_a, y_a), None)[0], None

        return jax.lax.scan(body, net, (ia, ib))[0]

    return median_seconds(lambda: run(net, idx_a[0], idx_b[0]), repeats) / steps


def bench_meta(repeats):
    """Meta-training on exp1:cpu's convnet: inner steps/s of both T-BPTT layouts against a teacher
    SGD step; episodes mapped vs vmapped; compiled peak memory against T-BPTT length, episode
    length and episode count (XLA's memory analysis of the compiled window)."""
    reps = max(2, repeats // 2)
    e, s = 4, 5
    print(f"\n## Meta-training rate, exp1:cpu convnet, {e} episodes, T-BPTT {s}, second order\n")
    print("| variant | s/window | inner steps/s | inner step vs teacher SGD step |")
    print("|---|---|---|---|")
    rows, teacher = {}, None
    variants = (
        ("meta-update every inner step (Alg. 1), episodes mapped", dict(update_every_step=True)),
        ("one meta-update per window, episodes mapped", dict(update_every_step=False)),
        ("one meta-update per window, episodes vmapped", dict(update_every_step=False,
                                                               episode_chunk=e)),
    )  # fmt: skip
    for name, over in variants:
        _, _, trainer = _meta_setup("cpu", dict(num_episodes_parallel=e, **over), (28, 28, 1))
        if teacher is None:
            teacher = _teacher_step_seconds(trainer, repeats)
        rows[name] = _window_seconds(trainer, s, reps)
    for name, sec in rows.items():
        per_step = sec / (e * s)
        print(f"| {name} | {sec:.2f} | {1 / per_step:.1f} | {per_step / teacher:.1f}x |")
    print(f"| teacher SGD step (batch 64 A + 64 B), for reference | | {1 / teacher:.1f} | 1x |")
    mapped = rows["one meta-update per window, episodes mapped"]
    vmapped = rows["one meta-update per window, episodes vmapped"]
    print(f"\nEpisodes vmapped / mapped (time): {vmapped / mapped:.2f}x")

    print("\n## Compiled peak memory of one window (exp1:smoke net; XLA temp + arguments)\n")
    print("| T-BPTT steps | episode length | episodes | temp MiB | argument MiB |")
    print("|---|---|---|---|---|")
    for steps, length, eps in ((2, 500, 2), (5, 500, 2), (9, 500, 2), (17, 500, 2),
                               (5, 2000, 2), (5, 500, 8)):  # fmt: skip
        over = dict(num_episodes_parallel=eps, inner_steps=length, update_every_step=True)
        _, _, trainer = _meta_setup("smoke", over, (16, 16, 1))
        state = trainer.init()
        idx_a, idx_b = trainer.batches(0, steps)
        lowered = trainer._window_fn(steps).lower(state, trainer.inputs, idx_a, idx_b,
                                                   jnp.float32(1e9))  # fmt: skip
        mem = lowered.compile().memory_analysis()
        mib = lambda b: b / 2**20  # noqa: E731
        print(f"| {steps} | {length} | {eps} | {mib(mem.temp_size_in_bytes):.2f} | "
              f"{mib(mem.argument_size_in_bytes):.2f} |")  # fmt: skip


def main(argv):
    del argv
    print(f"# l2r benchmarks — {time.strftime('%Y-%m-%d')} — {machine()}")
    if "sgd" in FLAGS.only:
        bench_sgd(FLAGS.repeats)
    if "probe" in FLAGS.only:
        bench_probe(FLAGS.repeats)
    if "meta" in FLAGS.only:
        bench_meta(FLAGS.repeats)


if __name__ == "__main__":
    app.run(main)
