"""Per-layer CKA of every probe step: the probe's numbers against a float64 NumPy reference, its
references (the start, the teacher) through `compare`, its cache, its merge across meta-test
tasks, its report table, and a smoke pipeline's results.json, table and figure."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r import compare, divergence, models, plots, pretrain, probe, report, task_b, training
from l2r import workdir as workdir_lib
from l2r.configs import fig1
from l2r.data import stream, tasks
from l2r.data.sources import Split
from l2r.methods import hat, make_method
from l2r.models.convnet import Conv, ConvNet, GroupNorm
from l2r.pipelines import fig1 as fig1_pipeline

WIDTHS, GROUPS, HIDDEN = (4, 8), 2, 6  # The tiny backbone: gn0 [4], gn1 [8], hidden [6].
N = 24  # Images per probe set.


def gram_cka(x_NC: np.ndarray, y_NE: np.ndarray) -> float:
    """Linear CKA in float64 from Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),
    HSIC(K, L) = tr(K H L H) with the centring H = I - 11^T / n (the common 1/(n-1)^2
    cancels)."""
    x, y = np.asarray(x_NC, np.float64), np.asarray(y_NE, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.full((n, n), 1.0 / n)
    k_x, k_y = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k_x, k_y) / np.sqrt(hsic(k_x, k_x) * hsic(k_y, k_y))


def pooled_outputs(backbone, images_u8, mean, std) -> dict[str, np.ndarray]:
    """{unit layer: [N, C]} float64: each GroupNorm's and the dense layer's output averaged
    over space, read off Flax's captured intermediates (not the taps the probe reads)."""
    x = (np.asarray(images_u8, np.float64) / 255.0 - mean) / std
    module = ConvNet(widths=WIDTHS, groups=GROUPS, hidden=HIDDEN)
    _, state = module.apply({"params": backbone}, jnp.asarray(x, jnp.float32),
                            capture_intermediates=True, mutable=["intermediates"])  # fmt: skip
    out = {}
    for name in ("gn0", "gn1", "hidden"):
        y = np.asarray(state["intermediates"][name]["__call__"][0], np.float64)
        out[name] = y.mean(axis=(1, 2)) if y.ndim == 4 else y
    return out


@pytest.fixture(scope="module")
def tiny_probe():
    """A tiny convnet, two seeds of random networks (a start and another), a random task."""
    model = models.make_model("convnet", widths=WIDTHS, groups=GROUPS, hidden=HIDDEN)
    gen = np.random.default_rng(7)
    images = gen.integers(0, 256, (N, 8, 8, 1), dtype=np.uint8)
    labels = (np.arange(N) % 3).astype(np.int32)
    mean, std = np.full(1, 0.45, np.float32), np.full(1, 0.3, np.float32)
    data = training.DeviceTask(*map(jnp.asarray, (images, labels, images, labels, mean, std)))

    def networks(seed):
        keys = jax.random.split(jax.random.key(seed), 2)
        nets = [pretrain.init_network(model, k, (1, 8, 8, 1), 3) for k in keys]
        nets = [{"backbone": n["backbone"], "head_a": n["head"]} for n in nets]
        return jax.tree.map(lambda *a: jnp.stack(a), *nets)

    layers = task_b.cka_layers(model, jax.tree.map(lambda a: a[0], networks(0)["backbone"]),
                               images.shape[1:])  # fmt: skip
    sets = task_b.ProbeSets((data,), cka_size=N, layer_cka_size=N - 4, layers=tuple(layers.items()))
    readout = probe.ReadoutConfig(steps=2)
    probe_fn = task_b.make_probe(model, readout, ("A",), ("head_a",), (3,))
    return model, data, sets, probe_fn, networks(0), networks(1)


class _NoLayout(nn.Module):
    """A user backbone with tapped layers but no `layout`."""

    @nn.compact
    def __call__(self, x, taps=False):
        h = Conv(4, name="conv")(x, taps)
        return GroupNorm(2, name="norm")(h, taps).mean(axis=(1, 2))


