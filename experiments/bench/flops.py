"""Achieved FLOP/s: XLA's FLOP counts over measured times, against a float32 matmul's."""

import jax
import jax.numpy as jnp

from experiments.bench.common import median_seconds
from experiments.bench.meta import (
    IMAGE_SHAPES,
    meta_setup,
    teacher_step,
    teacher_step_seconds,
    window_seconds,
)
from experiments.bench.sgd import sgd_problem


def xla_flops(compiled) -> float:
    """FLOPs of one call of `compiled` (`jax.jit(f).lower(*args).compile()`), by XLA's cost
    analysis.

    XLA (jaxlib 0.10.2) counts the body of a while loop (`lax.scan`, `lax.map`, `fori_loop`)
    once, whatever its trip count: exact for loop-free programs only.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, dict):  # A dict today; older jax gave a list, one dict per program.
        cost = [cost]
    return float(sum(c.get("flops", 0.0) for c in cost or ()))


def bench_flops(depth, batch, n, episodes, tbptt, repeats):
    """Achieved FLOP/s (XLA's FLOP counts over measured times) against a matmul's."""
    rows = {}  # workload -> (FLOPs per call, seconds per call)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.dot).lower(a, a).compile()
    peak_name = f"float32 matmul {n}x{n} (the peak)"
    rows[peak_name] = xla_flops(matmul), median_seconds(lambda: matmul(a, a), repeats)

    resnet = dict(depth=depth, widths=(16, 32, 64))
    params, x, y, step = sgd_problem("resnet", resnet, batch, (32, 32, 3), 1)
    xy = (x[0], y[0])
    sgd = jax.jit(step).lower(params, xy).compile()
    sgd_seconds = median_seconds(lambda: sgd(params, xy)[0], repeats)
    rows[f"ResNet-{depth}-GN SGD step, batch {batch}, 32x32x3"] = xla_flops(sgd), sgd_seconds

    over = dict(num_episodes_parallel=episodes, update_every_step=False)
    _, _, trainer = meta_setup("cpu", over, IMAGE_SHAPES["cpu"])
    teacher, net = teacher_step(trainer)
    idx_a, idx_b = trainer.problem.batches(0, 1)
    one = jax.jit(teacher).lower(net, (idx_a[0, 0], idx_b[0, 0])).compile()
    rows["teacher SGD step, exp1:cpu convnet, batch 64 A + 64 B (in a scan)"] = (
        xla_flops(one),
        teacher_step_seconds(trainer, repeats),
    )

    # The window loops over episodes and steps, whose bodies XLA counts once: count a
    # 1-episode, 1-step window (loop-free) and scale by episodes x steps.
    _, _, single = meta_setup("cpu", dict(over, num_episodes_parallel=1), IMAGE_SHAPES["cpu"])
    batches = single.problem.batches(0, 1)
    lowered = single.window(1).lower(single.init(), single.inputs, batches, jnp.float32(1e9))
    name = f"meta-training window, exp1:cpu convnet, {episodes} episodes x {tbptt} steps"
    rows[name + ", one meta-update, second order"] = (
        episodes * tbptt * xla_flops(lowered.compile()),
        window_seconds(trainer, tbptt, max(2, repeats // 2)),
    )

    peak = rows[peak_name][0] / rows[peak_name][1]
    print(f"\n## Achieved FLOP/s against this machine's matmul peak ({peak / 1e9:.0f} GFLOP/s)\n")
    print("| workload | GFLOP per call | ms per call | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|")
    for name, (flops, sec) in rows.items():
        rate = flops / sec
        print(
            f"| {name} | {flops / 1e9:.3f} | {1e3 * sec:.1f} | {rate / 1e9:.1f} | "
            f"{100 * rate / peak:.0f}% |"
        )
    print(
        "\nFLOPs: XLA's cost analysis of the compiled program (convs, dots and elementwise ops, "
        "remat recomputation included). XLA counts a loop body once, so the window's count is "
        "that of a loop-free 1-episode, 1-step window times episodes x steps; its once-per-"
        "window meta-update (Adam on θ, <1% of an inner step) is thereby counted that many times."
    )
