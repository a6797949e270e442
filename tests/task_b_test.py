"""The Task-B runner: a scanned chunk over mapped seeds equals a Python loop of steps; two tasks in
turn (Exp 5) equal a two-phase Python-loop reference for LwF and EWC; the cache and its keys."""

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r import histories, keys, models, task_b, training
from l2r.configs import fig1
from l2r.data import sources, tasks
from l2r.methods import Batch, make_method, registry
from l2r.models import registry as model_registry

TASK_B = fig1.get_config("smoke").task_b


@pytest.fixture(scope="module")
def setup():
    config = fig1.get_config("smoke")
    config.num_seeds = 2
    dataset = sources.load("synthetic", **config.data.synthetic.to_dict())
    t_a, t_b = tasks.split_task(dataset, config.data.classes_a, config.data.classes_b)
    mean, std = tasks.normalization_stats(dataset.train)
    model = model_registry.from_config(config.model)
    data_a = training.to_device(t_a, mean, std)
    data_b = training.to_device(t_b, mean, std)
    key = jax.random.key(0)
    shape = (1, *t_a.train.images.shape[1:])
    networks = jax.vmap(
        lambda k: {
            "backbone": model.init(k, shape),
            "head_a": models.init_head(jax.random.fold_in(k, 1), model.representation_dim, 3),
            "head_b": models.init_head(jax.random.fold_in(k, 2), model.representation_dim, 3),
        }
    )(jax.random.split(key, config.num_seeds))
    streams = task_b.make_streams(
        config, len(t_b.train.labels), len(t_a.train.labels), config.num_seeds
    )
    return config, model, data_a, data_b, networks, streams


@pytest.mark.parametrize("name", ["sgd", "teacher"])
def test_scan_equals_python_loop(setup, name):
    config, model, data_a, data_b, networks, streams = setup
    method = make_method(name, model, TASK_B)
    steps = 6
    keys = jnp.stack([jax.random.split(jax.random.key(s), steps) for s in range(2)])
    advance = task_b.make_advance(method)
    idx_a = streams.idx_a[:, :steps] if method.uses_task_a else None
    xs = (keys, streams.idx_b[:, :steps], idx_a, None, None)
    scanned, metrics = advance(networks, xs, data_a=data_a, data_b=data_b)

    step = jax.jit(method.step)
    for s in range(2):
        state = jax.tree.map(lambda a, s=s: a[s], networks)
        losses = []
        for t in range(steps):
            x_b, y_b = training.gather(data_b, streams.idx_b[s, t])
            x_a = y_a = None
            if method.uses_task_a:
                x_a, y_a = training.gather(data_a, streams.idx_a[s, t])
            state, m = step(state, Batch(x_b, y_b, x_a, y_a), keys[s, t])
            losses.append(m["loss"])
        chex.assert_trees_all_close(
            state, jax.tree.map(lambda a, s=s: a[s], scanned), rtol=2e-5, atol=2e-6
        )
        np.testing.assert_allclose(np.mean(losses), metrics["loss"][s], rtol=1e-5)


def test_sgd_never_touches_the_task_a_head(setup):
    config, model, data_a, data_b, networks, streams = setup
    method = make_method("sgd", model, TASK_B)
    keys = jnp.stack([jax.random.split(jax.random.key(s), 3) for s in range(2)])
    xs = (keys, streams.idx_b[:, :3], None, None, None)
    out, _ = task_b.make_advance(method)(networks, xs, data_a=data_a, data_b=data_b)
    chex.assert_trees_all_equal(out["head_a"], networks["head_a"])
    assert not np.allclose(out["head_b"]["kernel"], networks["head_b"]["kernel"])


