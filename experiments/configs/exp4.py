"""`--config=experiments/configs/exp4.py` in a checkout: the shipped `l2r/configs/exp4.py`."""

from l2r.configs.exp4 import PRESETS, get_config  # noqa: F401
