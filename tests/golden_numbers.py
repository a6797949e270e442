"""The numbers of a results.json that a refactoring must not change, and their comparison.

`tests/golden/<preset>.json` hold them for the smoke presets as the code before the l2r/
restructure computed them (`python -m tests.golden_numbers record WORKDIR NAME` writes one);
`e2e_test.py` reruns each preset and requires equality to 1e-6. `fig1_cpu.json` holds the README
run (`fig1.py:cpu`, Fashion-MNIST, about 10 minutes, so not a unit test): check a run of it with
`python -m tests.golden_numbers check WORKDIR fig1_cpu`.

Float results differ between CPU kinds: XLA:CPU and its kernel libraries round differently on an
AVX-512 machine than on an AVX2 one, and the difference grows through training (a smoke preset's
accuracy moves by a test example, its CKA by 1e-4). `numerics()` names how this machine rounds:
the digest of a small program's output bits. Goldens recorded on a machine of another kind live
in `tests/golden/numerics/<digest>/`; where this machine's kind has goldens, they are compared to
1e-6 (`strict`); where it has none, the `tests/golden/` ones are compared within the rounding
another CPU kind causes (`LOOSE`), which still catches any change of the computation itself.
`python -m tests.golden_numbers record WORKDIR NAME --kind` records for this machine's kind.
"""

import functools
import hashlib
import json
import os
import sys

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
KINDS_DIR = os.path.join(GOLDEN_DIR, "numerics")
# Within the rounding of another CPU kind, as measured on the smoke presets (AVX2 goldens rerun
# on an AVX-512 machine, 2026-12-06): accuracies within 1 test example of 100-150, everything
# else within 0.4% (the meta-training loss) and mostly 1e-4. Twice that, and no more.
LOOSE = {"accuracy": 0.021, "rtol": 1e-2, "atol": 1e-4}


def numbers(results: dict) -> dict:
    """{name: list} of every probe metric per method, the steps, the pre-training accuracy and
    the meta-training history (wall-clock seconds left out)."""
    pretrain_acc = np.asarray(results["pretrain_test_accuracy"], np.float64).tolist()
    out = {"steps": list(results["steps"]), "pretrain_test_accuracy": pretrain_acc}
    for method, history in results["methods"].items():
        for k, v in history.items():
            out[f"{method}/{k}"] = np.asarray(v, np.float64).tolist()
    for k, v in (results.get("meta") or {}).items():
        if k != "seconds":
            out[f"meta/{k}"] = np.asarray(v, np.float64).tolist()
    return out


def _is_accuracy(key: str) -> bool:
    metric = key.rpartition("/")[2]
    return metric.startswith(("readout", "original")) or metric == "pretrain_test_accuracy"


def differences(golden: dict, new: dict, atol: float = 1e-6, loose: bool = False) -> list[str]:
    """What differs between two `numbers` dicts: missing entries, shapes, values beyond atol
    (with `loose`, beyond the `LOOSE` tolerances of another CPU kind's rounding)."""
    bad = []
    for k, v in golden.items():
        if k not in new:
            bad.append(f"{k}: missing")
            continue
        a, b = np.asarray(v, np.float64), np.asarray(new[k], np.float64)
        if a.shape != b.shape:
            bad.append(f"{k}: shape {a.shape} -> {b.shape}")
            continue
        if not loose:
            tol = dict(atol=atol, rtol=0)
        elif _is_accuracy(k):
            tol = dict(atol=LOOSE["accuracy"], rtol=0)
        else:
            tol = dict(atol=LOOSE["atol"], rtol=LOOSE["rtol"])
        if not np.allclose(b, a, equal_nan=True, **tol):
            bad.append(f"{k}: max difference {np.nanmax(np.abs(a - b)):.3g}")
    return bad


@functools.cache
def numerics() -> str:
    """12 hex digits naming how this machine's XLA:CPU rounds: the SHA-256 of the output bits
    of one jitted program with the operations the presets run (a convolution, a matmul, a
    group normalisation, exp and log, and their gradients) on fixed inputs."""
    import jax
    import jax.numpy as jnp

    import l2r  # noqa: F401  (its XLA flags, as every run has them)

    def loss(w, k, x):
        h = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        g = h.reshape(h.shape[0], -1, 4, h.shape[-1] // 4)
        g = (g - g.mean(axis=(1, 3), keepdims=True)) / jnp.sqrt(g.var(axis=(1, 3), keepdims=True)
                                                               + 1e-5)  # fmt: skip
        z = jax.nn.relu(g.reshape(h.shape)).mean(axis=(1, 2)) @ w
        return jnp.mean(jax.nn.logsumexp(z, axis=-1) - z[:, 0]) + jnp.mean(jnp.tanh(z) ** 2)

    keys = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(keys[0], (32, 10))
    k = jax.random.normal(keys[1], (3, 3, 8, 32)) / 9.0
    x = jax.random.normal(keys[2], (64, 16, 16, 8))
    out = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w, k, x)
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(out):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:12]


def load(name: str) -> tuple[dict, bool]:
    """The goldens `name` for this machine: (numbers, strict). Strict when they were recorded
    on a machine of this kind (`numerics()`), else the `tests/golden/` ones, compared loosely."""
    own = os.path.join(KINDS_DIR, numerics(), f"{name}.json")
    path, strict = (own, True) if os.path.exists(own) else (
        os.path.join(GOLDEN_DIR, f"{name}.json"), False)  # fmt: skip
    with open(path) as f:
        return json.load(f), strict


def main(argv):
    command, workdir, name = argv[1:4]
    with open(os.path.join(workdir, "results.json")) as f:
        got = numbers(json.load(f))
    if command == "record":
        folder = os.path.join(KINDS_DIR, numerics()) if "--kind" in argv[4:] else GOLDEN_DIR
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(got, f)
        print(f"recorded {len(got)} entries as {os.path.relpath(folder, GOLDEN_DIR)}/{name}")
    else:
        golden, strict = load(name)
        bad = differences(golden, got, loose=not strict)
        how = "equal to 1e-6" if strict else "within another CPU kind's rounding"
        print("\n".join(bad) or f"{name}: {how}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(sys.argv)
