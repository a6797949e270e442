"""The numbers of a results.json that a refactoring must not change, and their comparison.

`tests/golden/<preset>.json` hold them for the smoke presets as the code before the l2r/
restructure computed them (`python -m tests.golden_numbers record WORKDIR NAME` writes one);
`e2e_test.py` reruns each preset and requires equality to 1e-6. `fig1_cpu.json` holds the README
run (`fig1.py:cpu`, Fashion-MNIST, about 10 minutes, so not a unit test): check a run of it with
`python -m tests.golden_numbers check WORKDIR fig1_cpu`. Float results can differ across CPU
kinds; these were recorded on the project's 2-core machine.
"""

import json
import os
import sys

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


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


def differences(golden: dict, new: dict, atol: float = 1e-6) -> list[str]:
    """What differs between two `numbers` dicts: missing entries, shapes, values beyond atol."""
    bad = []
    for k, v in golden.items():
        if k not in new:
            bad.append(f"{k}: missing")
            continue
        a, b = np.asarray(v, np.float64), np.asarray(new[k], np.float64)
        if a.shape != b.shape:
            bad.append(f"{k}: shape {a.shape} -> {b.shape}")
        elif not np.allclose(a, b, atol=atol, rtol=0, equal_nan=True):
            bad.append(f"{k}: max difference {np.nanmax(np.abs(a - b)):.3g}")
    return bad


def load(name: str) -> dict:
    with open(os.path.join(GOLDEN_DIR, f"{name}.json")) as f:
        return json.load(f)


def main(argv):
    command, workdir, name = argv[1:4]
    with open(os.path.join(workdir, "results.json")) as f:
        got = numbers(json.load(f))
    if command == "record":
        with open(os.path.join(GOLDEN_DIR, f"{name}.json"), "w") as f:
            json.dump(got, f)
        print(f"recorded {len(got)} entries as {name}")
    else:
        bad = differences(load(name), got)
        print("\n".join(bad) or f"{name}: equal to 1e-6")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(sys.argv)
