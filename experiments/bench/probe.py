"""Probe fits: every readout fit of `fig1.py:cpu` in l2r vs scikit-learn."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import median_seconds


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
