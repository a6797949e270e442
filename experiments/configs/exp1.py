"""`--config=experiments/configs/exp1.py` in a checkout: the shipped `l2r/configs/exp1.py`."""

from l2r.configs.exp1 import PRESETS, get_config  # noqa: F401
