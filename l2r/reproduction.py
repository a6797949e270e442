"""The paper's claims, checked against a run's results: each claim a function of `results.json`
that returns the numbers it rests on and a verdict.

The criteria are the paper's own words, fixed before any run was read (SPEC §1, §5):
  - Fig. 1: after 300 SGD steps on Task B, readout accuracy on A drops by more than 15 points,
    and the original head drops far more (here: more than the readout).
  - Exps 1-4 (the paper states it for Exp 2, and plots the same comparison for 1, 3 and 4):
    after Task B, the learned rule forgets less of Task A than SGD, EWC and LwF (the paper: 4%
    against more than 10%), and is at most about 2 points behind them on Task B (here: within
    3 points of the best of them).
  - Exp 5: after both later tasks, the learned rule stays close to the teacher on Task 1
    (within 3 points) while the others drop up to 20 points.
A verdict is "reproduced" when every part holds, "partly" when some do, "not reproduced" when
none does, "no data" when the run lacks a method the claim needs; a baseline the claim names
that the run lacks is said next to the verdict. Forgetting and accuracies
are means over the seeds that did not diverge (`l2r.selection`), in points.
"""

from typing import NamedTuple

import numpy as np

from l2r import divergence, selection

BASELINES = ("sgd", "ewc", "lwf")  # Those the paper's Exp-2 headline names.
B_MARGIN = 3.0  # "≈2% behind": within this many points of the best baseline on Task B.
TEACHER_MARGIN = 3.0  # "close to the teacher" on Task 1: within this many points.


class Check(NamedTuple):
    claim: str  # The paper's statement.
    ours: str  # Our numbers, in words.
    parts: tuple[bool, ...]  # Each part of the claim: holds or not.
    verdict: str


def _verdict(parts) -> str:
    if not parts:
        return "no data"
    return "reproduced" if all(parts) else ("partly" if any(parts) else "not reproduced")


def _stats(results) -> dict[str, dict]:
    return {r["method"]: r for r in selection.summary_rows("", {}, results)}


def _pts(stat) -> float:
    return 100.0 * stat["mean"]


def _at_step(results, method: str, metric: str, step: int) -> np.ndarray:
    """Per kept seed: metric at `step` minus at step 0 (a drop is negative), in points."""
    steps = list(results["steps"])
    x = np.asarray(results["methods"][method][metric], np.float64)
    x = divergence.kept(x, divergence.dropped_rows(results).get(method, []))
    return 100.0 * (x[:, steps.index(step)] - x[:, 0])


def fig1(results) -> Check:
    claim = ("After 300 SGD steps on Task B, readout accuracy on A drops by more than 15 "
             "points; the original head drops far more.")  # fmt: skip
    steps = list(results["steps"])
    step = 300 if 300 in steps else None
    if "sgd" not in results["methods"] or step is None:
        return Check(claim, "no SGD run probed at step 300", (), "no data")
    readout = -_at_step(results, "sgd", "readout_A", step)
    original = -_at_step(results, "sgd", "original_A", step)
    parts = (readout.mean() > 15.0, original.mean() > readout.mean())
    ours = (f"SGD at step {step}: readout A −{readout.mean():.1f} ± {readout.std(ddof=1):.1f} "
            f"points, original A −{original.mean():.1f} ± {original.std(ddof=1):.1f} "
            f"({len(readout)} seeds)")  # fmt: skip
    return Check(claim, ours, parts, _verdict(parts))


