"""Episodes over devices: meta-training windows on 1, 2, 4, 8 simulated CPU devices.

`bench_scaling` runs one process per device count (`python -m experiments.bench
--only=_scaling_worker`), since JAX fixes the count when it starts; each runs `scaling_worker`.
"""

import json
import os
import subprocess
import sys

import jax

from experiments.bench.meta import IMAGE_SHAPES, meta_setup, window_seconds

_LAYOUTS = {
    "mapped": "one after another (the CPU default)",
    "vmapped": "vmapped",
    "sharded": "split over the devices, vmapped on each",
}


def scaling_worker(devices, episodes, preset, tbptt, weak, repeats):
    """One process of `bench_scaling` (the device count is fixed once JAX starts): times
    windows on `devices` simulated CPU devices and prints a JSON line per configuration."""
    from l2r import distributed

    distributed.simulated_cpu_devices(devices)  # Before anything starts a JAX backend.
    configs = [(episodes, None)]
    if devices == 1:  # What each device of a mesh runs: its episodes vmapped.
        configs.append((episodes, episodes))
    if weak and 2 * devices != episodes:
        configs.append((2 * devices, None))
    for e, chunk in configs:
        over = dict(num_episodes_parallel=e, update_every_step=False, episode_chunk=chunk or 0)
        _, _, trainer = meta_setup(preset, over, IMAGE_SHAPES[preset])
        layout = "sharded" if trainer.mesh is not None else "vmapped" if chunk else "mapped"
        sec = window_seconds(trainer, tbptt, max(2, repeats // 2))
        line = dict(devices=jax.device_count(), episodes=e, layout=layout, seconds=sec)
        print(json.dumps(line), flush=True)


def scaling_tables(results, episodes, tbptt, weak):
    """Prints the strong- and weak-scaling tables of the workers' `results` (dicts)."""
    rate = lambda r: r["episodes"] * tbptt / r["seconds"]  # noqa: E731  episode-steps/s
    one = {r["episodes"]: r for r in results if r["devices"] == 1 and r["layout"] == "mapped"}
    print(f"Strong scaling: {episodes} episodes in flight.\n")
    print(
        "| devices: episodes | episodes | s/window | episode-steps/s | speed-up vs 1 device | "
        "efficiency |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["episodes"] == episodes:
            up = one[episodes]["seconds"] / r["seconds"]
            print(
                f"| {r['devices']}: {_LAYOUTS[r['layout']]} | {r['episodes']} | "
                f"{r['seconds']:.3f} | {rate(r):.1f} | {up:.2f}x | {100 * up / r['devices']:.0f}% |"
            )
    if not weak:
        return
    print("\nWeak scaling: 2 episodes per device; ideal: the time of 1 device at every count.\n")
    print(
        "| devices | episodes | s/window | episode-steps/s | throughput vs 1 device | efficiency |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["episodes"] == 2 * r["devices"] and r["layout"] != "vmapped":
            base = one[2]
            print(
                f"| {r['devices']} | {r['episodes']} | {r['seconds']:.3f} | {rate(r):.1f} | "
                f"{rate(r) / rate(base):.2f}x | {100 * base['seconds'] / r['seconds']:.0f}% |"
            )


def bench_scaling(device_counts, episodes, preset, tbptt, weak, repeats):
    """Meta-training windows with the episodes split over 1, 2, 4, 8 simulated CPU devices.

    exp1:smoke's net by default: each device count is a fresh process that compiles its windows
    (2-3 per process), which keeps the section to minutes on 2 cores; the cpu net takes ~4x
    longer to compile.
    """
    if 1 not in device_counts or any(episodes % n for n in device_counts):
        raise ValueError(
            f"--devices must include 1 and divide --scaling_episodes={episodes}; got "
            f"{device_counts}."
        )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    xla_flags = env.get("XLA_FLAGS", "").split()  # The workers set their own device count.
    env["XLA_FLAGS"] = " ".join(f for f in xla_flags if "force_host_platform_device" not in f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = []
    for n in device_counts:
        args = (
            f"--devices={n} --scaling_episodes={episodes} --scaling_preset={preset} "
            f"--tbptt={tbptt} --repeats={repeats} --{'' if weak else 'no'}weak_scaling"
        )
        cmd = [sys.executable, "-m", "experiments.bench", "--only=_scaling_worker", *args.split()]
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        results += [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]

    cores = os.cpu_count()
    print(
        f"\n## Meta-training throughput on {', '.join(map(str, device_counts))} simulated CPU "
        f"devices, exp1:{preset} net, T-BPTT {tbptt}, one meta-update per window\n"
    )
    scaling_tables(results, episodes, tbptt, weak)
    print(
        f"\nThe simulated devices share this machine's {cores} CPU cores (os.cpu_count()), "
        "which one device already keeps busy (XLA:CPU's intra-op thread pool): simulated "
        "devices add no compute, so the ideal here is 1.00x at every count, and these figures "
        "measure the cost of partitioning (per-device programs competing for the same cores, "
        "the all-reduce of the meta-gradient). A mesh vmaps each device's episodes, which "
        "is slower per episode on CPU than one after another (grouped convs, see the meta "
        "section); the 'vmapped' row is that layout on one device. Real scaling needs real "
        "devices (GPUs, TPU cores)."
    )