class _NoTaps(nn.Module):
    """A user backbone that takes no `taps` argument."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_layers_are_the_unit_layers_in_network_order(tiny_probe):
    _, _, sets, _, _, _ = tiny_probe
    assert sets.layers == (("gn0", 4), ("gn1", 8), ("hidden", 6))
    resnet = models.make_model("resnet", depth=8, widths=(4, 8, 8), groups=2)
    params = jax.eval_shape(lambda: resnet.init(jax.random.key(0), (1, 8, 8, 3)))
    layers = task_b.cka_layers(resnet, params, (8, 8, 3))
    assert list(layers) == list(resnet.units) and layers["stage2_block0/shortcut_gn"] == 8
    # Without a layout: every tapped layer, in the order they record.
    plain = models.from_module("plain", _NoLayout(), 4)
    params = jax.eval_shape(lambda: plain.init(jax.random.key(0), (1, 8, 8, 3)))
    assert task_b.cka_layers(plain, params, (8, 8, 3)) == {"conv": 4, "norm": 4}
    # A backbone that records no taps: per-layer CKA is off.
    mlp = models.from_module("mlp", _NoTaps(), 4)
    params = jax.eval_shape(lambda: mlp.init(jax.random.key(0), (1, 8, 8, 3)))
    assert task_b.cka_layers(mlp, params, (8, 8, 3)) == {}


def test_per_layer_cka_equals_a_float64_numpy_reference(tiny_probe):
    _, data, sets, probe_fn, start, other = tiny_probe
    _, ref = probe_fn(start, sets)
    _, snapshot = probe_fn(other, sets, ref)
    n = sets.layer_cka_size
    chex.assert_shape(snapshot.layers.reps, (2, n, sum(w for _, w in sets.layers)))
    chex.assert_shape(snapshot.layers.cka, (2, len(sets.layers)))
    images = np.asarray(data.test_images[:n])
    mean, std = np.asarray(data.mean), np.asarray(data.std)
    for s in range(2):
        pick = lambda nets, s=s: jax.tree.map(lambda a: np.asarray(a[s]), nets["backbone"])  # noqa: E731
        x = pooled_outputs(pick(other), images, mean, std)
        y = pooled_outputs(pick(start), images, mean, std)
        np.testing.assert_allclose(snapshot.layers.reps[s], np.concatenate(list(x.values()), -1),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        want = [gram_cka(x[k], y[k]) for k, _ in sets.layers]
        assert max(want) < 0.99  # Unrelated networks: the check is not of ones.
        np.testing.assert_allclose(snapshot.layers.cka[s], want, rtol=1e-5, atol=1e-5)
    # Against themselves (no reference): 1 at every layer.
    _, itself = probe_fn(other, sets)
    np.testing.assert_allclose(itself.layers.cka, 1.0, atol=1e-5)


def test_a_method_with_its_own_forward_is_measured_through_it(tiny_probe):
    """HAT's per-layer views are its Task-A gated forward pass (`Method.taps`), not the bare
    backbone's."""
    model, data, sets, probe_fn, start, _ = tiny_probe
    method = hat.make_hat(model, 0.1, s_max=3.0, reg=0.0, clip_embedding=6.0, anneal_steps=4)
    emb = jax.vmap(lambda k: hat.init_embeddings(k, model))(jax.random.split(jax.random.key(3), 2))
    nets = {**start, "hat": {"emb_a": emb}}
    _, snapshot = probe_fn(nets, sets, None, method)
    _, bare = probe_fn(nets, sets)
    x = stream.to_float(data.test_images[: sets.layer_cka_size], data.mean, data.std)
    for s in range(2):
        net = jax.tree.map(lambda a, s=s: a[s], nets)
        masks = hat.gates(net["hat"]["emb_a"], 3.0)
        taps = model.apply(net["backbone"], x, taps=True, masks=masks).taps
        want = jnp.concatenate([taps[k].outputs for k, _ in sets.layers], -1)
        chex.assert_trees_all_close(snapshot.layers.reps[s], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(snapshot.layers.reps, bare.layers.reps)


# ----------------------------------------------------------------------------------------------
# Through `compare`: the references, the cache, the merge.


def tiny_config(**readout):
    config = fig1.get_config("smoke")
    config.num_seeds = 2
    config.model.widths, config.model.groups = (4, 4), 2
    config.task_b.update(steps=4, probe_every=2, batch_size=4, teacher_batch_a=4)
    config.readout.update({"steps": 2, "cka_size": 8, "layer_cka_size": 10, **readout})
    return config


@pytest.fixture(scope="module")
def problem():
    config = tiny_config()
    model = models.make_model("convnet", widths=(4, 4), groups=2)
    gen = np.random.default_rng(0)

    def task(name):
        images = gen.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
        split = Split(images, (np.arange(12) % 3).astype(np.int32))
        return tasks.Task(name, split, split, ("a", "b", "c"))

    network = pretrain.init_network(model, jax.random.key(0), (1, 8, 8, 1), 3)
    pretrained = jax.tree.map(lambda a: a[None], network)
    mean, std = np.full(1, 0.5, np.float32), np.full(1, 0.25, np.float32)
    return config, model, pretrained, [task("A"), task("B")], mean, std


def run(problem, names, cache_dir=None, config=None, **replace):
    """`compare` of the methods `names` (a method's fields replaced by `replace[name]`)."""
    default, model, pretrained, task_list, mean, std = problem
    config = config or default
    methods = [make_method(n, model, config.task_b)._replace(**replace.get(n, {}))
               for n in names]  # fmt: skip
    return compare.compare(config, model, pretrained, task_list, mean, std, methods,
                           cache_dir=None if cache_dir is None else str(cache_dir))  # fmt: skip


@pytest.fixture(scope="module")
def cached(problem, tmp_path_factory):
    cache = tmp_path_factory.mktemp("task_b")
    return cache, run(problem, ("sgd", "teacher"), cache)


def test_layer_cka_has_its_documented_shape_and_references(problem, cached):
    _, first = cached
    layer = first["layer_cka"]
    assert layer["layers"] == ["gn0", "gn1"]
    assert list(layer["to_pretrained"]) == list(layer["to_teacher"]) == ["sgd", "teacher"]
    for ref in ("to_pretrained", "to_teacher"):
        for name, cka in layer[ref].items():
            chex.assert_shape(cka, (2, 3, 2))  # [S, P, L]
            assert np.all((cka > -1e-6) & (cka < 1 + 1e-5)), (ref, name)
        # Step 0: every method starts from the pre-trained network, which the teacher also is.
        for name, cka in layer[ref].items():
            np.testing.assert_allclose(cka[:, 0], 1.0, atol=1e-5, err_msg=f"{ref}/{name}")
    np.testing.assert_allclose(layer["to_teacher"]["teacher"], 1.0, atol=1e-5)
    assert not np.allclose(layer["to_pretrained"]["sgd"][:, -1], 1.0, atol=1e-6)  # It moved.
    # The histories the report tables and the goldens read are as before.
    assert set(first["methods"]["sgd"]) == {
        "readout_A", "original_A", "readout_B", "original_B", "cka_A", "loss"
    }  # fmt: skip


def test_cached_methods_give_the_numbers_of_fresh_ones(problem, cached, tmp_path):
    cache, first = cached
    again = run(problem, ("sgd", "teacher"), cache)
    assert again["timing"]["task_b_reused"] == ["sgd", "teacher"]
    chex.assert_trees_all_equal(again["layer_cka"], first["layer_cka"])
    # A method added later is measured against the cached teacher's views, as against a fresh
    # teacher's; the cached methods are reused.
    more = run(problem, ("sgd", "lwf", "teacher"), cache)
    assert more["timing"]["task_b_reused"] == ["sgd", "teacher"]
    fresh = run(problem, ("lwf", "teacher"), tmp_path / "fresh")
    assert fresh["timing"]["task_b_reused"] == []
    for ref in ("to_pretrained", "to_teacher"):
        np.testing.assert_array_equal(more["layer_cka"][ref]["lwf"], fresh["layer_cka"][ref]["lwf"])
    # Without the teacher, its CKA is not reported, and nothing runs again.
    alone = run(problem, ("sgd",), cache)
    assert alone["timing"]["task_b_reused"] == ["sgd"] and alone["layer_cka"]["to_teacher"] == {}
    np.testing.assert_array_equal(alone["layer_cka"]["to_pretrained"]["sgd"],
                                  first["layer_cka"]["to_pretrained"]["sgd"])  # fmt: skip


def test_a_changed_teacher_runs_the_methods_measured_against_it_again(problem, cached):
    cache, first = cached
    # Another teacher key (its `params`), the same teacher: SGD's histories are cached, but
    # its CKA to the teacher was measured against another one, so it runs again.
    changed = run(problem, ("sgd", "teacher"), cache, teacher={"params": np.ones(1)})
    assert changed["timing"]["task_b_reused"] == []
    chex.assert_trees_all_equal(changed["layer_cka"], first["layer_cka"])
    assert run(problem, ("sgd", "teacher"), cache)["timing"]["task_b_reused"] == ["teacher"]


def test_runs_of_several_tasks_merge_along_the_seed_axis(cached):
    _, first = cached
    merged = compare.merge_runs([first, first])
    assert merged["layer_cka"]["layers"] == first["layer_cka"]["layers"]
    for ref in ("to_pretrained", "to_teacher"):
        for name, cka in first["layer_cka"][ref].items():
            np.testing.assert_array_equal(merged["layer_cka"][ref][name],
                                          np.concatenate([cka, cka]))  # fmt: skip


def test_size_0_turns_per_layer_cka_off(problem):
    results = run(problem, ("sgd",), config=tiny_config(layer_cka_size=0))
    assert "layer_cka" not in results


# ----------------------------------------------------------------------------------------------
# The report.


def test_layer_table_leaves_out_diverged_runs_and_their_teachers_seeds():
    rng = np.random.default_rng(0)
    cka = {m: rng.uniform(0, 1, (3, 2, 2)) for m in ("sgd", "teacher")}
    history = lambda: {"readout_A": np.full((3, 2), 0.5), "loss": np.ones((3, 2))}  # noqa: E731
    results = {
        "steps": [0, 10], "seeds": [0, 1, 2],
        "methods": {"sgd": history(), "teacher": history()},
        "layer_cka": {"layers": ["gn0", "gn1"], "to_pretrained": cka, "to_teacher": cka},
    }  # fmt: skip
    results["methods"]["teacher"]["loss"][2, 1] = np.nan  # The teacher's seed 2 diverged.
    results = json.loads(json.dumps(report.to_jsonable(results)))  # As results.json holds it.
    lines = report.layer_cka_table(results, "to_pretrained").splitlines()
    assert lines[2].startswith("| layer | sgd | teacher (diverged: 1/3 seeds, left out) |")
    sgd_gn1 = cka["sgd"][:, 1, 1]
    assert f"{sgd_gn1.mean():.3f} ± {sgd_gn1.std(ddof=1):.3f}" in lines[5]
    teacher_gn1 = cka["teacher"][:2, 1, 1]
    assert f"{teacher_gn1.mean():.3f} ± {teacher_gn1.std(ddof=1):.3f}" in lines[5]
    # To the teacher, SGD's seed 2 has no teacher to compare with.
    lines = report.layer_cka_table(results, "to_teacher").splitlines()
    assert f"{cka['sgd'][:2, 1, 1].mean():.3f} ± " in lines[5]
    assert divergence.find_divergence(results)[0]["method"] == "teacher"


def test_smoke_pipeline_writes_layer_cka_its_table_and_figure(tmp_path):
    config = fig1.get_config("smoke")
    config.task_b.methods = ("sgd", "hat", "teacher")
    with workdir_lib.locked(str(tmp_path)):
        fig1_pipeline.run(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    layer = saved["layer_cka"]
    assert layer["layers"] == ["gn0", "gn1"]
    shape = (config.num_seeds, len(saved["steps"]), len(layer["layers"]))
    for ref in ("to_pretrained", "to_teacher"):
        assert list(layer[ref]) == list(config.task_b.methods), ref
        for name, cka in layer[ref].items():
            cka = np.asarray(cka, float)
            assert cka.shape == shape and np.all((cka > -1e-6) & (cka < 1 + 1e-5)), (ref, name)
    np.testing.assert_allclose(np.asarray(layer["to_pretrained"]["hat"])[:, 0], 1.0, atol=1e-5)
    md = (tmp_path / "results.md").read_text()
    section = md[md.index("## Per-layer CKA") : md.index("## Curves")]
    for title in report.LAYER_REFERENCES.values():
        assert f"**{title}**" in section
    assert section.count("| `gn0` |") == section.count("| `gn1` |") == 2
    for path in ("fig1_layer_cka.png", "fig1_layer_cka.pdf"):
        assert (tmp_path / path).stat().st_size > 0, path
    fig = plots.layer_cka_figure(saved)
    assert [ax.get_title() for ax in fig.axes] == list(report.LAYER_REFERENCES.values())
