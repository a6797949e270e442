"""Meta-training on two processes joined by `jax.distributed` (2 simulated CPU devices each):
per-host batches, collective Orbax checkpoints, and the same θ as one process on one device;
the checkpoints two processes wrote restore in one process and continue identically."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from distributed_test import ROOT, clean_env, run_processes

COMMON = """
import os, sys
import jax, numpy as np
from absl import logging
from l2r import distributed
logging.set_verbosity(logging.INFO)
distributed.simulated_cpu_devices(int(sys.argv[2]))
distributed.initialize()
sys.path.insert(0, "tests")
from l2r.meta import loop
from smoke_setup import exp1_smoke

work = sys.argv[1]
# Pre-training is cached in `work`: the two processes save it collectively, one restores it.
config, _, _, _, _, model, data_a, data_b, pretrained = exp1_smoke(work)

def run(windows, name, shard=True):
    c = config.copy_and_resolve_references()
    c.meta.max_windows, c.meta.shard_episodes = windows, shard
    _, state, _ = loop.meta_train(c, model, pretrained, data_a, data_b, os.path.join(work, name))
    return jax.tree.map(np.asarray, distributed.local_copy(state.theta)), state
"""

WORKER = COMMON + textwrap.dedent("""
    theta, state = run(3, "multi")
    student = jax.tree.leaves(state.episodes.student)[0]
    assert jax.device_count() == 4 and not student.is_fully_addressable
    assert len(student.addressable_shards) == 2  # this process holds 2 of the 4 episodes
    if distributed.is_main():
        np.savez(os.path.join(work, "multi_theta.npz"), *jax.tree.leaves(theta))
    print("OK", jax.process_index())
""")

SINGLE = COMMON + textwrap.dedent("""
    import json, shutil
    assert jax.process_count() == 1 and jax.device_count() == 1
    theta3, _ = run(3, "single")
    stored = np.load(os.path.join(work, "multi_theta.npz"))
    multi = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    err3 = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(theta3), multi))
    # The checkpoint of window 3 written by two processes, continued here to window 5.
    shutil.copytree(os.path.join(work, "multi"), os.path.join(work, "moved"))
    moved, _ = run(5, "moved")
    stayed, _ = run(5, "single")
    err5 = max(float(np.max(np.abs(a - b)))
               for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(stayed)))
    scale = max(float(np.max(np.abs(a))) for a in multi)
    print(json.dumps({"err3": err3, "err5": err5, "scale": scale}))
""")


@pytest.mark.slow
def test_two_processes_meta_train_like_one_and_checkpoints_move(tmp_path):
    work = str(tmp_path)
    outs = run_processes(WORKER, work, "2", timeout=900)
    for i, out in enumerate(outs):
        assert f"OK {i}" in out, out[-2000:]
    assert os.path.exists(os.path.join(work, "multi_theta.npz"))

    single = subprocess.run(
        [sys.executable, "-c", SINGLE, work, "1"],
        env=clean_env(PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-4000:]
    assert "Reusing Pre-trained checkpoint" in single.stderr  # written by the two processes
    errs = json.loads(single.stdout.strip().splitlines()[-1])
    # θ moved away from its initial value, and both comparisons agree to float tolerance.
    assert errs["scale"] > 0
    np.testing.assert_array_less([errs["err3"], errs["err5"]], 2e-4 * errs["scale"] + 1e-6)
