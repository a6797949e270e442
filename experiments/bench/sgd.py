"""SGD steps: steps/s of one step standalone and inside a `lax.scan`, canonical vs stock convs."""

import jax

from experiments.bench.common import median_seconds


def sgd_problem(model_name, model_kwargs, batch, input_shape, steps, impl="canonical"):
    """One SGD step (lr 0.1, cross-entropy, 10 classes) and its arguments.

    Returns:
      (params {'backbone', 'head'}, x [steps, B, *input_shape], y int [steps, B], step) with
      `step(params, (x_B, y_B)) -> (params, None)`, a `lax.scan` body.
    """
    from l2r import models, training

    model = models.make_model(model_name, conv_impl=impl, **model_kwargs)
    key = jax.random.key(0)
    params = {
        "backbone": model.init(key, (1, *input_shape)),
        "head": models.init_head(key, model.representation_dim, 10),
    }
    x = jax.random.normal(key, (steps, batch, *input_shape))
    y = jax.random.randint(key, (steps, batch), 0, 10)

    def loss_fn(p, x, y):
        rep = model.apply(p["backbone"], x).representation
        return training.cross_entropy(models.apply_head(p["head"], rep), y)

    def step(p, xy):
        g = jax.grad(loss_fn)(p, *xy)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

    return params, x, y, step


def sgd_rates(model_name, model_kwargs, batch, input_shape, scan_steps, repeats):
    """Steps/s of one SGD step standalone and inside a `lax.scan`, canonical vs stock convs."""
    rows = {}
    for impl in ("canonical", "stock"):
        params, x, y, step = sgd_problem(
            model_name, model_kwargs, batch, input_shape, scan_steps, impl
        )
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
