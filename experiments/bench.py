r"""Benchmarks whose figures are ratios measured side by side in one process.

  python -m experiments.bench                      # everything below
  python -m experiments.bench --only=sgd           # SGD step rates (ResNet-32-GN, cpu net)
  python -m experiments.bench --only=probe         # all probe fits of fig1:cpu vs scikit-learn
  python -m experiments.bench --only=meta          # meta-training rates and compiled memory
  python -m experiments.bench --only=memory        # compiled memory alone (T-BPTT, episodes)
  python -m experiments.bench --only=torch         # ResNet-32-GN SGD step: l2r vs PyTorch eager
  python -m experiments.bench --only=flops         # achieved FLOP/s against the matmul peak
  python -m experiments.bench --only=scaling       # meta-training on 1, 2, 4, 8 CPU devices

Timings on shared machines drift 10-40% between runs (PERF-NOTES.md): compare rows of one run,
not rows of different runs. Each timing is the median of `--repeats` after a warm-up call.
The torch section needs PyTorch: `pip install -e '.[bench]'`. A quick check of the new sections
at small sizes: `--depth=8 --batch=8 --matmul_size=512 --episodes=1 --tbptt=2 --repeats=1
--devices=1,2 --scaling_episodes=2 --memory_tbptt= --memory_episodes=16`.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
SECTIONS = ("sgd", "probe", "meta", "memory", "torch", "flops", "scaling")
flags.DEFINE_list(
    "only",
    ["sgd", "probe", "meta", "torch", "flops", "scaling"],
    "Sections to run: sgd, probe, meta (rates, then the memory table), memory (the table alone), "
    "torch, flops, scaling.",
)
flags.DEFINE_integer("repeats", 5, "Timed repetitions per measurement (median reported).")
flags.DEFINE_integer("batch", 128, "torch, flops: batch of the ResNet-GN SGD step.")
flags.DEFINE_integer("depth", 32, "torch, flops: ResNet depth (6n+2) of that step.")
flags.DEFINE_integer("matmul_size", 2048, "flops: side of the float32 matmul giving the peak.")
flags.DEFINE_integer("episodes", 4, "flops: episodes in flight in the timed meta-window.")
flags.DEFINE_integer("tbptt", 5, "flops, scaling: T-BPTT steps of the meta-training window.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "scaling: simulated CPU device counts.")
flags.DEFINE_integer("scaling_episodes", 8, "scaling: episodes in flight (strong scaling).")
flags.DEFINE_string("scaling_preset", "smoke", "scaling: exp1 preset of the net (smoke, cpu).")
flags.DEFINE_bool("weak_scaling", True, "scaling: also 2 episodes per device (weak scaling).")
flags.DEFINE_list("memory_tbptt", ["2", "5", "9", "17"], "memory: T-BPTT rows (2 episodes).")
flags.DEFINE_list("memory_episodes", ["1", "2", "4", "8", "16"], "memory: episode rows (T-BPTT 5).")


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


_IMAGE_SHAPES = {"cpu": (28, 28, 1), "smoke": (16, 16, 1)}  # exp1's data: Fashion-MNIST, synthetic


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


def _teacher_step(trainer):
    """(step(net, (idx_a [Ba], idx_b [Bb])) -> (net, None), one episode's teacher net): the
    teacher's SGD step on A∪B, batches gathered from the trainer's device-resident tasks."""
    from l2r import training
    from l2r.methods import Batch

    inp = trainer.inputs

    def step(n, i):
        x_a, y_a = training.gather(inp.data_a, i[0])
        x_b, y_b = training.gather(inp.data_b, i[1])
        return trainer.teacher.step(n, Batch(x_b, y_b, x_a, y_a), None)[0], None

    return step, jax.tree.map(lambda a: a[0], trainer.init().episodes.teacher)


def _teacher_step_seconds(trainer, repeats, steps=10):
    step, net = _teacher_step(trainer)
    idx_a, idx_b = trainer.batches(0, steps)
    run = jax.jit(lambda net, ia, ib: jax.lax.scan(step, net, (ia, ib))[0])
    return median_seconds(lambda: run(net, idx_a[0], idx_b[0]), repeats) / steps


def bench_meta(repeats):
    """Meta-training on exp1:cpu's convnet: inner steps/s of both T-BPTT layouts against a teacher
    SGD step; episodes mapped vs vmapped. (`main` follows it with `bench_memory`.)"""
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


def _window_memory(preset, steps, overrides):
    """XLA's memory analysis of the compiled `steps`-step window of exp1:<preset>'s net."""
    _, _, trainer = _meta_setup(preset, overrides, _IMAGE_SHAPES[preset])
    state = trainer.init()
    idx_a, idx_b = trainer.batches(0, steps)
    window = trainer._window_fn(steps)
    return window.lower(state, trainer.inputs, idx_a, idx_b, jnp.float32(1e9)).compile()


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
        mem = _window_memory("smoke", steps, over).memory_analysis()
        print(
            f"| {steps} | {length} | {eps} | {mib(mem.temp_size_in_bytes):.2f} | "
            f"{mib(mem.argument_size_in_bytes):.2f} | {mib(mem.output_size_in_bytes):.2f} |"
        )
    print(
        "\nA call holds its arguments, its outputs and the temp block at once. (XLA:CPU's "
        "`peak_memory_in_bytes` comes out below the temp size alone, so it is not shown.)"
    )


# ----------------------------------------------------------------------------------------------
# l2r vs PyTorch eager


def torch_resnet_gn(depth=32, widths=(16, 32, 64), groups=8, num_classes=10, channels=3):
    """l2r's ResNet-GN backbone plus linear head (`l2r.models.resnet`), in PyTorch, NCHW.

    Layer for layer the same: a 3x3 stem conv + GN + relu; per stage n = (depth - 2) / 6 basic
    blocks (3x3 conv-GN-relu-3x3 conv-GN, plus the shortcut, then relu), the first block of
    every stage after the first with stride 2 and a 1x1 conv + GN projection shortcut
    (identity otherwise); global average pool; a linear head. Convs have no bias; GroupNorm
    has `groups` groups of contiguous channels and eps 1e-5, as in `l2r.models.convnet`.
    Padding is XLA's 'SAME' (`conv.same_padding`): a stride-2 3x3 conv of an even-sized input
    pads (0, 1), not PyTorch's usual (1, 1), so the two nets compute the same function.
    Module names follow l2r's param paths (`copy_to_torch`).

    Returns:
      The `torch.nn.Module`: [N, channels, H, W] float32 images -> [N, num_classes] logits.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    from l2r.models.conv import same_padding
    from l2r.models.resnet import check_depth

    class Conv(nn.Module):
        def __init__(self, cin, cout, kernel, stride):
            super().__init__()
            self.stride = stride
            self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            k = self.weight.shape[-1]
            (top, bottom), (left, right) = (same_padding(n, k, self.stride) for n in x.shape[2:])
            if top == bottom and left == right:  # Symmetric: padded inside the conv kernel.
                return F.conv2d(x, self.weight, stride=self.stride, padding=(top, left))
            return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, stride=self.stride)

    class Block(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            self.conv1, self.gn1 = Conv(cin, width, 3, stride), nn.GroupNorm(groups, width)
            self.conv2, self.gn2 = Conv(width, width, 3, 1), nn.GroupNorm(groups, width)
            self.project = stride != 1 or cin != width
            if self.project:
                self.shortcut_conv = Conv(cin, width, 1, stride)
                self.shortcut_gn = nn.GroupNorm(groups, width)

        def forward(self, x):
            y = F.relu(self.gn1(self.conv1(x)))
            y = self.gn2(self.conv2(y))
            if self.project:
                x = self.shortcut_gn(self.shortcut_conv(x))
            return F.relu(y + x)

    class ResNetGN(nn.Module):
        def __init__(self):
            super().__init__()
            n = check_depth(depth)
            self.stem_conv = Conv(channels, widths[0], 3, 1)
            self.stem_gn = nn.GroupNorm(groups, widths[0])
            self.blocks = nn.ModuleDict()
            cin = widths[0]
            for s, width in enumerate(widths, start=1):
                for b in range(n):
                    self.blocks[f"stage{s}_block{b}"] = Block(
                        cin, width, 2 if s > 1 and b == 0 else 1
                    )
                    cin = width
            self.head = nn.Linear(widths[-1], num_classes)

        def forward(self, x):
            h = F.relu(self.stem_gn(self.stem_conv(x)))
            for block in self.blocks.values():
                h = block(h)
            return self.head(h.mean(dim=(2, 3)))

    return ResNetGN()


def copy_to_torch(params, net) -> None:
    """Copies l2r's ResNet-GN params {'backbone', 'head'} into `torch_resnet_gn`'s `net`.

    Conv kernels HWIO -> OIHW, the head's kernel [D, K] -> weight [K, D]; GroupNorm scale and
    bias -> weight and bias. Every torch parameter must be written exactly once.

    Raises:
      ValueError: a parameter is missing on either side or has another shape.
    """
    import torch
    from flax import traverse_util

    names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    torch_params = dict(net.named_parameters())
    written = set()
    with torch.no_grad():
        for path, leaf in traverse_util.flatten_dict(params).items():
            value = np.asarray(leaf)
            if path[0] == "head":
                name = f"head.{names[path[-1]]}"
                value = value.T
            else:  # ("backbone", *layer, leaf): stem_conv, stage1_block0/conv1, ...
                layer = ".".join(path[1:-1])
                name = ("blocks." if path[1].startswith("stage") else "") + f"{layer}."
                name += names[path[-1]]
                if value.ndim == 4:
                    value = value.transpose(3, 2, 0, 1)
            if name not in torch_params or tuple(torch_params[name].shape) != value.shape:
                have = tuple(torch_params[name].shape) if name in torch_params else "no such"
                raise ValueError(f"l2r {'/'.join(path)} {value.shape} -> torch {name}: {have}.")
            torch_params[name].copy_(torch.from_numpy(np.array(value, np.float32)))
            written.add(name)
    if missing := sorted(set(torch_params) - written):
        raise ValueError(f"torch parameters with no l2r counterpart: {missing}.")


def num_params(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def jax_cores() -> int:
    """CPUs XLA:CPU's thread pool spans: those this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def bench_torch(depth, batch, repeats):
    """The same ResNet-GN SGD step (lr 0.1, cross-entropy) in l2r and in PyTorch eager."""
    title = f"ResNet-{depth}-GN SGD step, batch {batch}, 32x32x3"
    try:
        import torch
        from torch.nn import functional as F
    except ImportError:
        print(
            f"\n## {title}: l2r vs PyTorch — skipped, PyTorch is not installed: "
            "`pip install -e '.[bench]'`"
        )
        return
    params, x, y, step = sgd_problem(
        "resnet", dict(depth=depth, widths=(16, 32, 64)), batch, (32, 32, 3), 1
    )
    x, y = x[0], y[0]
    net = torch_resnet_gn(depth)
    copy_to_torch(params, net)  # Same weights, so both take the same steps.
    n_l2r, n_torch = num_params(params), sum(p.numel() for p in net.parameters())
    assert n_l2r == n_torch, f"parameters: l2r {n_l2r}, PyTorch {n_torch}"
    x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
    y_t = torch.from_numpy(np.asarray(y).astype(np.int64))

    def torch_step():
        loss = F.cross_entropy(net(x_t), y_t)
        net.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(p.grad, alpha=-0.1)
        return loss.detach()

    threads, cores = torch.get_num_threads(), jax_cores()
    torch.set_num_threads(cores)
    print(f"\n## {title}: l2r vs PyTorch {torch.__version__} eager (steps/s; higher is better)\n")
    print(
        f"Parameters: l2r {n_l2r:,}, PyTorch {n_torch:,}. PyTorch threads: "
        f"{torch.get_num_threads()} (the {cores} cores XLA:CPU uses).\n"
    )
    one = jax.jit(step)
    l2r_name = f"l2r: jitted step, XLA:CPU on {cores} cores (canonical convs, NHWC)"
    eager_name = f"PyTorch eager, {cores} threads (NCHW, oneDNN convs: the defaults)"
    rows = {l2r_name: median_seconds(lambda: one(params, (x, y))[0], repeats)}
    rows[eager_name] = median_seconds(torch_step, repeats)
    if cores > 1:
        torch.set_num_threads(1)
        rows["PyTorch eager, 1 thread"] = median_seconds(torch_step, repeats)
    torch.set_num_threads(threads)
    ref = rows[l2r_name]
    print("| implementation | ms/step | steps/s | time vs l2r |")
    print("|---|---|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {1e3 * sec:.1f} | {1 / sec:.2f} | {sec / ref:.2f}x |")
    print(f"\nPyTorch eager steps/s / l2r steps/s: {ref / rows[eager_name]:.2f}")
    if cores > 1:
        print(
            "\nPyTorch's OpenMP threads wait at barriers by spinning; when other processes hold "
            "the cores they can run many times slower than one thread (the last row). On a busy "
            "machine, compare the 1-thread row too."
        )


# ----------------------------------------------------------------------------------------------
# Achieved FLOP/s


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
    _, _, trainer = _meta_setup("cpu", over, _IMAGE_SHAPES["cpu"])
    teacher, net = _teacher_step(trainer)
    idx_a, idx_b = trainer.batches(0, 1)
    one = jax.jit(teacher).lower(net, (idx_a[0, 0], idx_b[0, 0])).compile()
    rows["teacher SGD step, exp1:cpu convnet, batch 64 A + 64 B (in a scan)"] = (
        xla_flops(one),
        _teacher_step_seconds(trainer, repeats),
    )

    # The window loops over episodes and steps, whose bodies XLA counts once: count a
    # 1-episode, 1-step window (loop-free) and scale by episodes x steps.
    _, _, single = _meta_setup("cpu", dict(over, num_episodes_parallel=1), _IMAGE_SHAPES["cpu"])
    ia, ib = single.batches(0, 1)
    lowered = single._window_fn(1).lower(single.init(), single.inputs, ia, ib, jnp.float32(1e9))
    name = f"meta-training window, exp1:cpu convnet, {episodes} episodes x {tbptt} steps"
    rows[name + ", one meta-update, second order"] = (
        episodes * tbptt * xla_flops(lowered.compile()),
        _window_seconds(trainer, tbptt, max(2, repeats // 2)),
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


# ----------------------------------------------------------------------------------------------
# Episodes over devices


_LAYOUTS = {
    "mapped": "one after another (the CPU default)",
    "vmapped": "vmapped",
    "sharded": "split over the devices, vmapped on each",
}


def scaling_worker(devices, episodes, preset, tbptt, weak, repeats):
    """One process of `bench_scaling` (the device count is fixed once JAX starts): times
    windows on `devices` simulated CPU devices and prints a JSON line per configuration."""
    from l2r import distributed

    distributed.simulated_cpu_devices(devices)  # Before anything starts a JAX backend.
    configs = [(episodes, None)]
    if devices == 1:  # What each device of a mesh runs: its episodes vmapped.
        configs.append((episodes, episodes))
    if weak and 2 * devices != episodes:
        configs.append((2 * devices, None))
    for e, chunk in configs:
        over = dict(num_episodes_parallel=e, update_every_step=False, episode_chunk=chunk or 0)
        _, _, trainer = _meta_setup(preset, over, _IMAGE_SHAPES[preset])
        layout = "sharded" if trainer.mesh is not None else "vmapped" if chunk else "mapped"
        sec = _window_seconds(trainer, tbptt, max(2, repeats // 2))
        line = dict(devices=jax.device_count(), episodes=e, layout=layout, seconds=sec)
        print(json.dumps(line), flush=True)


def scaling_tables(results, episodes, tbptt, weak):
    """Prints the strong- and weak-scaling tables of the workers' `results` (dicts)."""
    rate = lambda r: r["episodes"] * tbptt / r["seconds"]  # noqa: E731  episode-steps/s
    one = {r["episodes"]: r for r in results if r["devices"] == 1 and r["layout"] == "mapped"}
    print(f"Strong scaling: {episodes} episodes in flight.\n")
    print(
        "| devices: episodes | episodes | s/window | episode-steps/s | speed-up vs 1 device | "
        "efficiency |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["episodes"] == episodes:
            up = one[episodes]["seconds"] / r["seconds"]
            print(
                f"| {r['devices']}: {_LAYOUTS[r['layout']]} | {r['episodes']} | "
                f"{r['seconds']:.3f} | {rate(r):.1f} | {up:.2f}x | {100 * up / r['devices']:.0f}% |"
            )
    if not weak:
        return
    print("\nWeak scaling: 2 episodes per device; ideal: the time of 1 device at every count.\n")
    print(
        "| devices | episodes | s/window | episode-steps/s | throughput vs 1 device | efficiency |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["episodes"] == 2 * r["devices"] and r["layout"] != "vmapped":
            base = one[2]
            print(
                f"| {r['devices']} | {r['episodes']} | {r['seconds']:.3f} | {rate(r):.1f} | "
                f"{rate(r) / rate(base):.2f}x | {100 * base['seconds'] / r['seconds']:.0f}% |"
            )


def bench_scaling(device_counts, episodes, preset, tbptt, weak, repeats):
    """Meta-training windows with the episodes split over 1, 2, 4, 8 simulated CPU devices.

    exp1:smoke's net by default: each device count is a fresh process that compiles its windows
    (2-3 per process), which keeps the section to minutes on 2 cores; the cpu net takes ~4x
    longer to compile.
    """
    if 1 not in device_counts or any(episodes % n for n in device_counts):
        raise ValueError(
            f"--devices must include 1 and divide --scaling_episodes={episodes}; got "
            f"{device_counts}."
        )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    xla_flags = env.get("XLA_FLAGS", "").split()  # The workers set their own device count.
    env["XLA_FLAGS"] = " ".join(f for f in xla_flags if "force_host_platform_device" not in f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for n in device_counts:
        args = (
            f"--devices={n} --scaling_episodes={episodes} --scaling_preset={preset} "
            f"--tbptt={tbptt} --repeats={repeats} --{'' if weak else 'no'}weak_scaling"
        )
        cmd = [sys.executable, "-m", "experiments.bench", "--only=_scaling_worker", *args.split()]
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        results += [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]

    cores = os.cpu_count()
    print(
        f"\n## Meta-training throughput on {', '.join(map(str, device_counts))} simulated CPU "
        f"devices, exp1:{preset} net, T-BPTT {tbptt}, one meta-update per window\n"
    )
    scaling_tables(results, episodes, tbptt, weak)
    print(
        f"\nThe simulated devices share this machine's {cores} CPU cores (os.cpu_count()), "
        "which one device already keeps busy (XLA:CPU's intra-op thread pool): simulated "
        "devices add no compute, so the ideal here is 1.00x at every count, and these figures "
        "measure the cost of partitioning (per-device programs competing for the same cores, "
        "the all-reduce of the meta-gradient). A mesh vmaps each device's episodes, which "
        "is slower per episode on CPU than one after another (grouped convs, see the meta "
        "section); the 'vmapped' row is that layout on one device. Real scaling needs real "
        "devices (GPUs, TPU cores)."
    )


def main(argv):
    del argv
    if unknown := set(FLAGS.only) - set(SECTIONS) - {"_scaling_worker"}:
        raise app.UsageError(f"Unknown --only {sorted(unknown)}; sections: {', '.join(SECTIONS)}.")
    if "_scaling_worker" in FLAGS.only:  # A process of the scaling section; no JAX before this.
        (devices,) = FLAGS.devices
        scaling_worker(
            int(devices),
            FLAGS.scaling_episodes,
            FLAGS.scaling_preset,
            FLAGS.tbptt,
            FLAGS.weak_scaling,
            FLAGS.repeats,
        )
        return
    print(f"# l2r benchmarks — {time.strftime('%Y-%m-%d')} — {machine()}")
    if "sgd" in FLAGS.only:
        bench_sgd(FLAGS.repeats)
    if "probe" in FLAGS.only:
        bench_probe(FLAGS.repeats)
    if "meta" in FLAGS.only:
        bench_meta(FLAGS.repeats)
    if "meta" in FLAGS.only or "memory" in FLAGS.only:
        bench_memory([int(s) for s in FLAGS.memory_tbptt], [int(e) for e in FLAGS.memory_episodes])
    if "torch" in FLAGS.only:
        bench_torch(FLAGS.depth, FLAGS.batch, FLAGS.repeats)
    if "flops" in FLAGS.only:
        bench_flops(
            FLAGS.depth, FLAGS.batch, FLAGS.matmul_size, FLAGS.episodes, FLAGS.tbptt, FLAGS.repeats
        )
    if "scaling" in FLAGS.only:
        bench_scaling(
            [int(n) for n in FLAGS.devices],
            FLAGS.scaling_episodes,
            FLAGS.scaling_preset,
            FLAGS.tbptt,
            FLAGS.weak_scaling,
            FLAGS.repeats,
        )


if __name__ == "__main__":
    app.run(main)
