r"""Benchmarks whose figures are ratios measured side by side in one process.

  python -m experiments.bench                      # everything below
  python -m experiments.bench --only=sgd           # SGD step rates (ResNet-32-GN, cpu net)
  python -m experiments.bench --only=probe         # all probe fits of fig1:cpu vs scikit-learn

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
flags.DEFINE_list("only", ["sgd", "probe"], "Sections to run: sgd, probe.")
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


def main(argv):
    del argv
    print(f"# l2r benchmarks — {time.strftime('%Y-%m-%d')} — {machine()}")
    if "sgd" in FLAGS.only:
        bench_sgd(FLAGS.repeats)
    if "probe" in FLAGS.only:
        bench_probe(FLAGS.repeats)


if __name__ == "__main__":
    app.run(main)
