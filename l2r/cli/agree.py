r"""Do two runs of one protocol agree? Each method's statistics side by side, with the gap
between their means in standard errors.

  l2r-agree DIR_A DIR_B [--threshold=2]
  python -m experiments.agree workdirs/fig1_cpu /elsewhere/fig1_cpu

For a rerun on another machine, with another thread count or other XLA flags (which change the
order of float sums, and through it each seed's trajectory), the question is not whether the
numbers are equal but whether they come from the same distribution. For each method both runs
have, and each statistic of the sweep tables (`l2r.selection`: readout of each earlier task
before and after the later ones, its forgetting, the last task's readout, the average), the
table gives the mean
± std over seeds of either run and z = (mean_B - mean_A) / sqrt(std_A²/n_A + std_B²/n_B)
(Welch's statistic; n counts the seeds that did not diverge). A statistic "agrees" when
|z| < threshold (2: about a 5% false-alarm rate per statistic when both runs draw from one
distribution). Exit status 0 when every statistic agrees, 1 otherwise, 2 on bad input.
"""

import math
import os
import sys

from absl import app, flags

from l2r import selection
from l2r import workdir as workdir_lib

flags.DEFINE_float("threshold", 2.0, "|z| below which a statistic agrees.")
FLAGS = flags.FLAGS


def load(path: str) -> dict:
    """The results of the run in workdir `path` (or a results.json file)."""
    import json

    file = path if path.endswith(".json") else os.path.join(path, workdir_lib.RESULTS_FILE)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read the run's results ({e}); give a finished run's "
                         "workdir or its results.json.") from None  # fmt: skip


def agreement(results_a: dict, results_b: dict, threshold: float = 2.0) -> list[dict]:
    """One row per (method, statistic) both runs have: "method", "stat", "a" and "b" (each
    {"mean", "std", "n"}, fractions), "z" (None when both stds are 0 and the means are equal:
    then they agree) and "agrees"."""
    rows_a = {r["method"]: r for r in selection.summary_rows("a", {}, results_a)}
    rows_b = {r["method"]: r for r in selection.summary_rows("b", {}, results_b)}
    out = []
    for method, ra in rows_a.items():
        rb = rows_b.get(method)
        if rb is None:
            continue
        for stat, _ in selection.stat_columns(ra["tasks"]):
            if ra.get(stat) is None or rb.get(stat) is None:
                continue
            a = {**ra[stat], "n": ra["runs"] - ra["diverged"]}
            b = {**rb[stat], "n": rb["runs"] - rb["diverged"]}
            se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
            gap = b["mean"] - a["mean"]
            z = gap / se if se > 0 else (None if gap == 0 else math.copysign(math.inf, gap))
            agrees = z is None or abs(z) < threshold
            out.append({"method": method, "stat": stat, "a": a, "b": b, "z": z,
                        "agrees": agrees})  # fmt: skip
    return out


def markdown(rows: list[dict], name_a: str, name_b: str, threshold: float) -> str:
    lines = [
        f"A: `{name_a}`; B: `{name_b}`; mean ± std over seeds (%, forgetting in points); "
        f"z = (B - A) / standard error of the difference; agrees when |z| < {threshold:g}.",
        "",
        "| method | statistic | A | B | z | agrees |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['n']})"  # noqa: E731
        z = "0" if r["z"] is None else f"{r['z']:+.2f}"
        lines.append(f"| {r['method']} | {r['stat']} | {cell(r['a'])} | {cell(r['b'])} | {z} | "
                     f"{'yes' if r['agrees'] else '**no**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_main(argv):
    if len(argv) != 3:
        raise app.UsageError("Give two runs: l2r-agree DIR_A DIR_B.")
    try:
        a, b = load(argv[1]), load(argv[2])
        if (a.get("experiment"), a.get("preset")) != (b.get("experiment"), b.get("preset")):
            raise ValueError(
                f"{argv[1]} ran {a.get('experiment')}:{a.get('preset')} and {argv[2]} ran "
                f"{b.get('experiment')}:{b.get('preset')}; compare two runs of one protocol."
            )
        rows = agreement(a, b, FLAGS.threshold)
        if not rows:
            raise ValueError(f"{argv[1]} and {argv[2]} share no method with numbers to compare.")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown(rows, argv[1], argv[2], FLAGS.threshold), end="")
    sys.exit(0 if all(r["agrees"] for r in rows) else 1)


def main() -> None:
    app.run(run_main)


if __name__ == "__main__":
    main()
