"""The curriculum of threshold and T-BPTT length, and the budget that ends a run."""

from l2r.configs import common
from l2r.meta.curriculum import curriculum, finished


def test_curriculum_follows_the_paper():
    cfg = common.meta_config()  # §5 Exp 1: 20 / 5, +5 / +2 every 300 episodes, up to 30 / 9.
    assert curriculum(cfg, 0) == (20.0, 5)
    assert curriculum(cfg, 299) == (20.0, 5)
    assert curriculum(cfg, 300) == (25.0, 7)
    assert curriculum(cfg, 600) == (30.0, 9)
    assert curriculum(cfg, 10_000) == (30.0, 9)


def test_a_run_ends_at_the_first_budget_spent():
    cfg = common.meta_config()
    cfg.episodes, cfg.max_windows, cfg.max_minutes = 10, 0, 0.0
    assert not finished(cfg, 1000, 9, [100.0])
    assert finished(cfg, 0, 10, [])
    cfg.max_windows = 5
    assert finished(cfg, 5, 0, []) and not finished(cfg, 4, 0, [])
    cfg.max_minutes = 1.0
    assert finished(cfg, 0, 0, [30.0, 30.0]) and not finished(cfg, 0, 0, [30.0])
