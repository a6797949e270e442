"""EWC and LwF: Fisher and distillation against brute force, finite differences, equivalences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r import models, task_b, training
from l2r.methods import Batch, ewc, lwf, make_sgd

LR = 0.1
NUM_A, NUM_B = 3, 2


def cast(tree, dtype):
    return jax.tree.map(lambda v: jnp.asarray(v, dtype), tree)


def perturb(tree, seed, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [
        scale * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, [v + n for v, n in zip(leaves, noise, strict=True)])


@pytest.fixture(scope="module")
def tiny():
    """A 1-conv + dense net, a 10-example 3-class Task A on the device and a Task-B batch."""
    model = models.make_model("convnet", widths=(4,), groups=2, hidden=4)
    k = jax.random.split(jax.random.key(0), 6)
    shape = (6, 6, 1)
    network = {
        "backbone": model.init(k[0], (1, *shape)),
        "head_a": models.init_head(k[1], model.representation_dim, NUM_A),
        "head_b": models.init_head(k[2], model.representation_dim, NUM_B),
    }
    # Make the Task-A head confident enough that softmax samples differ from uniform.
    network["head_a"]["kernel"] = 3.0 * network["head_a"]["kernel"]
    images = jax.random.randint(k[3], (10, *shape), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(k[4], (10,), 0, NUM_A)
    data_a = training.DeviceTask(
        images, labels, images[:4], labels[:4], jnp.full((1,), 0.5), jnp.full((1,), 0.25)
    )
    x_b = jax.random.normal(k[5], (4, *shape))
    batch = Batch(x_b, jnp.array([0, 1, 1, 0], jnp.int32))
    return model, network, data_a, batch


def run_steps(method, network, data_a, batches):
    key = jax.random.key(7)
    state = jax.jit(method.init)(network, data_a, key)
    step = jax.jit(method.step)
    for t, batch in enumerate(batches):
        state, _ = step(state, batch, jax.random.fold_in(key, t))
    return state


def three_batches(batch):
    return [batch._replace(x_b=batch.x_b * (1 + 0.5 * t)) for t in range(3)]


def task_fisher(model, network, data_a, key, kind, num_examples, chunk=None):
    """`ewc.task_fisher` compiled as one program (eagerly it dispatches op by op)."""
    fn = lambda n, d, k: ewc.task_fisher(model, n, d, k, kind, num_examples, chunk)
    return jax.jit(fn)(network, data_a, key)


# ---------------------------------------------------------------------------- LwF


def test_lwf_distillation_is_zero_at_the_old_network(tiny):
    model, network, data_a, batch = tiny
    method = lwf.make_lwf(model, LR, coef=1.0, temperature=2.0)
    state = method.init(network, data_a, None)
    _, metrics = jax.jit(method.step)(state, batch, None)
    assert float(metrics["distill"]) == 0.0
    # The KL is at its minimum there: its gradient vanishes too.
    distill = lambda n: lwf.objective(
        model, n, state.old_backbone, state.old_heads, batch, 1.0, 2.0
    )[1][1]
    grads = jax.jit(jax.grad(distill))(network)
    chex.assert_trees_all_close(grads, jax.tree.map(jnp.zeros_like, grads), atol=1e-6)


def test_lwf_distillation_formula():
    old = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    new = jnp.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    t = 3.0
    p, q = jax.nn.softmax(old / t), jax.nn.softmax(new / t)
    expected = t**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))
    np.testing.assert_allclose(lwf.distillation(old, new, t), expected, rtol=1e-6)
    # Same gradient as Li & Hoiem's cross-entropy with the soft targets (times T²).
    ce = lambda z: t**2 * jnp.mean(-jnp.sum(p * jax.nn.log_softmax(z / t), axis=-1))
    chex.assert_trees_all_close(
        jax.grad(lambda z: lwf.distillation(old, z, t))(new), jax.grad(ce)(new), atol=1e-6
    )


def test_lwf_gradient_matches_finite_differences(tiny):
    model, network, data_a, batch = tiny
    with jax.enable_x64(True):
        old = cast(network, jnp.float64)
        net = perturb(old, 1, 0.3)  # Away from the old network, so the KL is not flat.
        b64 = Batch(jnp.asarray(batch.x_b, jnp.float64), batch.y_b)
        heads = {"head_a": old["head_a"]}
        f = lambda n: lwf.objective(model, n, old["backbone"], heads, b64, 0.7, 2.0)[0]
        grads = jax.jit(jax.grad(f))(net)
        v = perturb(jax.tree.map(jnp.zeros_like, net), 2, 1.0)
        analytic = sum(
            jnp.vdot(g, d) for g, d in zip(*map(jax.tree.leaves, (grads, v)), strict=True)
        )
        eps = 1e-6
        shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, net, v)
        numeric = (jax.jit(f)(shift(1.0)) - jax.jit(f)(shift(-1.0))) / (2 * eps)
        assert abs(float(analytic)) > 1e-3
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)
        # The distillation term alone has a non-zero gradient into the Task-A head.
        d = lambda n: lwf.objective(model, n, old["backbone"], heads, b64, 1.0, 2.0)[1][1]
        assert float(jnp.abs(jax.jit(jax.grad(d))(net)["head_a"]["kernel"]).max()) > 1e-4
        # A step is plain SGD on the objective, over all three parts of the network.
        method = lwf.make_lwf(model, LR, coef=0.7, temperature=2.0)
        state = lwf.LwfState(net, old["backbone"], {"head_a": old["head_a"]})
        stepped, _ = jax.jit(method.step)(state, b64, None)
        expected = jax.tree.map(lambda p, g: p - LR * g, net, grads)
        chex.assert_trees_all_close(stepped.network, expected, rtol=1e-12, atol=1e-12)


def test_lwf_with_zero_coef_is_sgd(tiny):
    model, network, data_a, batch = tiny
    batches = three_batches(batch)
    sgd = run_steps(make_sgd(model, LR), network, data_a, batches)
    state = run_steps(lwf.make_lwf(model, LR, coef=0.0, temperature=2.0), network, data_a, batches)
    chex.assert_trees_all_close(state.network, sgd, rtol=1e-6, atol=1e-7)


def test_lwf_trains_head_a_keeps_the_old_copy_and_is_deterministic(tiny):
    model, network, data_a, batch = tiny
    method = lwf.make_lwf(model, LR, coef=1.0, temperature=2.0)
    batches = three_batches(batch)
    state = run_steps(method, network, data_a, batches)
    assert not np.allclose(state.network["head_a"]["kernel"], network["head_a"]["kernel"])
    chex.assert_trees_all_equal(state.old_backbone, network["backbone"])
    chex.assert_trees_all_equal(state.old_heads, {"head_a": network["head_a"]})
    chex.assert_trees_all_equal(run_steps(method, network, data_a, batches), state)
    with pytest.raises(ValueError, match="temperature"):
        lwf.make_lwf(model, LR, coef=1.0, temperature=0.0)


# ---------------------------------------------------------------------------- EWC


def brute_force_fisher(model, network, x, y):
    """Python loop: mean over examples of the squared gradient of that example's loss."""

    @jax.jit
    def grad(xi, yi):
        return jax.grad(
            lambda b: training.cross_entropy(
                models.apply_head(network["head_a"], model.apply(b, xi).representation), yi
            )
        )(network["backbone"])

    total = None
    for i in range(x.shape[0]):
        sq = jax.tree.map(jnp.square, grad(x[i : i + 1], y[i : i + 1]))
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
    return jax.tree.map(lambda t: t / x.shape[0], total)


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_empirical_fisher_equals_python_loop(tiny, chunk):
    model, network, data_a, _ = tiny
    fisher, idx, y = task_fisher(model, network, data_a, jax.random.key(3), "empirical", 7, chunk)
    assert idx.shape == (7,) and len(set(np.asarray(idx).tolist())) == 7  # No repeats.
    np.testing.assert_array_equal(y, data_a.train_labels[idx])
    x, _ = training.gather(data_a, idx)
    expected = brute_force_fisher(model, network, x, y)
    chex.assert_trees_all_close(fisher, expected, rtol=1e-5, atol=1e-9)
    # Not the square of the mean gradient (which is what a batch gradient would give).
    batch_loss = lambda b: training.cross_entropy(
        models.apply_head(network["head_a"], model.apply(b, x).representation), y
    )
    mean_grad = jax.jit(jax.grad(batch_loss))(network["backbone"])
    assert float(jnp.sum(fisher["conv0"]["kernel"])) > 1.5 * float(
        jnp.sum(mean_grad["conv0"]["kernel"] ** 2)
    )


