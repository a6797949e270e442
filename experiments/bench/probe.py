"""Probe fits: every readout fit of `fig1.py:cpu` in l2r vs scikit-learn (`bench_probe`), and
the ways of fitting many readouts, each on its own features, that chose l2r.probe's default
solver and its layouts (`bench_fits`)."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench.common import median_seconds
from l2r import probe

DEAD_STD = 1e-6  # l2r.probe's threshold: units with a smaller training std are not rescaled.


def _bench_data(num_fits, n, m, d, k, seed):
    """Per-fit features (own class means and mixing, ReLU'd); shared labels."""
    rng = np.random.default_rng(seed)
    y_train, y_test = rng.integers(0, k, n), rng.integers(0, k, m)

    def features(means, mix, labels):
        z = rng.normal(size=(labels.size, d)) + means[labels]
        return np.maximum(z @ mix, 0).astype(np.float32)

    x_train, x_test = [], []
    for _ in range(num_fits):
        means = rng.normal(size=(k, d)) * 0.3
        mix = rng.normal(size=(d, d)) / np.sqrt(d) * rng.uniform(0.5, 3.0)
        x_train.append(features(means, mix, y_train))
        x_test.append(features(means, mix, y_test))
    return np.stack(x_train), y_train, np.stack(x_test), y_test


def _reference_adam_fit(x_ND, y_N, num_classes, config):
    """The straightforward optax version of the Adam fit (autodiff, [N, D] @ [D, K] logits)."""
    mean, std = jnp.mean(x_ND, axis=0), jnp.std(x_ND, axis=0)
    std = jnp.where(std > DEAD_STD, std, 1.0)
    xs_ND, y_NK = (x_ND - mean) / std, jax.nn.one_hot(y_N, num_classes)
    params = (jnp.zeros((x_ND.shape[-1], num_classes)), jnp.zeros((num_classes,)))

    def loss(p):
        ce = optax.softmax_cross_entropy(xs_ND @ p[0] + p[1], y_NK).mean()
        return ce + 0.5 * config.l2 * jnp.sum(p[0] ** 2)

    opt = optax.adam(config.learning_rate)

    def step(carry, _):
        p, state = carry
        updates, state = opt.update(jax.grad(loss)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, config.steps)
    return probe.Readout(params[0], params[1], mean, std)


def bench_fits(num_fits: int = 20, n: int = 15000, d: int = 64, k: int = 5, seed: int = 0) -> dict:
    """Times ways to fit `num_fits` readouts, each on its own [n, d] features, k shared classes.

    All in one process; each variant is called once first (compilation, reported apart as
    "first_call_seconds": compile + one fit, or compile + all fits for the batched ones), then
    timed:
      adam_reference: plain optax Adam through autodiff, one jitted fit per call (the
        PERF-NOTES baseline).
      adam_one_by_one: l2r.probe's Adam (same protocol, hand-written gradient, fast layouts).
      adam_map / adam_vmap: all fits in one `fit_readouts` call, chunk=1 (`lax.map`) or
        chunk=num_fits (one vmap).
      lbfgs_one_by_one / lbfgs_vmap: `solver="lbfgs"` with scikit-learn's default objective
        (C=1, i.e. l2 = 1/n).
      sklearn: `LogisticRegression()` (lbfgs, C=1) on the same standardised features, in turn,
        with BLAS limited to one thread (two threads ran 10-30x slower on a busy 2-core box).
    Test predictions (n // 3 rows per fit) are compared with scikit-learn's.

    Returns:
      {"seconds": {variant: s for all fits}, "first_call_seconds": {...},
       "agreement_vs_sklearn": {variant: fraction of identical test predictions},
       "accuracy": {variant: mean test accuracy}, "shape": [num_fits, n, d, k], "backend"}.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    m = max(n // 3, 1)
    x_train, y_train, x_test, y_test = _bench_data(num_fits, n, m, d, k, seed)
    xj_train, yj_train, xj_test = jnp.asarray(x_train), jnp.asarray(y_train), jnp.asarray(x_test)
    adam = probe.PAPER_READOUT
    lbfgs = probe.ReadoutConfig(solver="lbfgs", l2=1.0 / n)  # = sklearn's C=1 objective

    def one_by_one(fit_fn, config):
        fit = jax.jit(lambda x: fit_fn(x, yj_train, k, config))

        def run(xs_train, xs_test):
            return [
                jnp.argmax(probe.predict(fit(xtr), xte), -1)
                for xtr, xte in zip(xs_train, xs_test, strict=True)
            ]

        return run, lambda: fit(xj_train[0])

    def batched(config, chunk):
        def run(xs_train, xs_test):
            readouts = probe.fit_readouts(xs_train, yj_train, k, config, chunk=chunk)
            return jnp.argmax(probe.predict(readouts, xs_test), -1)

        return run, lambda: run(xj_train, xj_test)

    variants = {
        "adam_reference": one_by_one(_reference_adam_fit, adam),
        "adam_one_by_one": one_by_one(probe.fit_readout, adam),
        "adam_map": batched(adam, 1),
        "adam_vmap": batched(adam, num_fits),
        "lbfgs_one_by_one": one_by_one(probe.fit_readout, lbfgs),
        "lbfgs_vmap": batched(lbfgs, num_fits),
    }
    seconds, first_call_seconds, preds = {}, {}, {}
    for name, (run, warm) in variants.items():
        t = time.perf_counter()
        jax.block_until_ready(warm())  # Batched warm-ups run all fits: an upper bound.
        first_call_seconds[name] = time.perf_counter() - t
        t = time.perf_counter()
        preds[name] = np.asarray(jax.block_until_ready(run(xj_train, xj_test)))
        seconds[name] = time.perf_counter() - t

    t = time.perf_counter()
    sk = []
    with threadpool_limits(1):
        for xtr, xte in zip(x_train, x_test, strict=True):
            mean, std = xtr.mean(0), xtr.std(0)
            std = np.where(std > DEAD_STD, std, 1.0)
            clf = LogisticRegression().fit((xtr - mean) / std, y_train)
            sk.append(clf.predict((xte - mean) / std))
    seconds["sklearn"] = time.perf_counter() - t
    preds["sklearn"] = np.stack(sk)

    return {
        "seconds": seconds,
        "first_call_seconds": first_call_seconds,
        "agreement_vs_sklearn": {
            v: float(np.mean(p == preds["sklearn"])) for v, p in preds.items()
        },
        "accuracy": {v: float(np.mean(p == y_test)) for v, p in preds.items()},
        "shape": [num_fits, n, d, k],
        "backend": jax.default_backend(),
    }


def print_fits(num_fits: int = 20, n: int = 15000, d: int = 64, k: int = 5) -> dict:
    """`bench_fits` as a markdown table; returns its result."""
    out = bench_fits(num_fits, n, d, k)
    print(
        f"\n## Readout solvers: {num_fits} fits, each on its own [{n}, {d}] features, {k} classes"
        f" ({out['backend']})\n"
    )
    print("| variant | seconds per fit | first call s | same predictions as sklearn | accuracy |")
    print("|---|---|---|---|---|")
    for name, sec in out["seconds"].items():
        first = out["first_call_seconds"].get(name)
        print(
            f"| {name} | {sec / num_fits:.3f} | {'-' if first is None else f'{first:.2f}'} | "
            f"{100 * out['agreement_vs_sklearn'][name]:.2f}% | {100 * out['accuracy'][name]:.2f}% |"
        )
    return out


def bench_probe(repeats):
    """All readout fits of `fig1.py:cpu` (same counts and sizes) in l2r vs scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from l2r import compare
    from l2r.configs import fig1

    config = fig1.get_config("cpu")
    probes = config.task_b.steps // config.task_b.probe_every
    # Step 0 is shared by the methods; every later probe fits one readout per seed and task.
    num_fits = (1 + probes * len(config.task_b.methods)) * config.num_seeds * 2
    # Sizes of fig1:cpu: readout subsets, representation width, 5 classes per task.
    n, m, k, s = config.readout.train_size, config.readout.test_size, 5, config.num_seeds
    d = config.model.hidden or config.model.widths[-1]
    x_tr, y_tr, x_te, y_te = _bench_data(s, n, m, d, k, seed=0)  # one probe's worth
    calls = num_fits // s
    print(
        f"\n## Probe fits of fig1:cpu: {num_fits} readouts on [{n}, {d}] features, {k} classes"
        f" (timed: one probe call of {s} fits, x{calls})\n"
    )

    cfg = compare.readout_config(config)
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
