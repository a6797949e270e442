"""The public API of `import l2r`: cheap to import, every name resolves on first use, and the
per-layer CKA is `linear_cka` layer by layer."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import l2r
from l2r import probe, rule


def test_import_is_cheap_and_lists_the_api():
    code = ("import sys, l2r; heavy = ('jax', 'matplotlib', 'tensorflow_datasets', 'orbax'); "
            "print([m for m in heavy if m in sys.modules]); print(sorted(dir(l2r)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, names = out.stdout.splitlines()
    assert loaded == "[]", loaded
    for name in ("readout_accuracy", "linear_cka", "layer_cka", "load_rule", "as_optax"):
        assert repr(name) in names


def test_every_public_name_is_its_modules():
    for name in l2r.__all__:
        if name == "__version__":
            continue
        module = probe if name in l2r._PROBE else rule
        assert getattr(l2r, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        l2r.nope  # noqa: B018


def test_layer_cka_is_linear_cka_per_layer():
    rng = np.random.default_rng(0)
    x = {"conv": rng.normal(size=(50, 3, 3, 4)), "dense": rng.normal(size=(50, 6))}
    y = {"conv": x["conv"] + rng.normal(size=(50, 3, 3, 4)), "dense": rng.normal(size=(50, 2))}
    got = l2r.layer_cka(x, y)
    assert sorted(got) == ["conv", "dense"]
    for name in got:
        flat = lambda a: jnp.asarray(a.reshape(50, -1))  # noqa: E731
        np.testing.assert_allclose(got[name], probe.linear_cka(flat(x[name]), flat(y[name])))
    with pytest.raises(ValueError, match="same layer names"):
        l2r.layer_cka(x, {"conv": y["conv"]})
