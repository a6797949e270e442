"""`--config=experiments/configs/exp3.py` in a checkout: the shipped `l2r/configs/exp3.py`."""

from l2r.configs.exp3 import PRESETS, get_config  # noqa: F401
