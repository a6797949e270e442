"""l2r's runtime defaults: the XLA:CPU flags it adds (and leaves alone), the compilation cache's
folder, and a resumed run that compiles nothing its first run compiled."""

import os
import re
import subprocess
import sys

import pytest

from l2r import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = runtime.XLA_CPU_FLAGS[0][0]


def test_xla_flags_are_added_once_and_a_users_own_value_wins():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    runtime.apply_xla_flags(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", f"{FLAG}="]
    runtime.apply_xla_flags(env)  # Idempotent.
    assert env["XLA_FLAGS"].count(FLAG) == 1
    own = {"XLA_FLAGS": f"{FLAG}=dot"}
    runtime.apply_xla_flags(own)
    assert own["XLA_FLAGS"] == f"{FLAG}=dot"
    off = {"L2R_XLA_DEFAULTS": "0"}
    runtime.apply_xla_flags(off)
    assert "XLA_FLAGS" not in off


def fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "L2R_XLA_DEFAULTS")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_import_sets_the_flags_before_jax_exists_and_warns_when_too_late():
    out = fresh_python(
        "import sys, os, l2r; assert 'jax' not in sys.modules; "
        "print(os.environ['XLA_FLAGS'], os.environ['JAX_COMPILATION_CACHE_DIR'])"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{FLAG}=" in out.stdout
    late = fresh_python("import jax; jax.numpy.ones(1).block_until_ready(); import l2r")
    assert late.returncode == 0, late.stderr[-2000:]
    assert "l2r was imported after JAX started its backend" in late.stderr


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("L2R_COMPILATION_CACHE", str(tmp_path / "c"))
    assert runtime.cache_dir() == str(tmp_path / "c")
    monkeypatch.setenv("L2R_COMPILATION_CACHE", "off")
    assert runtime.cache_dir() is None
    monkeypatch.delenv("L2R_COMPILATION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.cache_dir() == str(tmp_path / "xdg" / "l2r" / "jax")


MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)' with key '([^']+)'")


def run_logged(workdir, cache, *overrides) -> str:
    """exp1:smoke through the command line with every persistent-cache miss logged."""
    env = {**os.environ, "JAX_EXPLAIN_CACHE_MISSES": "1", "L2R_COMPILATION_CACHE": str(cache)}
    for own in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(own, None)  # l2r's defaults, as a user gets them.
    cmd = [sys.executable, "-m", "experiments.run", "--config=exp1:smoke", f"--workdir={workdir}",
           "--config.meta.checkpoint_minutes=0", *overrides]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


@pytest.mark.slow
def test_a_resumed_run_compiles_nothing_that_the_first_run_compiled(tmp_path):
    """The first run stops after 2 of the smoke preset's windows; raising the budget to 4
    resumes it in a new process, which finds every program it shares with the first run in
    the compilation cache (the default one: no flag)."""
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    first = run_logged(workdir, cache, "--config.meta.max_windows=2")
    compiled = {key: name for name, key in MISS.findall(first)}
    assert "jit_window" in compiled.values(), sorted(set(compiled.values()))
    resumed = run_logged(workdir, cache, "--config.meta.max_windows=4", "--overwrite")
    assert "resumes from" in resumed
    again = {key: name for name, key in MISS.findall(resumed)}
    assert not again.keys() & compiled.keys()
    assert "jit_window" not in again.values(), sorted(set(again.values()))


@pytest.mark.slow
def test_the_command_line_flag_names_or_turns_off_the_cache(tmp_path):
    """`--compilation_cache=DIR` wins over `$L2R_COMPILATION_CACHE`; `=off` turns it off."""

    def run(flag, env_cache):
        env = {**os.environ, "L2R_COMPILATION_CACHE": str(env_cache)}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd = [sys.executable, "-m", "experiments.run", "--config=fig1:smoke",
               f"--workdir={env_cache}_run", "--config.task_b.methods=('sgd',)",
               "--config.num_seeds=1", flag]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]

    run(f"--compilation_cache={tmp_path / 'named'}", tmp_path / "from_env")
    assert os.listdir(tmp_path / "named") and not (tmp_path / "from_env").exists()
    run("--compilation_cache=off", tmp_path / "from_env_2")
    assert not (tmp_path / "from_env_2").exists()