def two_tasks(results) -> Check:
    claim = ("The learned rule forgets less of Task A than SGD, EWC and LwF (paper: 4% against "
             "more than 10%) and is about 2 points behind them on Task B.")  # fmt: skip
    stats = _stats(results)
    base = [m for m in BASELINES if m in stats and stats[m]["forgetting_A"] is not None]
    if "learned" not in stats or stats["learned"]["forgetting_A"] is None or not base:
        return Check(claim, "no learned rule or no baseline in this run", (), "no data")
    mine = stats["learned"]
    forget = {m: _pts(stats[m]["forgetting_A"]) for m in base}
    best_b = max(base, key=lambda m: stats[m]["readout_B"]["mean"])
    gap = _pts(stats[best_b]["readout_B"]) - _pts(mine["readout_B"])
    parts = (*(_pts(mine["forgetting_A"]) < f for f in forget.values()), gap <= B_MARGIN)
    others = ", ".join(f"{m} {f:.1f}" for m, f in forget.items())
    missing = [m for m in BASELINES if m not in base]
    ours = (f"forgetting of A: learned {_pts(mine['forgetting_A']):.1f} (± "
            f"{100 * mine['forgetting_A']['std']:.1f}), {others}; Task B: learned "
            f"{_pts(mine['readout_B']):.1f}, best baseline ({best_b}) "
            f"{_pts(stats[best_b]['readout_B']):.1f} ({gap:+.1f} behind)")  # fmt: skip
    verdict = _verdict(parts)
    if missing:  # The claim names them: a verdict without them is a verdict on fewer.
        verdict += f" (without {', '.join(missing)}: not run)"
    return Check(claim, ours, parts, verdict)


def three_tasks(results) -> Check:
    claim = ("After both later tasks, the learned rule stays close to the teacher on Task 1 "
             "while the others drop up to 20 points.")  # fmt: skip
    stats = _stats(results)
    need = ("learned", "teacher")
    if any(m not in stats or stats[m]["readout_1"] is None for m in need):
        return Check(claim, "no learned rule or no teacher in this run", (), "no data")
    gap = _pts(stats["teacher"]["readout_1"]) - _pts(stats["learned"]["readout_1"])
    others = {m: _pts(r["forgetting_1"]) for m, r in stats.items()
              if m not in need and r["forgetting_1"] is not None}  # fmt: skip
    parts = (gap <= TEACHER_MARGIN,)
    worst = max(others, key=others.get) if others else None
    ours = (f"Task 1 at the end: teacher {_pts(stats['teacher']['readout_1']):.1f}, learned "
            f"{_pts(stats['learned']['readout_1']):.1f} ({gap:+.1f} behind); learned forgot "
            f"{_pts(stats['learned']['forgetting_1']):.1f}")  # fmt: skip
    if worst:
        ours += f", the most of the others {worst} {others[worst]:.1f}"
    return Check(claim, ours, parts, _verdict(parts))


CLAIMS = {"fig1": fig1, "exp1": two_tasks, "exp2": two_tasks, "exp3": two_tasks,
          "exp4": two_tasks, "exp5": three_tasks}  # fmt: skip


def check(results) -> Check:
    """The paper's claim for `results`' experiment, checked."""
    return CLAIMS[results["experiment"]](results)


def command(results) -> str:
    """The command that made `results`, as its provenance recorded it (script path shortened
    to the module a checkout runs)."""
    argv = list(results.get("provenance", {}).get("command") or [])
    if not argv:
        return "(not recorded)"
    head = argv[0].replace("\\", "/")
    if "/experiments/" in head and head.endswith(".py"):
        head = "python -m experiments." + head.rsplit("/", 1)[1][:-3]
    return " ".join([head, *argv[1:]])


def markdown(runs) -> str:
    """The reproduction table of `runs`, [(name, results)]: per run its claim, our numbers, the
    verdict and the command, commit and date that made it."""
    lines = ["| experiment | preset | runs | paper | ours | verdict |", "|---" * 6 + "|"]
    notes = []
    for name, results in runs:
        c = check(results)
        seeds = len(results.get("seeds", ()))
        lines.append(f"| {results['experiment']} | `{results['preset']}` | {seeds} | {c.claim} | "
                     f"{c.ours} | **{c.verdict}** |")  # fmt: skip
        prov = results.get("provenance", {})
        notes.append(f"- `{name}`: `{command(results)}` (commit {prov.get('commit', '?')[:7]}"
                     f"{', dirty tree' if prov.get('dirty') else ''}, "
                     f"{prov.get('time_utc', '?')[:10]})")  # fmt: skip
    return "\n".join(lines) + "\n\nMade by:\n\n" + "\n".join(notes) + "\n"
