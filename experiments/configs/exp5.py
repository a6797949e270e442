"""`--config=experiments/configs/exp5.py` in a checkout: the shipped `l2r/configs/exp5.py`."""

from l2r.configs.exp5 import PRESETS, get_config  # noqa: F401
