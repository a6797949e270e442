"""l2r: Learning to Remember from a Multi-Task Teacher, in JAX.

The public API, imported on first use so that `import l2r` stays cheap:
  probes (`l2r.probe`): `readout_accuracy`, `readout_accuracies`, `fit_readout`,
    `fit_readouts`, `predict`, `head_accuracy`, `linear_cka`, `layer_cka`, `ReadoutConfig`,
    `Readout`, `DEFAULT_READOUT`, `PAPER_READOUT`;
  the meta-trained rule (`l2r.rule`): `load_rule`, `read_config`, `as_optax`, `Rule`,
    `RuleState`.

Importing l2r sets XLA:CPU flags and JAX's persistent compilation cache (`l2r.runtime`).
"""

import importlib as _importlib

from l2r import runtime as _runtime

_runtime.apply_defaults()  # XLA:CPU flags and the compilation cache (l2r/runtime.py).

__version__ = "0.1.0"

_PROBE = ("readout_accuracy", "readout_accuracies", "fit_readout", "fit_readouts", "predict",
          "head_accuracy", "linear_cka", "layer_cka", "ReadoutConfig", "Readout",
          "DEFAULT_READOUT", "PAPER_READOUT")  # fmt: skip
_RULE = ("load_rule", "read_config", "as_optax", "Rule", "RuleState")
_EXPORTS = {**dict.fromkeys(_PROBE, "l2r.probe"), **dict.fromkeys(_RULE, "l2r.rule")}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'l2r' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # Later look-ups skip this function.
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
