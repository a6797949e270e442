"""The paper's claims next to ours, from finished runs (`l2r.reproduction`).

  python -m experiments.reproduction docs/runs/fig1_cpu docs/runs/exp2_cpu ...

prints a markdown table: per run the paper's claim, our numbers, the verdict, and the command,
commit and date that made the run (its provenance).
"""

import json
import os
import sys

from l2r import reproduction


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m experiments.reproduction RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    runs = []
    for path in argv:
        file = path if path.endswith(".json") else os.path.join(path, "results.json")
        try:
            with open(file) as f:
                runs.append((os.path.basename(os.path.dirname(os.path.abspath(file))),
                             json.load(f)))  # fmt: skip
        except (OSError, ValueError) as e:
            print(f"error: {file}: cannot read the run's results ({e}).", file=sys.stderr)
            return 2
    print(reproduction.markdown(runs), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
