"""Shared pytest setup: CPU only, deterministic, no network."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Meta-training windows take ~50 s to compile on 2 cores; tests that build several trainers
# for the same config reuse the compiled program from this on-disk cache (~20 s: tracing).
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "l2r-jax-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
