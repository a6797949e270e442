"""Shared pytest setup: CPU only, deterministic, no network."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import jax  # noqa: E402

import l2r  # noqa: E402, F401  (its XLA flags must be set before any test starts the backend)

# Meta-training windows take ~50 s to compile on 2 cores; tests that build several trainers
# for the same config reuse the compiled program from this on-disk cache (~20 s: tracing).
# Subprocesses (the command lines under test) share it through l2r's variable, not the user's
# cache; tests that count compilations point them at a folder of their own.
TEST_CACHE = os.path.join(tempfile.gettempdir(), "l2r-jax-tests")
os.environ.setdefault("L2R_COMPILATION_CACHE", TEST_CACHE)
jax.config.update("jax_compilation_cache_dir", TEST_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