def test_streams_are_deterministic_and_differ_across_seeds(setup):
    config, _, data_a, data_b, _, streams = setup
    again = task_b.make_streams(
        config, data_b.train_labels.shape[0], data_a.train_labels.shape[0], config.num_seeds
    )
    np.testing.assert_array_equal(streams.idx_b, again.idx_b)
    np.testing.assert_array_equal(streams.idx_a, again.idx_a)
    assert streams.idx_b.shape == (2, config.task_b.steps, config.task_b.batch_size)
    assert not np.array_equal(streams.idx_b[0], streams.idx_b[1])


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_map_seeds_equals_vmap(setup, chunk):
    """lax.map (CPU default), chunked lax.map and vmap give the same runs."""
    config, model, data_a, data_b, networks, streams = setup
    method = make_method("sgd", model, TASK_B)
    x_b, y_b = training.gather(data_b, streams.idx_b[0, 0])

    def one(network):
        state, metrics = method.step(network, Batch(x_b, y_b), None)
        return state, metrics["loss"]

    four = jax.tree.map(lambda a: jnp.concatenate([a, 2 * a]), networks)  # S = 4 runs
    reference = jax.jit(jax.vmap(one))(four)
    mapped = jax.jit(lambda n: training.map_seeds(one, n, chunk=chunk))(four)
    chex.assert_trees_all_close(mapped, reference, rtol=1e-5, atol=1e-6)
    # None entries (a method without Task-A data) pass through.
    out = training.map_seeds(lambda n, none: n["head_b"]["bias"], four, None, chunk=chunk)
    chex.assert_trees_all_equal(out, four["head_b"]["bias"])


def test_kernel_scaled_sgd_slows_only_the_kernels(setup):
    """sgd_kernels_x<k>: conv/dense kernels step k·lr, GroupNorm/bias leaves and head B step lr."""
    _, model, _, data_b, networks, streams = setup
    network = jax.tree.map(lambda a: a[0], networks)
    batch = Batch(*training.gather(data_b, streams.idx_b[0, 0]))
    full, _ = make_method("sgd", model, TASK_B).step(network, batch, None)
    slow, _ = make_method("sgd_kernels_x0.25", model, TASK_B).step(network, batch, None)
    flat = lambda t: jax.tree_util.tree_leaves_with_path(t)  # noqa: E731
    for (path, w0), (_, w1), (_, w2) in zip(flat(network), flat(full), flat(slow), strict=True):
        name = jax.tree_util.keystr(path)
        if "backbone" in name and w0.ndim > 1:
            np.testing.assert_allclose(w2 - w0, 0.25 * (w1 - w0), rtol=1e-4, atol=1e-7)
        else:
            np.testing.assert_array_equal(w2, w1)


def test_saved_histories_round_trip_and_a_killed_save_leaves_no_file(tmp_path, monkeypatch):
    history = {"readout_A": np.arange(6, dtype=np.float32).reshape(2, 3), "loss": np.ones((2, 3))}
    path = str(tmp_path / "task_b" / "sgd-key.npz")
    assert histories.load_history(path) is None and histories.load_history(None) is None

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a run stopped while saving

    with monkeypatch.context() as m:
        m.setattr(np, "savez", killed)
        with pytest.raises(KeyboardInterrupt):
            histories.save_history(path, history, 3.0, 1.0)
    assert histories.load_history(path) is None  # only the temporary file was written
    histories.save_history(path, history, 3.0, 1.0)
    again, train_s, probe_s, layers = histories.load_history(path)
    assert (train_s, probe_s) == (3.0, 1.0)
    chex.assert_trees_all_equal(again, history)
    assert layers == {}  # saved without per-layer CKA
    histories.save_history(None, history, 3.0, 1.0)  # no cache directory: nothing written


# ---------------------------------------------------------------------------------------------
# Two tasks in turn (Exp 5): the runner against a two-phase Python-loop reference.

LR, COEF, T = 0.1, 0.7, 2.0


