"""How l2r sets up XLA: CPU flags measured to be faster, and JAX's persistent compilation cache.

Both are applied when `l2r` is imported, through environment variables when JAX is not imported
yet (so `import l2r` stays cheap) and through `jax.config` when it is. Neither changes what is
computed, only how fast; both can be turned off.

* XLA:CPU flags (`XLA_CPU_FLAGS`). jaxlib 0.10.2 hands elementwise and reduction fusions to
  YNNPACK by default; on our 2-core machines that made the steps of l2r's GroupNorm networks
  1.3-1.5x slower than XLA's own fused loops (docs/benchmarks.md, 2026-12-05). A flag the user
  already put in `XLA_FLAGS` is left as it is; `L2R_XLA_DEFAULTS=0` adds none. XLA reads
  `XLA_FLAGS` once, when its first backend starts: import l2r before running anything in JAX.
* Persistent compilation cache: every program (`MIN_COMPILE_SECONDS`) is written to
  `cache_dir()` and read back by later processes, so a rerun, a resumed run, or the next length
  of the T-BPTT curriculum on the same machine skips compilations it has done once. It is not
  bounded (JAX's default; `JAX_COMPILATION_CACHE_MAX_SIZE=<bytes>` bounds it, least recently
  used first, with the `filelock` package installed). `L2R_COMPILATION_CACHE` names
  another folder, `L2R_COMPILATION_CACHE=off` turns it off; a cache folder the user set for JAX
  (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) wins. `l2r-run --compilation_cache=...` does
  the same per run. The cache is JAX's own; its entries are keyed by the program, the jaxlib
  version, the devices and the XLA flags, so a stale entry is never used.
"""

import os
import sys

# (flag, value) pairs added to XLA_FLAGS unless the flag is already there.
XLA_CPU_FLAGS = (("--xla_cpu_experimental_ynn_fusion_type", ""),)
MIN_COMPILE_SECONDS = 0.0  # Every program: a resumed run then compiles nothing the first did.
OFF = ("", "0", "off", "none", "false")


def cache_path(value: str) -> str | None:
    """A cache folder as the user wrote it (`$L2R_COMPILATION_CACHE`, `--compilation_cache`):
    its absolute path, or None for `off` (or "", 0, none, false)."""
    return None if value.strip().lower() in OFF else os.path.abspath(os.path.expanduser(value))


def cache_dir() -> str | None:
    """The compilation cache folder l2r uses by default: `$L2R_COMPILATION_CACHE`, else
    `$XDG_CACHE_HOME/l2r/jax` (`~/.cache/l2r/jax`); None when turned off."""
    env = os.environ.get("L2R_COMPILATION_CACHE")
    if env is not None:
        return cache_path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "l2r", "jax")


def apply_xla_flags(environ=os.environ) -> None:
    """Adds `XLA_CPU_FLAGS` to `XLA_FLAGS` (those not set there already), unless
    `L2R_XLA_DEFAULTS=0`."""
    if environ.get("L2R_XLA_DEFAULTS", "1").strip().lower() in OFF:
        return
    flags = environ.get("XLA_FLAGS", "").split()
    have = {f.split("=", 1)[0] for f in flags}
    new = [f"{name}={value}" for name, value in XLA_CPU_FLAGS if name not in have]
    if not new:
        return
    environ["XLA_FLAGS"] = " ".join(flags + new)
    if environ is os.environ and "jax" in sys.modules:
        from jax._src import xla_bridge  # No public API says whether a backend has started.

        if xla_bridge.backends_are_initialized():
            import warnings

            warnings.warn(
                f"l2r was imported after JAX started its backend, so XLA ignores {new}; "
                "import l2r first for l2r's CPU speed (l2r/runtime.py).",
                stacklevel=3,
            )


def set_compilation_cache(path: str | None) -> None:
    """Points JAX's persistent compilation cache at `path` (None: off), caching the programs
    that take longer than `MIN_COMPILE_SECONDS` to compile. Call it before the programs to
    cache are compiled."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)


def apply_defaults() -> None:
    """What `import l2r` does: the XLA flags, then the default compilation cache unless one is
    set already. Cheap: no JAX import when JAX is not imported yet."""
    apply_xla_flags()
    path = cache_dir()
    if path is None:
        return
    if "jax" in sys.modules:
        import jax

        if jax.config.jax_compilation_cache_dir is None:
            set_compilation_cache(path)
    elif "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        min_seconds = str(MIN_COMPILE_SECONDS)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", min_seconds)
