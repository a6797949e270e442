"""4 simulated CPU devices: episodes sharded give the same θ as one device, checkpoints move
between device counts, one compilation per window shape; Task-B seeds sharded give the same
histories. Everything runs in a subprocess, since the device count is fixed when JAX starts."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    import chex, numpy as np
    sys.path.insert(0, "tests")
    from l2r import compare, config_checks
    from l2r.meta import episodes, loop
    from smoke_setup import exp1_smoke

    assert jax.device_count() == 4, jax.devices()
    work = sys.argv[1]
    config, task_a, task_b, mean, std, model, data_a, data_b, pretrained = exp1_smoke(work)
    # Episodes that cannot be split over the devices: a clear error before any work.
    bad = config.copy_and_resolve_references()
    bad.meta.num_episodes_parallel = 6
    try:
        config_checks.check_meta(bad)
        raise AssertionError("6 episodes on 4 devices passed the config check")
    except config_checks.ConfigError as e:
        assert "make it a multiple of 4" in str(e), e

    # The run's own guard, for callers that skip the config check.
    problem = episodes.two_tasks(config, model, pretrained, data_a, data_b)
    try:
        loop.MetaRun(bad, model, problem)
        raise AssertionError("MetaRun split 6 episodes over 4 devices")
    except ValueError as e:
        assert "cannot be split evenly over 4 devices" in str(e), e

    def run(windows, shard, ckpt):
        c = config.copy_and_resolve_references()
        c.meta.max_windows, c.meta.shard_episodes = windows, shard
        meta_run = loop.MetaRun(c, model, problem)
        # chex.assert_max_traces: a second trace of the sharded window raises. (chex counts per
        # call site across runs, so only the one sharded run here is checked by it.)
        meta_run.max_traces = 1 if shard else None
        return loop.meta_train(c, model, pretrained, data_a, data_b, ckpt, run=meta_run)

    meta_run, sharded, _ = run(3, True, os.path.join(work, "sharded"))
    assert meta_run.mesh is not None and meta_run.mesh.size == 4
    theta_leaf = jax.tree.leaves(sharded.theta)[0]
    assert theta_leaf.sharding.is_fully_replicated
    student = jax.tree.leaves(sharded.episodes.student)[0]
    assert len(student.sharding.device_set) == 4 and not student.sharding.is_fully_replicated
    _, single, _ = run(3, False, os.path.join(work, "single"))
    chex.assert_trees_all_close(sharded.theta, single.theta, rtol=2e-4, atol=1e-6)

    # Saved on 4 devices (window 3), restored on 1 and continued: as the run that stayed on 1
    # (the device layout is not part of the run's key).
    import shutil
    shutil.copytree(os.path.join(work, "sharded"), os.path.join(work, "moved"))
    _, moved, _ = run(5, False, os.path.join(work, "moved"))
    _, stayed, _ = run(5, False, os.path.join(work, "single"))
    chex.assert_trees_all_close(moved.theta, stayed.theta, rtol=2e-4, atol=1e-6)

    # One trace (one compilation) per T-BPTT length, however many windows ran.
    assert dict(meta_run.traces) == {config.meta.tbptt: 1}, meta_run.traces

    # Task-B seeds split over the 4 devices (runs, probes, readout fits): the same histories.
    from l2r.methods import make_method
    c = config.copy_and_resolve_references()
    c.num_seeds = 4
    methods = [make_method(m, model, c.task_b) for m in ("sgd", "lwf", "ewc", "teacher")]
    out = {shard: compare.compare(c, model, pretrained, [task_a, task_b], mean, std, methods,
                                  shard_seeds=shard)
           for shard in (True, False)}
    for name in ("sgd", "lwf", "ewc", "teacher"):
        chex.assert_trees_all_close(out[True]["methods"][name], out[False]["methods"][name],
                                    rtol=1e-4, atol=1e-5)
    print("OK")
    """
)


@pytest.mark.slow
def test_sharded_meta_training_matches_one_device(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = os.path.join(str(tmp_path), "jax-cache")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), cache],
        cwd=root, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]