@pytest.fixture(scope="module")
def sequence():
    """Task 1 (3 classes, the pre-training task), then Task 2 and Task 3 (2 classes each)."""
    config = fig1.get_config("smoke")
    config.num_seeds = 1
    config.task_b.probe_every = 2
    del config.task_b.steps
    config.task_b.steps_2 = config.task_b.steps_3 = 4
    config.task_b.batch_size = config.task_b.teacher_batch_a = 8
    dataset = sources.load("synthetic", num_classes=7, image_size=8, channels=1,
                           train_per_class=12, test_per_class=4)  # fmt: skip
    t1, t2, t3 = (tasks.make_task(dataset, c, n) for c, n in
                  (((0, 1, 2), "1"), ((3, 4), "2"), ((5, 6), "3")))  # fmt: skip
    mean, std = tasks.normalization_stats(dataset.train)
    model = models.make_model("convnet", widths=(4, 4), groups=2)
    key = jax.random.key(3)
    d = model.representation_dim
    network = {
        "backbone": model.init(key, (1, 8, 8, 1)),
        "head_a": models.init_head(jax.random.fold_in(key, 1), d, 3),
        "head_b": models.init_head(jax.random.fold_in(key, 2), d, 2),
        "head_c": models.init_head(jax.random.fold_in(key, 3), d, 2),
    }
    dev = lambda t: training.to_device(t, mean, std)  # noqa: E731
    data = [dev(t) for t in (t1, t2, t3)]
    n = [len(t.train.labels) for t in (t1, t2, t3)]
    streams = [task_b.sequence_streams(config, n[1], n[:1], 4, 2),
               task_b.sequence_streams(config, n[2], n[:2], 4, 3)]  # fmt: skip
    return config, model, network, data, dev(tasks.union(t1, t2)), streams


def run_sequence(sequence, methods):
    """The runner's networks after each of the 4 chunks (2 per task), by a recording probe."""
    config, model, network, data, data_12, streams = sequence
    seen = []

    def probe_fn(networks, sets, ref_rep=None, represent=None):
        seen.append(jax.tree.map(lambda a: np.asarray(a[0]), networks))
        return {"readout_1": np.zeros(1)}, None

    phases = [task_b.Phase(methods[0], data[0], data[1], streams[0]),
              task_b.Phase(methods[1], data_12, data[2], streams[1])]  # fmt: skip
    nets0 = jax.tree.map(lambda a: a[None], network)
    task_b.run_phases(phases, nets0, config, probe_fn, None, ({"readout_1": np.zeros(1)}, None))
    return seen


def ce(model, net, head, x, y):
    logits = models.apply_head(net[head], model.apply(net["backbone"], x).representation)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def kl(model, old, net, head, x):
    """T² · mean KL(softmax(old head / T) ‖ softmax(head / T)) on x."""
    z_old = models.apply_head(old[head], model.apply(old["backbone"], x).representation) / T
    z = models.apply_head(net[head], model.apply(net["backbone"], x).representation) / T
    p_old = jax.nn.softmax(z_old)
    return T**2 * jnp.mean(jnp.sum(p_old * (jnp.log(p_old) - jax.nn.log_softmax(z)), axis=1))


def sgd_step(loss, net, state, head, x, y, names):
    sub = {k: net[k] for k in names}
    grads = jax.grad(lambda sub: loss({**net, **sub}, state, head, x, y))(sub)
    return {**net, **jax.tree.map(lambda p, g: p - LR * g, sub, grads)}


def reference_loop(sequence, loss, trained, switch):
    """Plain SGD, step by step: `loss(net, anchor_state, head, x, y)` on Task 2 (head_b), then
    `switch` and the same on Task 3 (head_c); `trained(head)`: the entries that learn."""
    config, model, network, data, _, streams = sequence
    net, state = network, switch(None, network, None)
    for phase, head in ((0, "head_b"), (1, "head_c")):
        if phase == 1:
            state = switch(state, net, data[1])
        for t in range(4):
            x, y = training.gather(data[phase + 1], streams[phase].idx_b[0, t])
            net = sgd_step(loss, net, state, head, x, y, trained(head))
    return net


