"""`--config=experiments/configs/fig1.py` in a checkout: the shipped `l2r/configs/fig1.py`."""

from l2r.configs.fig1 import PRESETS, get_config  # noqa: F401