def test_true_fisher_uses_labels_sampled_from_the_model(tiny):
    model, network, data_a, _ = tiny
    key = jax.random.key(5)
    fisher, idx, y = task_fisher(model, network, data_a, key, "true", 10)
    emp, idx_emp, _ = task_fisher(model, network, data_a, key, "empirical", 10)
    np.testing.assert_array_equal(idx, idx_emp)  # Same examples, different labels.
    assert not np.array_equal(y, data_a.train_labels[idx])
    x, _ = training.gather(data_a, idx)
    chex.assert_trees_all_close(fisher, brute_force_fisher(model, network, x, y), rtol=1e-5)
    assert not np.allclose(fisher["conv0"]["kernel"], emp["conv0"]["kernel"])


def test_true_fisher_is_unbiased(tiny):
    """Averaged over many keys, the sampled-label Fisher is E_x Σ_y p(y|x) g(x, y)²."""
    model, network, data_a, _ = tiny
    x, _ = training.gather(data_a, jnp.arange(10))
    logits = models.apply_head(
        network["head_a"], model.apply(network["backbone"], x).representation
    )
    p_NK = jax.nn.softmax(logits)
    assert float(p_NK.max()) > 0.6  # Not uniform: sampling matters.
    # exact = mean_n Σ_k p[n, k] g(x_n, k)², from every (example, label) pair's squared grad.
    one = lambda xn, k: ewc.diagonal_fisher(
        model, network["backbone"], network["head_a"], xn[None], k[None]
    )
    sq_NK = jax.vmap(jax.vmap(one, (None, 0)), (0, None))(x, jnp.arange(NUM_A))
    exact = jax.tree.map(lambda g: jnp.einsum("nk,nk...->...", p_NK, g) / 10, sq_NK)
    keys = jax.random.split(jax.random.key(11), 2000)
    sampled = jax.jit(
        jax.vmap(lambda k: ewc.task_fisher(model, network, data_a, k, "true", 10, chunk=10)[0])
    )(keys)
    mc = jax.tree.map(lambda f: f.mean(0), sampled)
    emp = task_fisher(model, network, data_a, keys[0], "empirical", 10)[0]
    flat = lambda t: jnp.concatenate([v.ravel() for v in jax.tree.leaves(t)])
    err = lambda t: float(jnp.linalg.norm(flat(t) - flat(exact)) / jnp.linalg.norm(flat(exact)))
    assert err(mc) < 0.05, err(mc)
    assert err(emp) > 4 * err(mc), (err(emp), err(mc))


