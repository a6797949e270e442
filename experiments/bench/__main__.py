r"""Benchmarks whose figures are ratios measured side by side in one process.

  python -m experiments.bench                      # everything below
  python -m experiments.bench --only=sgd           # SGD step rates (ResNet-32-GN, cpu net)
  python -m experiments.bench --only=probe         # all probe fits of fig1:cpu vs scikit-learn
  python -m experiments.bench --only=fits          # readout solvers and layouts, 20 fits
  python -m experiments.bench --only=meta          # meta-training rates and compiled memory
  python -m experiments.bench --only=memory        # compiled memory alone (T-BPTT, episodes)
  python -m experiments.bench --only=torch         # ResNet-32-GN SGD step: l2r vs PyTorch eager
  python -m experiments.bench --only=flops         # achieved FLOP/s against the matmul peak
  python -m experiments.bench --only=scaling       # meta-training on 1, 2, 4, 8 CPU devices
  python -m experiments.bench --only=paper         # exp1:paper meta-training rate (accelerators)

Timings on shared machines drift 10-40% between runs (PERF-NOTES.md): compare rows of one run,
not rows of different runs. Each timing is the median of `--repeats` after a warm-up call.
The torch section needs PyTorch: `pip install -e '.[bench]'`. A quick check of the new sections
at small sizes: `--depth=8 --batch=8 --matmul_size=512 --episodes=1 --tbptt=2 --repeats=1
--devices=1,2 --scaling_episodes=2 --memory_tbptt= --memory_episodes=16 --fits=2,600,8,3`.
"""

import time

from absl import app, flags

import l2r  # noqa: F401  (first: its XLA flags must be set before JAX starts a backend)
from experiments.bench.common import machine
from experiments.bench.flops import bench_flops
from experiments.bench.meta import bench_memory, bench_meta
from experiments.bench.paper import bench_paper
from experiments.bench.probe import bench_probe, print_fits
from experiments.bench.scaling import bench_scaling, scaling_worker
from experiments.bench.sgd import bench_sgd
from experiments.bench.torch_ref import bench_torch
from l2r import runtime

FLAGS = flags.FLAGS
SECTIONS = ("sgd", "probe", "fits", "meta", "memory", "torch", "flops", "scaling", "paper")
flags.DEFINE_list(
    "only",
    ["sgd", "probe", "fits", "meta", "torch", "flops", "scaling"],
    "Sections to run: sgd, probe, fits, meta (rates, then the memory table), memory (the table "
    "alone), torch, flops, scaling, paper (not by default: sized for an accelerator).",
)
flags.DEFINE_integer("repeats", 5, "Timed repetitions per measurement (median reported).")
flags.DEFINE_integer("batch", 128, "torch, flops: batch of the ResNet-GN SGD step.")
flags.DEFINE_integer("depth", 32, "torch, flops: ResNet depth (6n+2) of that step.")
flags.DEFINE_integer("matmul_size", 2048, "flops: side of the float32 matmul giving the peak.")
flags.DEFINE_integer("episodes", 4, "flops: episodes in flight in the timed meta-window.")
flags.DEFINE_integer("tbptt", 5, "flops, scaling: T-BPTT steps of the meta-training window.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "scaling: simulated CPU device counts.")
flags.DEFINE_integer("scaling_episodes", 8, "scaling: episodes in flight (strong scaling).")
flags.DEFINE_string("scaling_preset", "smoke", "scaling: exp1 preset of the net (smoke, cpu).")
flags.DEFINE_bool("weak_scaling", True, "scaling: also 2 episodes per device (weak scaling).")
flags.DEFINE_list("memory_tbptt", ["2", "5", "9", "17"], "memory: T-BPTT rows (2 episodes).")
flags.DEFINE_list("fits", ["20", "15000", "64", "5"], "fits: number of fits, N, D, classes.")
flags.DEFINE_integer("paper_depth", 32, "paper: ResNet depth (6n+2).")
flags.DEFINE_integer("paper_batch", 64, "paper: student batch and each half of the teacher's.")
flags.DEFINE_list("paper_tbptt", ["5", "7", "9"], "paper: T-BPTT lengths (the curriculum's).")
flags.DEFINE_list("memory_episodes", ["1", "2", "4", "8", "16"], "memory: episode rows (T-BPTT 5).")


def main(argv):
    del argv
    if unknown := set(FLAGS.only) - set(SECTIONS) - {"_scaling_worker"}:
        raise app.UsageError(f"Unknown --only {sorted(unknown)}; sections: {', '.join(SECTIONS)}.")
    if "_scaling_worker" in FLAGS.only:  # A process of the scaling section; no JAX before this.
        (devices,) = FLAGS.devices
        scaling_worker(
            int(devices),
            FLAGS.scaling_episodes,
            FLAGS.scaling_preset,
            FLAGS.tbptt,
            FLAGS.weak_scaling,
            FLAGS.repeats,
        )
        return
    runtime.set_compilation_cache(None)  # Compiles are part of what is measured.
    print(f"# l2r benchmarks — {time.strftime('%Y-%m-%d')} — {machine()}")
    if "sgd" in FLAGS.only:
        bench_sgd(FLAGS.repeats)
    if "probe" in FLAGS.only:
        bench_probe(FLAGS.repeats)
    if "fits" in FLAGS.only:
        print_fits(*(int(v) for v in FLAGS.fits))
    if "meta" in FLAGS.only:
        bench_meta(FLAGS.repeats)
    if "meta" in FLAGS.only or "memory" in FLAGS.only:
        bench_memory([int(s) for s in FLAGS.memory_tbptt], [int(e) for e in FLAGS.memory_episodes])
    if "torch" in FLAGS.only:
        bench_torch(FLAGS.depth, FLAGS.batch, FLAGS.repeats)
    if "paper" in FLAGS.only:
        tbptts = [int(s) for s in FLAGS.paper_tbptt]
        bench_paper(FLAGS.paper_depth, FLAGS.paper_batch, tbptts, FLAGS.repeats)
    if "flops" in FLAGS.only:
        bench_flops(
            FLAGS.depth, FLAGS.batch, FLAGS.matmul_size, FLAGS.episodes, FLAGS.tbptt, FLAGS.repeats
        )
    if "scaling" in FLAGS.only:
        bench_scaling(
            [int(n) for n in FLAGS.devices],
            FLAGS.scaling_episodes,
            FLAGS.scaling_preset,
            FLAGS.tbptt,
            FLAGS.weak_scaling,
            FLAGS.repeats,
        )


if __name__ == "__main__":
    app.run(main)
