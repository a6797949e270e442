"""Paths for `--config=experiments/configs/<name>.py` in a checkout; the configs themselves are
shipped with the package in `l2r/configs/` (`--config=<name>:<preset>` finds them anywhere)."""