def test_penalty_value_gradient_and_zero_at_the_anchor():
    anchor = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array([[0.0, -1.0]])}}
    fisher = {"a": jnp.array([0.5, 2.0]), "b": {"c": jnp.array([[3.0, 0.0]])}}
    w = {"a": jnp.array([2.0, 2.0]), "b": {"c": jnp.array([[1.0, 5.0]])}}
    assert float(ewc.penalty(anchor, anchor, fisher, 1.0)) == 0.0
    # (4 / 2) * (0.5 * 1² + 2 * 0² + 3 * 1² + 0 * 6²) = 7.
    np.testing.assert_allclose(ewc.penalty(w, anchor, fisher, 4.0), 7.0)
    grad = jax.grad(ewc.penalty)(w, anchor, fisher, 4.0)
    expected = jax.tree.map(lambda p, a, f: 4.0 * f * (p - a), w, anchor, fisher)
    chex.assert_trees_all_close(grad, expected)


def test_ewc_is_sgd_at_zero_coef_and_on_its_first_step(tiny):
    model, network, data_a, batch = tiny
    batches = three_batches(batch)
    sgd = run_steps(make_sgd(model, LR), network, data_a, batches)
    zero = run_steps(ewc.make_ewc(model, LR, 0.0, fisher_examples=8), network, data_a, batches)
    chex.assert_trees_all_close(zero.network, sgd, rtol=1e-6, atol=1e-7)
    # The first step starts at the anchor, where the penalty's gradient is 0: SGD at any coef.
    one = run_steps(ewc.make_ewc(model, LR, 1e4, fisher_examples=8), network, data_a, batches[:1])
    sgd_one = run_steps(make_sgd(model, LR), network, data_a, batches[:1])
    chex.assert_trees_all_close(one.network, sgd_one, rtol=1e-6, atol=1e-7)


