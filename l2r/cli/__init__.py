"""The command-line entry points: `l2r-run` (`l2r.cli.run`) and `l2r-sweep` (`l2r.cli.sweep`),
also run as `python -m experiments.run` / `python -m experiments.sweep` from a checkout."""
