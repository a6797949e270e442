"""The example from Python instead of the command line: the config of `my_config.py` (the user's
method and model, SGD and EWC, on Fig. 1's smoke data) through the pipeline's own API, then the
table of results.

    python examples/compare.py [WORKDIR] [PRESET]

WORKDIR defaults to a new temporary folder, PRESET (of `l2r/configs/fig1.py`) to smoke.
"""

import sys
import tempfile

import my_config  # Imports my_method and my_model, which register "l2_pull" and "my_mlp".

from l2r import report
from l2r.pipelines import fig1


def main(workdir: str, preset: str = "smoke") -> dict:
    config = my_config.get_config(preset)
    results = fig1.run(config, workdir)  # What `python -m experiments.run` runs for fig1.
    print(report.summary_table(results))
    print(f"Artefacts in {workdir}")
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else tempfile.mkdtemp(prefix="l2r_example_"), *args[1:2])
