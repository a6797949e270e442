"""Continual-learning metrics on small hand-computed accuracy matrices and probe histories."""

import numpy as np
import pytest

from l2r import cl_metrics

# Three tasks. Row i: after training on task i. R[0, 1] = 0.6 (transfer before training).
R3 = np.array(
    [
        [0.90, 0.60, 0.30],
        [0.80, 0.50, 0.20],
        [0.70, 0.40, 0.95],
    ]
)


def test_three_task_matrix_by_hand():
    np.testing.assert_allclose(cl_metrics.average_accuracy(R3), (0.70 + 0.40 + 0.95) / 3)
    # BWT: ((0.70 - 0.90) + (0.40 - 0.50)) / 2.
    np.testing.assert_allclose(cl_metrics.backward_transfer(R3), -0.15)
    # Task 0: max(0.90, 0.80) - 0.70; task 1: max over rows i >= 1 only, 0.50 - 0.40 (the 0.60
    # measured before task 1 was trained is not counted as lost knowledge).
    np.testing.assert_allclose(cl_metrics.forgetting(R3), [0.20, 0.10])


def test_two_task_matrix_and_batching():
    r = np.array([[[0.9, 0.2], [0.7, 0.8]], [[0.8, 0.3], [0.85, 0.9]]])  # [S=2, 2, 2]
    np.testing.assert_allclose(cl_metrics.average_accuracy(r), [0.75, 0.875])
    np.testing.assert_allclose(cl_metrics.backward_transfer(r), [-0.2, 0.05])
    np.testing.assert_allclose(cl_metrics.forgetting(r), [[0.2], [-0.05]])
    with pytest.raises(ValueError, match="2 tasks"):
        cl_metrics.backward_transfer(np.ones((1, 1)))


def history(readout_a, readout_b):
    return {"readout_A": np.asarray(readout_a), "readout_B": np.asarray(readout_b), "loss": None}


def test_matrices_from_probe_histories():
    # 2 seeds x 3 probe steps (0 = before B, last = end of B).
    h = history([[0.9, 0.8, 0.7], [0.8, 0.8, 0.6]], [[0.3, 0.6, 0.9], [0.2, 0.5, 0.7]])
    r = cl_metrics.accuracy_matrices(h)
    np.testing.assert_allclose(r[0], [[0.9, 0.3], [0.7, 0.9]])
    np.testing.assert_allclose(r[1], [[0.8, 0.2], [0.6, 0.7]])
    # Three tasks with a switch at probe column 1.
    h3 = {**h, "readout_C": np.array([[0.1, 0.2, 0.5], [0.1, 0.3, 0.6]])}
    r3 = cl_metrics.accuracy_matrices(h3, ("readout_A", "readout_B", "readout_C"), (0, 1, 2))
    np.testing.assert_allclose(r3[0], [[0.9, 0.3, 0.1], [0.8, 0.6, 0.2], [0.7, 0.9, 0.5]])
    with pytest.raises(ValueError, match="task_ends"):
        cl_metrics.accuracy_matrices(h3, ("readout_A", "readout_B", "readout_C"))
    with pytest.raises(ValueError, match="readout_D"):
        cl_metrics.accuracy_matrices(h, ("readout_A", "readout_D"))


def test_summary_and_markdown_table():
    results = {
        "methods": {
            "sgd": history([[0.9, 0.7], [0.8, 0.6]], [[0.3, 0.9], [0.2, 0.7]]),
            "teacher": history([[0.9], [0.8]], [[0.5], [0.5]]),  # One probe: before = after.
        }
    }
    s = cl_metrics.summarize(results)
    mean, std = s["sgd"]["forgetting_readout_A"]
    np.testing.assert_allclose([mean, std], [0.2, 0.0], atol=1e-12)
    mean, std = s["sgd"]["after_readout_B"]
    np.testing.assert_allclose([mean, std], [0.8, np.std([0.9, 0.7], ddof=1)])
    np.testing.assert_allclose(s["sgd"]["avg_acc"][0], np.mean([0.8, 0.65]))
    np.testing.assert_allclose(s["sgd"]["bwt"][0], -0.2)
    np.testing.assert_allclose(s["teacher"]["forgetting_readout_A"], (0.0, 0.0))
    assert set(s["sgd"]) == {
        "before_readout_A",
        "after_readout_A",
        "before_readout_B",
        "after_readout_B",
        "forgetting_readout_A",
        "avg_acc",
        "bwt",
    }
    table = cl_metrics.markdown_table(results).splitlines()
    assert len(table) == 4 and table[0].startswith("| method | readout_A before → after")
    assert table[2] == (
        "| sgd | 85.0 ± 7.1 → 65.0 ± 7.1 | 20.0 ± 0.0 | 80.0 ± 14.1 | 72.5 ± 10.6 | -20.0 ± 0.0 |"
    )
    assert table[3].startswith("| teacher | 85.0 ± 7.1 → 85.0 ± 7.1 | 0.0 ± 0.0 |")
