"""`--config=experiments/configs/exp2.py` in a checkout: the shipped `l2r/configs/exp2.py`."""

from l2r.configs.exp2 import PRESETS, get_config  # noqa: F401
