"""Cache keys of the training stages (pre-training, HAT, Rep and OML starts): each changes with
what its stage reads, a hyper-parameter or the data, and with nothing else; a new method file
that none of them imports changes none of them."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r import keys, models, pretrain, training
from l2r.configs import fig1
from l2r.methods import hat, oml, rep

MODULES = {
    "pretrain": "l2r.pretrain",
    "hat": "l2r.methods.hat",
    "rep": "l2r.methods.rep",
    "oml": "l2r.methods.oml",
}


def task(seed: int, n: int = 12, classes: int = 3) -> training.DeviceTask:
    gen = np.random.default_rng(seed)
    images = lambda k: jnp.asarray(gen.integers(0, 256, (k, 8, 8, 1)), jnp.uint8)  # noqa: E731
    labels = lambda k: jnp.arange(k, dtype=jnp.int32) % classes  # noqa: E731
    return training.DeviceTask(
        images(n), labels(n), images(n // 2), labels(n // 2), jnp.array([0.5]), jnp.array([0.25])
    )


@pytest.fixture
def inputs():
    model = models.make_model("convnet", widths=(4,), groups=2, hidden=4)
    nets = jax.vmap(lambda k: pretrain.init_network(model, k, (1, 8, 8, 1), 3))(
        jax.random.split(jax.random.key(0), 2)
    )
    return {"data_a": task(0), "data_m": task(1), "nets": nets, "key": jax.random.key(3)}


def stage_keys(config, data_a, data_m, nets, key) -> dict[str, str]:
    return {
        "pretrain": pretrain.fingerprint(config, data_a),
        "hat": hat.fingerprint(config, data_a),
        "rep": rep.fingerprint(config, data_a, data_m),
        "oml": oml.fingerprint(config, nets, data_m, key, None),
    }


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k] != after[k]}


@pytest.mark.parametrize(
    "field, value, readers",
    [
        ("pretrain.learning_rate", 0.05, {"pretrain", "hat", "rep"}),
        ("pretrain.steps", 7, {"pretrain", "hat", "rep"}),
        ("model.widths", (8,), {"pretrain", "hat", "rep", "oml"}),
        ("seed", 1, {"pretrain", "hat", "rep"}),
        ("task_b.hat.reg", 0.5, {"hat"}),
        ("task_b.rep.steps", 7, {"rep"}),
        ("task_b.oml.inner_lr", 0.2, {"oml"}),
        # How many networks, how many per call, where they live, Task B: read by none.
        ("pretrain.num_checkpoints", 5, set()),
        ("pretrain.seeds_per_call", 1, set()),
        ("pretrain.dir", "/elsewhere", set()),
        ("task_b.steps", 7, set()),
        ("task_b.learning_rate", 0.05, set()),
    ],
)
def test_a_config_field_changes_the_keys_of_the_stages_that_read_it(inputs, field, value, readers):
    config = fig1.get_config("smoke")
    before = stage_keys(config, **inputs)
    *groups, name = field.split(".")
    node = config
    for g in groups:
        node = node[g]
    node[name] = value
    assert changed(before, stage_keys(config, **inputs)) == readers


def test_the_data_and_networks_a_stage_reads_change_its_key(inputs):
    config = fig1.get_config("smoke")
    before = stage_keys(config, **inputs)
    a, m = inputs["data_a"], inputs["data_m"]
    flipped = lambda x: x.at[0, 0, 0, 0].set(255 - x[0, 0, 0, 0])  # noqa: E731
    cases = {
        "data_a": (a._replace(train_images=flipped(a.train_images)), {"pretrain", "hat", "rep"}),
        "data_m": (m._replace(train_labels=m.train_labels[::-1]), {"rep", "oml"}),
        "nets": (jax.tree.map(lambda v: v + 1e-3, inputs["nets"]), {"oml"}),
        "key": (jax.random.key(4), {"oml"}),
    }
    for name, (value, readers) in cases.items():
        assert changed(before, stage_keys(config, **{**inputs, name: value})) == readers, name
    # The test split is read by the stages that report a test accuracy (not by OML).
    other_test = a._replace(test_labels=a.test_labels[::-1])
    assert changed(before, stage_keys(config, **{**inputs, "data_a": other_test})) == {
        "pretrain",
        "hat",
        "rep",
    }


@pytest.mark.parametrize("module", MODULES.values())
def test_no_stage_reads_the_methods_package(module):
    # l2r/methods/__init__.py imports every method: reading it would tie each key to all.
    read = keys.modules_read(module)
    assert "l2r.methods" not in read
    assert not {m for m in read if m.startswith("l2r.methods.")} - {module, "l2r.methods.base"}


@pytest.fixture
def source_copy(tmp_path, monkeypatch):
    """A copy of the l2r sources under tmp_path, which `keys` reads instead of the package."""
    root = tmp_path / "l2r"
    shutil.copytree(keys._ROOT, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    monkeypatch.setattr(keys, "_ROOT", root)
    keys._closure.cache_clear()
    yield root
    keys._closure.cache_clear()


def test_a_new_method_file_changes_no_key(inputs, source_copy):
    config = fig1.get_config("smoke")
    before = stage_keys(config, **inputs)
    (source_copy / "methods" / "mine.py").write_text(
        "from l2r.methods import registry\nfrom l2r.methods.base import Method\n\n\n"
        '@registry.register("mine")\ndef build(name, model, task_b, context):\n'
        "    raise NotImplementedError\n"
    )
    keys._closure.cache_clear()
    assert stage_keys(config, **inputs) == before

    # Control: an edit to a module a stage runs changes that stage's key, and only those.
    with open(source_copy / "methods" / "hat.py", "a") as f:
        f.write("# an edit\n")
    keys._closure.cache_clear()
    assert changed(before, stage_keys(config, **inputs)) == {"hat"}
    with open(source_copy / "training.py", "a") as f:
        f.write("# an edit\n")
    keys._closure.cache_clear()
    assert changed(before, stage_keys(config, **inputs)) == set(MODULES)
