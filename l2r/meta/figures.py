"""Figs. 6 and 7 of a meta-trained rule: its curriculum, and its gates δ per layer at meta-test."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from l2r import compare, plots, rng, training
from l2r.data import stream
from l2r.methods.learned import Rule, student_step


def delta_histograms(model, rule: Rule, network, data_b, idx_b, num_steps):
    """δ of every backbone leaf of `rule` over the first `num_steps` steps on `data_b` of one
    seed's `network` (Fig. 7)."""

    @jax.jit
    def collect(network, idx):
        def body(carry, ib):
            net, mem = carry
            x_b, y_b = training.gather(data_b, ib)
            net, mem, _, deltas = student_step(model, rule.ml, rule.theta, rule.learning_rate,
                                               net, mem, x_b, y_b)  # fmt: skip
            return (net, mem), deltas

        return jax.lax.scan(body, (network, rule.ml.start(network["backbone"])), idx)[1]

    deltas = jax.device_get(collect(network, idx_b[:num_steps]))
    flat = jax.tree_util.tree_flatten_with_path(deltas)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(v).ravel() for path, v in flat}


def plot_meta(history, deltas, workdir) -> list[str]:
    """Fig. 6 (threshold and T-BPTT steps against episodes) and Fig. 7 (δ per layer), each a
    PNG with its PDF (`plots.save_figure`); returns the PNGs' paths."""
    paths = []
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(history["episodes_done"], history["threshold"], "C0", label="loss threshold")
    ax.set(xlabel="meta-training episodes", ylabel="loss threshold",
           title="Fig. 6: meta-training curriculum")  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot(history["episodes_done"], history["tbptt"], "C1--", label="T-BPTT steps")
    ax2.set(ylabel="T-BPTT steps")
    ax2.set_ylim(bottom=0)  # From 0, so a constant length still gets whole-number ticks.
    for axis in (ax.xaxis, ax2.yaxis):  # Episodes and truncation lengths are whole numbers.
        plots.integer_ticks(axis)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    paths.append(plots.save_figure(fig, os.path.join(workdir, "fig6_curriculum.png")))
    fig = Figure(figsize=(7, 0.35 * len(deltas) + 1.5))
    ax = fig.add_subplot()
    names = list(deltas)
    ax.boxplot([deltas[n] for n in names], vert=False, showfliers=False)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=6)
    ax.axvline(1.0, color="k", lw=0.5, ls=":")
    ax.axvline(0.0, color="r", lw=0.5)
    ax.set(xlabel="δ (1 = SGD; < 0 = gradient ascent)", title="Fig. 7: gates at meta-test")
    paths.append(plots.save_figure(fig, os.path.join(workdir, "fig7_delta.png")))
    return paths


def meta_figures(config, model, rule: Rule, history, task, num_classes, test_nets, mean, std,
                 workdir, steps: int) -> list[str]:  # fmt: skip
    """Figs. 6 and 7 of a meta-trained rule: its curriculum, and its gates over the first
    `steps` (at most 100) steps on `task` from the first meta-test network, whose later
    tasks have `num_classes` classes."""
    net0 = compare.initial_networks(config, test_nets, num_classes, model.representation_dim)
    net0 = jax.tree.map(lambda a: jnp.asarray(a[0]), net0)
    data_b2 = training.to_device(task, mean, std)
    idx = np.asarray(
        stream.index_stream(
            len(task.train.labels),
            config.task_b.batch_size,
            min(steps, 100),
            rng.seed_for(config.seed, "fig7"),
        )  # fmt: skip
    )
    deltas = delta_histograms(model, rule, net0, data_b2, idx, len(idx))
    return plot_meta(history, deltas, workdir)
