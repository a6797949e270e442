"""Meta-training: inner steps/s of the T-BPTT layouts, and the compiled memory of a window.

The setup helpers (`meta_setup`, `window_seconds`, `teacher_step`...) serve the flops and
scaling sections too.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import median_seconds

IMAGE_SHAPES = {"cpu": (28, 28, 1), "smoke": (16, 16, 1)}  # exp1's data: Fashion-MNIST, synthetic


def meta_setup(preset, overrides, image_shape, num_classes=5, n=512, model=None, batch=None):
    """(config, model, `MetaRun`) of exp1:<preset>'s model (or `model`) on random uint8 data
    (rates do not depend on it); `batch` replaces the student's and each teacher half's batch."""
    from l2r import models, pretrain, training
    from l2r.configs import exp1
    from l2r.meta import episodes, loop

    config = exp1.get_config(preset)
    for k, v in overrides.items():
        config.meta[k] = v
    if batch is not None:
        config.task_b.batch_size = config.task_b.teacher_batch_a = batch
    m = config.model
    if model is None:
        model = models.make_model("convnet", widths=tuple(m.widths), groups=m.groups,
                                  hidden=m.hidden or None)  # fmt: skip
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
    problem = episodes.two_tasks(config, model, pretrained, data_a, data_b)
    return config, model, loop.MetaRun(config, model, problem)


def window_args(run, s):
    """(state, inputs, batches, threshold) of an `s`-step window; the threshold is so high
    that no episode restarts, so every window does the same work."""
    return run.init(), run.inputs, run.problem.batches(0, s), jnp.float32(1e9)


def window_seconds(run, s, repeats):
    args, window = window_args(run, s), run.window(s)
    return median_seconds(lambda: window(*args)[0], repeats)


def compiled_window(run, s, repeats):
    """(seconds to trace and compile the `s`-step window, median seconds of one window run)."""
    args = window_args(run, s)
    t0 = time.perf_counter()
    window = run.window(s).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, median_seconds(lambda: window(*args)[0], repeats)


def teacher_step(run):
    """(step(net, (idx_a [Ba], idx_b [Bb])) -> (net, None), one episode's teacher net): the
    teacher's SGD step on A∪B, batches gathered from the run's device-resident tasks."""
    from l2r import training

    inp, problem = run.inputs, run.problem

    def step(n, i):
        x_a, y_a = training.gather(inp.data_a, i[0])
        x_b, y_b = training.gather(inp.data_b, i[1])
        return problem.teacher_step(n, x_a, y_a, x_b, y_b, None), None

    return step, jax.tree.map(lambda a: a[0], run.init().episodes.teacher)


def teacher_step_seconds(run, repeats, steps=10):
    step, net = teacher_step(run)
    idx_a, idx_b = run.problem.batches(0, steps)
    run = jax.jit(lambda net, ia, ib: jax.lax.scan(step, net, (ia, ib))[0])
    return median_seconds(lambda: run(net, idx_a[0], idx_b[0]), repeats) / steps


def bench_meta(repeats):
    """Meta-training on exp1:cpu's convnet: inner steps/s of both T-BPTT layouts against a teacher
    SGD step, the first window's compile time; episodes mapped vs vmapped. (`main` follows it
    with `bench_memory`.) Compiles are timed with the persistent compilation cache off."""
    reps = max(2, repeats // 2)
    e, s = 4, 5
    print(f"\n## Meta-training rate, exp1:cpu convnet, {e} episodes, T-BPTT {s}, second order\n")
    print("| variant | compile s | s/window | inner steps/s | inner step vs teacher SGD step |")
    print("|---|---|---|---|---|")
    rows, teacher = {}, None
    every, per_window = "meta-update every inner step (Alg. 1), episodes mapped", (
        "one meta-update per window, episodes mapped")  # fmt: skip
    variants = (
        (every, dict(update_every_step=True)),
        (per_window, dict(update_every_step=False)),
        ("one meta-update per window, episodes vmapped", dict(update_every_step=False,
                                                               episode_chunk=e)),
    )  # fmt: skip
    for name, over in variants:
        _, _, run = meta_setup("cpu", dict(num_episodes_parallel=e, **over), (28, 28, 1))
        if teacher is None:
            teacher = teacher_step_seconds(run, repeats)
        rows[name] = compiled_window(run, s, reps)
    for name, (compile_s, sec) in rows.items():
        per_step = sec / (e * s)
        print(f"| {name} | {compile_s:.1f} | {sec:.2f} | {1 / per_step:.1f} | "
              f"{per_step / teacher:.2f}x |")  # fmt: skip
    print(f"| teacher SGD step (batch 64 A + 64 B), for reference | | | {1 / teacher:.1f} | 1x |")
    print()
    for name in (per_window, every):
        print(f"meta inner step / teacher step: {rows[name][1] / (e * s) / teacher:.2f}x ({name})")
    for name in (per_window, every):
        compile_s, sec = rows[name]
        print(f"window compile: {compile_s:.1f} s ({compile_s / sec:.1f} x a window) ({name})")
    mapped = rows[per_window][1]
    vmapped = rows["one meta-update per window, episodes vmapped"][1]
    print(f"Episodes vmapped / mapped (time): {vmapped / mapped:.2f}x")


def window_memory(preset, steps, overrides):
    """XLA's memory analysis of the compiled `steps`-step window of exp1:<preset>'s net."""
    _, _, run = meta_setup(preset, overrides, IMAGE_SHAPES[preset])
    return run.window(steps).lower(*window_args(run, steps)).compile()


def bench_memory(tbptt_rows, episode_rows):
    """Compiled memory of one window (exp1:smoke net, Alg. 1's meta-update every inner step)
    against T-BPTT length (2 episodes), episode length, and episodes in flight (T-BPTT 5)."""
    print("\n## Compiled memory of one window (exp1:smoke net; XLA's memory analysis)\n")
    print("| T-BPTT steps | episode length | episodes | temp MiB | argument MiB | output MiB |")
    print("|---|---|---|---|---|---|")
    rows = [(s, 500, 2) for s in tbptt_rows] + [(5, 2000, 2)]
    rows += [(5, 500, e) for e in episode_rows if (5, 500, e) not in rows]
    mib = lambda b: b / 2**20  # noqa: E731
    for steps, length, eps in rows:
        over = dict(num_episodes_parallel=eps, inner_steps=length, update_every_step=True)
        mem = window_memory("smoke", steps, over).memory_analysis()
        print(
            f"| {steps} | {length} | {eps} | {mib(mem.temp_size_in_bytes):.2f} | "
            f"{mib(mem.argument_size_in_bytes):.2f} | {mib(mem.output_size_in_bytes):.2f} |"
        )
    print(
        "\nA call holds its arguments, its outputs and the temp block at once. (XLA:CPU's "
        "`peak_memory_in_bytes` comes out below the temp size alone, so it is not shown.)"
    )
