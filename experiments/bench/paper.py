"""Paper-scale Exp 1 meta-training: `exp1:paper`'s windows (ResNet-32-GN, 4 episodes in flight,
Algorithm 1's meta-update every inner step, teacher batch 64 A + 64 B, student 64), their rate at
each T-BPTT length of the curriculum (5 → 7 → 9), episodes vmapped against mapped, and the time
900 episodes would take. Meant for an accelerator (`launch/gpu_check.sh`); on a CPU shrink it
with `--paper_depth=8 --paper_batch=8 --paper_tbptt=2`.
"""

import math

import jax

from experiments.bench.meta import compiled_window, meta_setup, teacher_step_seconds


def paper_setup(depth, batch, overrides):
    """(config, `MetaRun`) of exp1:paper's episodes, ResNet-`depth`-GN, on random CIFAR-shaped
    uint8 data."""
    from l2r import models
    from l2r.configs import exp1

    m = exp1.get_config("paper").model
    model = models.make_model("resnet", depth=depth, widths=tuple(m.widths), groups=m.groups)
    config, _, run = meta_setup("paper", overrides, (32, 32, 3), n=1024, model=model, batch=batch)
    return config, run


def projected_seconds(config, seconds_by_tbptt) -> float:
    """Window time of `meta.episodes` episodes that all run `meta.inner_steps` steps (none
    restarted early by the loss threshold: an upper bound), along the T-BPTT curriculum."""
    cfg, total = config.meta, 0.0
    for start in range(0, cfg.episodes, cfg.curriculum_every):
        s = min(cfg.tbptt + (start // cfg.curriculum_every) * cfg.tbptt_step, cfg.tbptt_max)
        episodes = min(cfg.curriculum_every, cfg.episodes - start)
        windows = episodes / cfg.num_episodes_parallel * math.ceil(cfg.inner_steps / s)
        total += windows * seconds_by_tbptt[s]
    return total


def bench_paper(depth, batch, tbptts, repeats):
    reps = max(2, repeats // 2)
    e = 4
    title = f"exp1:paper meta-training, ResNet-{depth}-GN, batch {batch}, {e} episodes"
    print(f"\n## {title}, meta-update every inner step, on {jax.devices()[0].device_kind}\n")
    print("| T-BPTT | episodes | compile s | s/window | inner steps/s | vs teacher step |")
    print("|---|---|---|---|---|---|")
    teacher, seconds, config = None, {}, None  # seconds: {(T-BPTT, how): s/window}
    rows = [(s, "mapped", 1) for s in tbptts] + [(tbptts[0], "vmapped", e)]
    for s, how, chunk in rows:
        config, run = paper_setup(depth, batch, dict(episode_chunk=chunk))
        if teacher is None:
            teacher = teacher_step_seconds(run, repeats)
        compile_s, sec = compiled_window(run, s, reps)
        seconds[s, how] = sec
        per_step = sec / (e * s)
        print(f"| {s} | {how} | {compile_s:.1f} | {sec:.3f} | {1 / per_step:.1f} | "
              f"{per_step / teacher:.2f}x |")  # fmt: skip
    print(f"| teacher SGD step ({batch} A + {batch} B) | | | | {1 / teacher:.1f} | 1x |\n")
    vmapped, mapped = seconds[tbptts[0], "vmapped"], seconds[tbptts[0], "mapped"]
    print(f"Episodes vmapped / mapped (time): {vmapped / mapped:.2f}x")
    by_tbptt = {s: sec for (s, how), sec in seconds.items() if how == "mapped"}
    if set(by_tbptt) >= {5, 7, 9}:
        hours = projected_seconds(config, by_tbptt) / 3600
        print(f"projected {config.meta.episodes} episodes (each {config.meta.inner_steps} steps, "
              f"no early restarts, episodes mapped): {hours:.1f} h")  # fmt: skip
