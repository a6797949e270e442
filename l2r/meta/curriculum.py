"""Schedules of Algorithm 1: the curriculum of loss threshold and T-BPTT length (§5), and the
budget that ends a meta-training run."""

import ml_collections


def curriculum(cfg: ml_collections.ConfigDict, episodes_done: int) -> tuple[float, int]:
    """(loss threshold, T-BPTT steps) after `episodes_done` episodes (§5: +5 / +2 every 300)."""
    stage = episodes_done // cfg.curriculum_every
    threshold = min(cfg.threshold + stage * cfg.threshold_step, cfg.threshold_max)
    tbptt = min(cfg.tbptt + stage * cfg.tbptt_step, cfg.tbptt_max)
    return float(threshold), int(tbptt)


def finished(cfg: ml_collections.ConfigDict, windows: int, episodes_done: int, seconds) -> bool:
    """Whether the budget is spent: `meta.max_windows` windows, `meta.max_minutes` of window
    time (`seconds`, one entry per window) or `meta.episodes` finished episodes."""
    if cfg.max_windows and windows >= cfg.max_windows:
        return True
    if cfg.max_minutes and sum(seconds) >= 60 * cfg.max_minutes:
        return True
    return episodes_done >= cfg.episodes
