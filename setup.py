"""l2r: measuring representational forgetting and learning update rules that avoid it."""

import sys

import setuptools

# Said before pip resolves the dependencies (which would end in a ResolutionImpossible on jaxlib).
if sys.version_info < (3, 11):  # noqa: UP036 (checked before pip resolves anything)
    sys.exit(f"l2r requires Python >= 3.11 (jax >= 0.10 and numpy 2.4 do); this is Python "
             f"{sys.version.split()[0]}. Install with python3.11 or newer.")  # fmt: skip

setuptools.setup(
    name="l2r",
    version="0.1.0",
    description=(
        "Learning to Remember from a Multi-Task Teacher: representational forgetting probes and "
        "learned weight-update rules in JAX/Flax."
    ),
    license="Apache-2.0",
    # Only `l2r` is installed (its configs and command lines included); `experiments/` is the
    # checkout's `python -m experiments.run` and benchmarks.
    packages=setuptools.find_packages(include=["l2r", "l2r.*"]),
    # jax >= 0.10 and numpy 2.4 need Python 3.11.
    python_requires=">=3.11",
    entry_points={
        "console_scripts": [
            "l2r-run = l2r.cli.run:main",
            "l2r-sweep = l2r.cli.sweep:main",
            "l2r-validate = l2r.cli.validate:main",
            "l2r-agree = l2r.cli.agree:main",
        ]
    },
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "absl-py>=2.1",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "pillow>=10",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        # tensorflow-datasets 4.9.10 on Python 3.11 fails to import its builders without it.
        "tensorflow-datasets>=4.9.6",
        "importlib_resources>=6",
        "scikit-learn>=1.4",  # load_digits(), and the readout baseline in the benchmarks.
    ],
    extras_require={
        # Preparing TFDS datasets (download + conversion) needs TensorFlow; reading prepared
        # data with tfds.data_source does not.
        "tfds": ["tensorflow>=2.16"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "setuptools>=70.1"],  # 70.1: wheels
        "bench": ["torch==2.13.0"],
    },
)