def test_lwf_on_two_tasks_equals_a_python_loop(sequence):
    config, model = sequence[:2]
    config.task_b.lwf.coef, config.task_b.lwf.temperature = COEF, T
    methods = registry.build_sequence("lwf", model, config.task_b, 2)
    got = run_sequence(sequence, methods)[-1]

    def loss(net, old, head, x, y):  # distil every earlier head towards the frozen copy
        earlier = ("head_a",) if head == "head_b" else ("head_a", "head_b")
        return ce(model, net, head, x, y) + COEF * sum(kl(model, old, net, h, x) for h in earlier)

    expected = reference_loop(
        sequence, loss,
        trained=lambda head: ("backbone", "head_a", "head_b") + (("head_c",) if head == "head_c"
                                                                 else ()),
        switch=lambda old, net, data_done: net,  # the network as it is when the task ends
    )  # fmt: skip
    chex.assert_trees_all_close(got, expected, rtol=2e-4, atol=2e-5)
    # Task 3 moved head_c and the distilled Task-2 head; Task 2 never touched head_c.
    first = run_sequence(sequence, methods)[1]
    chex.assert_trees_all_equal(first["head_c"], sequence[2]["head_c"])


def test_ewc_on_two_tasks_equals_a_python_loop(sequence):
    config, model, network, data = sequence[:4]
    n_max = max(int(d.train_labels.shape[0]) for d in data)
    config.task_b.ewc.coef, config.task_b.ewc.fisher_examples = 50.0, n_max  # every example
    methods = registry.build_sequence("ewc", model, config.task_b, 2)
    got = run_sequence(sequence, methods)[-1]

    def fisher(net, head, d):
        """Mean over all training examples of the squared per-example gradient, one by one."""
        total = jax.tree.map(jnp.zeros_like, net["backbone"])
        n = int(d.train_labels.shape[0])
        grad = jax.jit(lambda b, x, y: jax.grad(
            lambda b: ce(model, {**net, "backbone": b}, head, x, y))(b))  # fmt: skip
        for i in range(n):
            x, y = training.gather(d, jnp.array([i]))
            total = jax.tree.map(lambda t, gi: t + gi**2, total, grad(net["backbone"], x, y))
        return jax.tree.map(lambda t: t / n, total)

    def switch(state, net, data_done):
        if state is None:  # before Task 2: Task 1's Fisher at the pre-trained weights
            return net["backbone"], fisher(net, "head_a", data[0])
        anchor, f = state
        f2 = fisher(net, "head_b", data_done)  # Task 2's, at the weights Task 2 ended with
        return net["backbone"], jax.tree.map(jnp.add, f, f2)

    def loss(net, state, head, x, y):
        anchor, f = state
        leaves = zip(*map(jax.tree.leaves, (net["backbone"], anchor, f)), strict=True)
        pen = sum(jnp.sum(fi * (w - a) ** 2) for w, a, fi in leaves)
        return ce(model, net, head, x, y) + 0.5 * 50.0 * pen

    expected = reference_loop(sequence, loss, trained=lambda head: ("backbone", head),
                              switch=switch)  # fmt: skip
    chex.assert_trees_all_close(got, expected, rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_equal(got["head_a"], network["head_a"])  # never trained


# ---------------------------------------------------------------------------------------------
# Cache keys: exactly the code a method's runs execute.


def test_an_added_method_file_changes_no_cache_key(tmp_path, monkeypatch):
    config = fig1.get_config("smoke")
    model = models.make_model("convnet", widths=(4,), groups=2)
    names = ("sgd", "sgd_x0.1", "teacher", "lwf", "ewc", "hat")
    methods = [[make_method(n, model, config.task_b)] for n in names]
    start = {"w": np.zeros(3, np.float32)}
    before = [histories.history_key(config, m, start, "data") for m in methods]
    # A copy of the package with one more method file, and one with sgd.py edited.
    root = tmp_path / "l2r"
    shutil.copytree(keys._ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(keys, "_ROOT", root)
    keys._closure.cache_clear()
    (root / "methods" / "mine.py").write_text("from l2r.methods import base\n\nX = 1\n")
    assert [histories.history_key(config, m, start, "data") for m in methods] == before
    with open(root / "methods" / "sgd.py", "a") as f:
        f.write("\n# an edit\n")
    keys._closure.cache_clear()
    after = [histories.history_key(config, m, start, "data") for m in methods]
    changed = {n for n, b, a in zip(names, before, after, strict=True) if a != b}
    assert changed == {"sgd", "sgd_x0.1", "teacher"}  # the methods defined in sgd.py
    keys._closure.cache_clear()
