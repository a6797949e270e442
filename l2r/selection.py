"""Per-method statistics of a run, as the sweep, selection and agreement tables show them,
and the validation choice among them: what `l2r-sweep`, `l2r-validate` and `l2r-agree` share.

A row is one method of one run: per earlier task its readout before and after the later ones and
its forgetting, the last task's readout and the average readout over the tasks at the end, each
{"mean", "std"} over the seeds that did not diverge (fractions).
"""

from l2r import cl_metrics, divergence


def _tasks(results) -> tuple[str, ...]:
    """The names of the tasks a run probed, in order: ("A", "B"), or ("1", "2", "3") (Exp 5)."""
    history = next(iter(results["methods"].values()))  # Task names sort in task order.
    return tuple(sorted(m.split("_", 1)[1] for m in history if m.startswith("readout_")))


def stat_columns(names) -> list[tuple[str, str]]:
    """(row field, column title) of the statistics of tasks `names`: each earlier task's
    readout before and after the later ones and its forgetting, the last task's readout, and
    the average over tasks at the end (what validation selects on)."""
    cols = []
    for t in names[:-1]:
        cols += [(f"readout_{t}_before", f"readout {t} before (%)"),
                 (f"readout_{t}", f"readout {t} after (%)"),
                 (f"forgetting_{t}", f"forgetting {t} (pts)")]  # fmt: skip
    return [*cols, (f"readout_{names[-1]}", f"readout {names[-1]} (%)"),
            ("avg_acc", "average (%)")]  # fmt: skip


def summary_rows(name: str, setting: dict, results) -> list[dict]:
    """One row per method: per earlier task its readout before and after and its forgetting,
    the last task's readout and the average readout over tasks at the end (`stat_columns`),
    each as {"mean", "std"} over the seeds that did not diverge (fractions, not percent), or
    None when all of them diverged; "runs" and "diverged" count the method's seeds, "tasks"
    names the tasks."""
    names = _tasks(results)
    metrics = tuple(f"readout_{t}" for t in names)
    fields = {"avg_acc": "avg_acc", f"readout_{names[-1]}": f"after_readout_{names[-1]}"}
    for t in names[:-1]:
        fields.update({f"readout_{t}_before": f"before_readout_{t}",
                       f"readout_{t}": f"after_readout_{t}",
                       f"forgetting_{t}": f"forgetting_readout_{t}"})  # fmt: skip
    rows = []
    dropped = divergence.dropped_rows(results)
    summary = cl_metrics.summarize(results, metrics, results.get("task_ends"))
    for method, stats in summary.items():
        runs, gone = divergence.num_runs(results, method), len(dropped.get(method, []))
        row = {"run": name, "setting": setting, "method": method, "runs": runs, "diverged": gone,
               "tasks": list(names)}  # fmt: skip
        for field, stat in fields.items():
            mean, std = stats[stat]
            # No number at all: a diverged setting must not look like a result to rank.
            row[field] = None if gone and gone >= runs else {"mean": mean, "std": std}
        rows.append(row)
    return rows


def score(row: dict) -> float | None:
    """What validation selects on: the mean over seeds of the average readout accuracy over
    the tasks (A and B; Exp 5: 1, 2 and 3) at the last step; None when every seed diverged."""
    return None if row["avg_acc"] is None else row["avg_acc"]["mean"]


def select(rows: list[dict], family=None) -> dict[str, dict | None]:
    """{method: its picked row} from `summary_rows` rows of every setting, in method order of
    first appearance: the highest `score` among settings where no seed diverged (failing those,
    the fewest diverged seeds); ties go to the earlier setting. None: every run diverged.

    `family(method) -> name` makes several methods compete as one (e.g. every `sgd_x<f>` as
    "sgd": SGD with a validated step scale); the result is then keyed by family."""
    family = family or (lambda m: m)
    picked = {}
    for group in dict.fromkeys(family(r["method"]) for r in rows):
        mine = [(i, r) for i, r in enumerate(rows) if family(r["method"]) == group]
        usable = [(r["diverged"], -score(r), i, r) for i, r in mine if score(r) is not None]
        picked[group] = min(usable, key=lambda t: t[:3])[3] if usable else None
    return picked
