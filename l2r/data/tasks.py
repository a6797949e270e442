"""Tasks: class subsets of a dataset with labels remapped to 0..k-1, and the splits the paper uses.

A `Task` is what a network trains on: Task A and Task B of the forgetting protocol (paper §3),
the DB1/DB2 halves of Exp 1, n-way tasks drawn from a class pool (Exps 2-5), and the union A∪B
the multi-task teacher sees (§4). Everything works on host numpy arrays.
"""

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from l2r.data.sources import DataError, Dataset, Split

# Paper Table 1: Exp 1's Task A and Task B.
CIFAR10_5A = ("airplane", "automobile", "bird", "cat", "deer")
CIFAR10_5B = ("dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass(frozen=True)
class Task:
    """A classification task: labels are 0..num_classes-1, indexing `class_names`."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_classes(dataset: Dataset | Task, classes: Sequence[int | str]) -> tuple[int, ...]:
    """Class names or indices -> label indices of `dataset`, in the order given.

    Raises:
      DataError: an unknown name, an out-of-range index, a duplicate, or no classes at all; the
        message lists the valid names.
    """
    names = tuple(dataset.class_names)
    if isinstance(classes, str | int | np.integer):
        classes = (classes,)
    valid = f"valid classes are {', '.join(map(repr, names))} or indices 0..{len(names) - 1}"
    if len(classes) == 0:
        raise DataError(f"No classes given; {valid}.")
    out = []
    for c in classes:
        if isinstance(c, str):
            if c not in names:
                raise DataError(f"Unknown class {c!r}; {valid}.")
            out.append(names.index(c))
        elif isinstance(c, int | np.integer) and not isinstance(c, bool):
            if not 0 <= c < len(names):
                raise DataError(f"Class index {c} is out of range; {valid}.")
            out.append(int(c))
        else:
            raise DataError(f"Class {c!r} must be a name (str) or an index (int); {valid}.")
    duplicates = sorted({names[i] for i in out if out.count(i) > 1})
    if duplicates:
        raise DataError(f"Classes {duplicates} are listed more than once; list each once.")
    return tuple(out)


def _select(split: Split, classes: Sequence[int], num_classes: int) -> Split:
    """Examples of `classes` (in dataset order) with labels remapped to positions in `classes`."""
    remap = np.full(num_classes, -1, np.int32)
    remap[np.asarray(classes)] = np.arange(len(classes), dtype=np.int32)
    new = remap[split.labels]
    keep = new >= 0
    return Split(split.images[keep], new[keep])


def make_task(dataset: Dataset | Task, classes: Sequence[int | str], name: str) -> Task:
    """The task of `classes` (names or indices); label i is the i-th class given.

    Returns:
      Task whose train/test hold only those classes' examples, labels int32 in 0..k-1.
    """
    idx = resolve_classes(dataset, classes)
    n = len(dataset.class_names)
    return Task(
        name,
        _select(dataset.train, idx, n),
        _select(dataset.test, idx, n),
        tuple(dataset.class_names[i] for i in idx),
    )


def split_task(
    dataset: Dataset | Task,
    classes_a: Sequence[int | str],
    classes_b: Sequence[int | str],
    *,
    names: tuple[str, str] = ("A", "B"),
) -> tuple[Task, Task]:
    """Task A and Task B of the forgetting protocol, from two disjoint class lists.

    Raises:
      DataError: the lists share a class (named in the message).
    """
    a, b = resolve_classes(dataset, classes_a), resolve_classes(dataset, classes_b)
    shared = [dataset.class_names[i] for i in a if i in b]
    if shared:
        raise DataError(
            f"Task A and Task B share classes {shared}; a class seen in Task A would leak into "
            "Task B. Make data.classes_a and data.classes_b disjoint."
        )
    return make_task(dataset, a, names[0]), make_task(dataset, b, names[1])


def sample_nway_classes(
    dataset: Dataset | Task, pool: Sequence[int | str], n_way: int, num_tasks: int, seed: int
) -> np.ndarray:
    """Class indices of `num_tasks` n-way tasks drawn from `pool`, int32 [num_tasks, n_way].

    Each row holds n_way distinct classes of the pool in random order (row position = the task's
    label). Deterministic in `seed`. Cheap even for thousands of tasks: training loops can gather
    tasks from these indices instead of materialising each one.
    """
    idx = resolve_classes(dataset, pool)
    if not 1 <= n_way <= len(idx):
        raise DataError(
            f"n_way={n_way} must be between 1 and the pool size {len(idx)}; shrink n_way or "
            "enlarge the pool."
        )
    if num_tasks < 0:
        raise DataError(f"num_tasks={num_tasks} must be >= 0.")
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.asarray(idx), n_way, replace=False) for _ in range(num_tasks)]
    return np.asarray(rows, np.int32).reshape(num_tasks, n_way)


def sample_nway_tasks(
    dataset: Dataset | Task, pool: Sequence[int | str], n_way: int, num_tasks: int, seed: int
) -> list[Task]:
    """`num_tasks` n-way tasks, each of n_way distinct classes from `pool`, labels 0..n_way-1.

    Paper Exps 2-5: meta-train tasks come from one pool of classes, meta-test tasks from a
    disjoint one (check with `assert_disjoint`). Deterministic in `seed`.

    Raises:
      DataError: n_way exceeds the pool, or the pool names unknown classes.
    """
    rows = sample_nway_classes(dataset, pool, n_way, num_tasks, seed)
    return [
        make_task(dataset, row.tolist(), f"{_name(dataset)}/{n_way}way-{seed}-{i}")
        for i, row in enumerate(rows)
    ]


def _name(dataset) -> str:
    return getattr(dataset, "name", "data")


def halves(task: Task, seed: int) -> tuple[Task, Task]:
    """Splits each class's TRAIN examples into two disjoint halves (DB1, DB2 of paper Exp 1).

    Stratified and seeded; an odd class count gives the extra example to the first half. Both
    halves share the task's test split. Examples keep their original order within a half.
    """
    rng = np.random.default_rng(seed)
    first = np.zeros(len(task.train.labels), bool)
    for c in range(task.num_classes):
        idx = rng.permutation(np.flatnonzero(task.train.labels == c))
        first[idx[: (len(idx) + 1) // 2]] = True
    parts = []
    for i, mask in enumerate((first, ~first), start=1):
        train = Split(task.train.images[mask], task.train.labels[mask])
        parts.append(Task(f"{task.name}/half{i}", train, task.test, task.class_names))
    return parts[0], parts[1]


def union(task_a: Task, task_b: Task) -> Task:
    """A∪B for the multi-task teacher (paper §4): B's labels follow A's (offset A.num_classes)."""
    if task_a.train.images.shape[1:] != task_b.train.images.shape[1:]:
        raise DataError(
            f"Cannot unite {task_a.name} and {task_b.name}: image shapes "
            f"{task_a.train.images.shape[1:]} and {task_b.train.images.shape[1:]} differ; load "
            "both with the same image_size."
        )

    def cat(a: Split, b: Split) -> Split:
        return Split(
            np.concatenate([a.images, b.images]),
            np.concatenate([a.labels, b.labels + task_a.num_classes]).astype(np.int32),
        )

    return Task(
        f"{task_a.name}+{task_b.name}",
        cat(task_a.train, task_b.train),
        cat(task_a.test, task_b.test),
        task_a.class_names + task_b.class_names,
    )


def assert_disjoint(**named_class_sets) -> None:
    """Raises DataError if any two of the named class sets share a class.

    Args:
      **named_class_sets: name -> a Task/Dataset (its class_names are used), or a sequence of
        class names, or a list of such (e.g. the tasks of one pool).

    Raises:
      DataError: naming the leaked classes and the sets that share them.
    """
    sets = {name: _class_set(v) for name, v in named_class_sets.items()}
    leaks = []
    for (na, a), (nb, b) in itertools.combinations(sets.items(), 2):
        shared = sorted(a & b, key=str)
        if shared:
            leaks.append(f"{na} and {nb} share {shared}")
    if leaks:
        raise DataError(
            "Class leak: " + "; ".join(leaks) + ". Draw these sets from disjoint class pools."
        )


def _class_set(value) -> set:
    if hasattr(value, "class_names"):
        return set(value.class_names)
    if isinstance(value, str | int | np.integer):
        return {value}
    out = set()
    for v in value:
        out |= _class_set(v)
    return out


def normalization_stats(split: Split, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of `split.images`, in [0, 1] units.

    Returns:
      (mean float32 [C], std float32 [C]).
    """
    images = split.images
    if len(images) == 0:
        raise DataError("Cannot compute normalisation statistics of an empty split.")
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    # Chunks in float64 keep memory bounded and the sums exact enough for 60k images.
    for s in range(0, len(images), chunk):
        x = images[s : s + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
    count = images.size // images.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    # A constant channel would divide by zero when normalising; 1 leaves it centred.
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def subsample(split: Split, n: int, seed: int) -> Split:
    """A stratified random subset of n examples (e.g. a probe set); n >= len: the split itself.

    Each class keeps its share of n (largest remainders round); original order is kept.
    """
    total = len(split.labels)
    if n >= total:
        return split
    if n < 1:
        raise DataError(f"subsample size n={n} must be >= 1.")
    classes, counts = np.unique(split.labels, return_counts=True)
    exact = n * counts / total
    quota = np.floor(exact).astype(int)
    # Hand the remaining examples to the classes with the largest fractional parts.
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [
            rng.permutation(np.flatnonzero(split.labels == c))[:q]
            for c, q in zip(classes, quota, strict=True)
        ]
    )
    keep.sort()
    return Split(split.images[keep], split.labels[keep])


def validation_split(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """`dataset` with a validation split carved from its training split in place of its test
    split: each class keeps round(fraction · its count) of its training examples (at least one
    when it has two or more) as the new test split, the rest as the new training split.

    Every task, pool and probe built from the result sees only the training split's examples,
    so a run on it never reads the real test split (hyper-parameter selection, `l2r-sweep
    --select=validation`). Deterministic in `seed`; the original order is kept within each part.

    Raises:
      DataError: `fraction` is not in (0, 1), or a class has fewer than two training examples.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"validation fraction {fraction!r} must be in (0, 1): the share of each class's "
            "training examples held out (e.g. 0.1); 0 turns validation off."
        )
    labels = np.asarray(dataset.train.labels)
    gen = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise DataError(
                f"{dataset.name}: class {dataset.class_names[c]!r} has {len(idx)} training "
                "example(s); a validation split needs at least 2 per class. Turn validation off "
                "(--config.validation=0) or use more data."
            )
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held.append(gen.permutation(idx)[:k])
    val = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    take = lambda i: Split(dataset.train.images[i], dataset.train.labels[i])  # noqa: E731
    return dataclasses.replace(dataset, train=take(keep), test=take(val))