def test_ewc_step_is_sgd_on_the_penalised_loss_and_holds_the_anchor(tiny):
    model, network, data_a, batch = tiny
    coef = 1e4
    method = ewc.make_ewc(model, LR, coef, fisher_examples=8)
    state = jax.jit(method.init)(network, data_a, jax.random.key(7))
    moved = perturb(network, 4, 0.01)
    stepped, metrics = jax.jit(method.step)(state._replace(network=moved), batch, None)
    # p - lr (∇CE_B + coef F (w - w*)) for the backbone, p - lr ∇CE_B for head_b.
    ce_b = lambda t: training.cross_entropy(
        models.apply_head(t["head_b"], model.apply(t["backbone"], batch.x_b).representation),
        batch.y_b,
    )
    ce_grads = jax.jit(jax.grad(ce_b))({"backbone": moved["backbone"], "head_b": moved["head_b"]})
    backbone = jax.tree.map(
        lambda w, g, a, f: w - LR * (g + coef * f * (w - a)),
        moved["backbone"],
        ce_grads["backbone"],
        state.anchor,
        state.fisher,
    )
    head_b = jax.tree.map(lambda w, g: w - LR * g, moved["head_b"], ce_grads["head_b"])
    expected = {"backbone": backbone, "head_b": head_b, "head_a": moved["head_a"]}
    chex.assert_trees_all_close(stepped.network, expected, rtol=1e-5, atol=1e-6)
    pen = ewc.penalty(moved["backbone"], state.anchor, state.fisher, coef)
    np.testing.assert_allclose(metrics["penalty"], pen, rtol=1e-6)
    # Ten steps on one batch: with the penalty the backbone stays closer to w* (in Fisher norm).
    # (coef 3: lr · coef · max F must stay below 2 for SGD on the penalty to be stable.)
    distance = []
    for c in (0.0, 3.0):
        state = run_steps(
            ewc.make_ewc(model, LR, c, fisher_examples=8), network, data_a, [batch] * 10
        )
        distance.append(
            float(ewc.penalty(state.network["backbone"], state.anchor, state.fisher, 1))
        )
        chex.assert_trees_all_equal(state.network["head_a"], network["head_a"])
        chex.assert_trees_all_equal(state.anchor, network["backbone"])
    assert distance[1] < 0.5 * distance[0], distance


def test_ewc_init_is_deterministic_and_runs_in_the_task_b_scan(tiny):
    model, network, data_a, batch = tiny
    method = ewc.make_ewc(model, LR, 1.0, fisher="true", fisher_examples=6)
    a = jax.jit(method.init)(network, data_a, jax.random.key(1))
    chex.assert_trees_all_equal(jax.jit(method.init)(network, data_a, jax.random.key(1)), a)
    b = jax.jit(method.init)(network, data_a, jax.random.key(2))
    assert not np.allclose(a.fisher["conv0"]["kernel"], b.fisher["conv0"]["kernel"])
    # As `task_b` runs it: init and 2 steps for 2 seeds under map_seeds and scan.
    nets = jax.tree.map(lambda v: jnp.stack([v, v]), network)
    keys = jax.random.split(jax.random.key(0), 2)
    states = jax.jit(lambda n, k: training.map_seeds(lambda a, b: method.init(a, data_a, b), n, k))(
        nets, keys
    )
    data_b = data_a._replace(train_labels=data_a.train_labels % NUM_B)
    idx = jnp.array([[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2)
    step_keys = jax.random.split(jax.random.key(3), 4).reshape(2, 2)
    out, metrics = task_b.make_advance(method)(
        states, (step_keys, idx, None, None, None), data_a=data_a, data_b=data_b
    )
    chex.assert_tree_all_finite((out, metrics))
    assert set(metrics) == {"loss", "penalty"}
    with pytest.raises(ValueError, match="fisher"):
        ewc.make_ewc(model, LR, 1.0, fisher="exact")


def test_entries_besides_the_trained_ones_pass_through(tiny):
    """A start network may carry a method's own state (e.g. HAT's embeddings); it is kept."""
    model, network, data_a, batch = tiny
    extra = {**network, "extra": {"count": jnp.arange(3)}}
    for method in (
        lwf.make_lwf(model, LR, coef=1.0, temperature=2.0),
        ewc.make_ewc(model, LR, 1.0, fisher_examples=4),
    ):
        state = run_steps(method, extra, data_a, [batch])
        chex.assert_trees_all_equal(method.network(state)["extra"], extra["extra"])
