"""Multi-process runtime: start `jax.distributed` only when launched on several processes.

JAX is multi-controller: the same program runs once per host (TPU pod), per GPU or per node
(SLURM), and the processes meet through `jax.distributed.initialize()`. `initialize` works out
from the environment whether this is such a launch (see `detect`); a plain
`python -m experiments.run` stays one process and nothing is started.

Ordering: `simulated_cpu_devices` and `initialize` configure the JAX backend, so they must run
before anything initialises one: `jax.devices()`, `jax.device_put`, any computation, and also
`jax.process_index()` / `is_main()`. Importing jax (and l2r) is fine. `experiments/run.py`
calls them first thing in `main`.

Environment read by `detect`, first match wins:
  L2R_DISTRIBUTED=off                never start jax.distributed;
  L2R_NUM_PROCESSES=N (N > 1), L2R_COORDINATOR=host:port, L2R_PROCESS_ID=i
                                     explicit launch (e.g. `launch/local.sh --processes=N`);
  L2R_DISTRIBUTED=auto               let JAX detect the cluster (`launch/tpu_pod.sh` sets it:
                                     a GCE TPU pod is only visible through its metadata server);
  SLURM_NTASKS > 1 inside `srun`     SLURM, one process per task (`launch/slurm.sbatch`);
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing several hosts, or
  MEGASCALE_COORDINATOR_ADDRESS      a multi-host (GKE or multislice) TPU.
"""

import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Launch(NamedTuple):
    """How this process was launched: `kind`, and the kwargs for `jax.distributed.initialize`."""

    kind: str  # "explicit", "auto", "slurm" or "tpu".
    kwargs: dict


_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except KeyError:
        raise ValueError(f"{name} is not set.") from None
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer.") from None


def _explicit(environ: Mapping[str, str]) -> Launch | None:
    """The L2R_* launch, or None for one process; raises ValueError when it is incomplete."""
    names = ("L2R_NUM_PROCESSES", "L2R_PROCESS_ID", "L2R_COORDINATOR")
    given = [n for n in names if environ.get(n)]
    if given == ["L2R_NUM_PROCESSES"] and _int_env(environ, "L2R_NUM_PROCESSES") == 1:
        return None
    if len(given) < len(names):
        missing = ", ".join(n for n in names if n not in given)
        raise ValueError(f"{', '.join(given)} set but {missing} not: set all three or none.")
    num, pid = _int_env(environ, "L2R_NUM_PROCESSES"), _int_env(environ, "L2R_PROCESS_ID")
    if not 0 <= pid < num:
        raise ValueError(f"L2R_PROCESS_ID={pid} is outside [0, L2R_NUM_PROCESSES={num}).")
    if num == 1:
        return None
    coordinator = environ["L2R_COORDINATOR"]
    if ":" not in coordinator:
        raise ValueError(f"L2R_COORDINATOR={coordinator!r} needs a port: host:port.")
    kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
    # Exactly these settings: no SLURM/MPI detection may override them.
    return Launch("explicit", {**kwargs, "cluster_detection_method": "deactivate"})


def _hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def detect(environ: Mapping[str, str] | None = None) -> Launch | None:
    """Reads the environment (see the module docstring); None means a single process.

    Raises:
      ValueError: L2R_DISTRIBUTED or the explicit L2R_* variables are set wrongly.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get("L2R_DISTRIBUTED", "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"L2R_DISTRIBUTED={mode!r}: use 'auto', 'off' or leave it unset.")
    if mode == "off":
        return None
    if any(environ.get(n) for n in ("L2R_NUM_PROCESSES", "L2R_PROCESS_ID", "L2R_COORDINATOR")):
        return _explicit(environ)  # None for L2R_NUM_PROCESSES=1: one process, nothing else.
    if mode == "auto":
        return Launch("auto", {})
    if "SLURM_NTASKS" in environ and _int_env(environ, "SLURM_NTASKS") > 1:
        if all(v in environ for v in _SLURM_STEP_VARS):
            # JAX gives each task the GPU of its SLURM_LOCALID unless JAX_LOCAL_DEVICE_IDS says
            # otherwise (launch/slurm.sbatch sets it for one task per node).
            return Launch("slurm", {"cluster_detection_method": "slurm"})
        logging.warning(
            "SLURM_NTASKS=%s but this process was not started by srun: running as one process. "
            "Launch every task with srun (launch/slurm.sbatch) to use them all.",
            environ["SLURM_NTASKS"],
        )
        return None
    hosts = max(_hosts(environ.get(v)) for v in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"))
    if hosts > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch("tpu", {})
    return None


def initialize(environ: Mapping[str, str] | None = None) -> Launch | None:
    """Starts `jax.distributed` when `detect` finds a multi-process launch; else does nothing.

    Call before anything initialises a JAX backend (see the module docstring). Calling it again
    after a successful start does nothing.

    Returns:
      The launch that was started, or None for a single process.
    """
    if jax.distributed.is_initialized():
        return None
    launch = detect(environ)
    if launch is None:
        return None
    logging.info("Starting jax.distributed (%s launch) %s", launch.kind, launch.kwargs)
    jax.distributed.initialize(**launch.kwargs)
    return launch


def is_main() -> bool:
    """True in process 0, the one that writes logs, tables and figures (initialises a backend)."""
    return jax.process_index() == 0


def describe() -> str:
    """One line on the runtime, e.g. 'process 0 of 1, 4 local / 4 global cpu devices'."""
    return (
        f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} "
        f"local / {jax.device_count()} global {jax.default_backend()} devices"
    )


REPLICATED = jax.P()


def host_local_to_global(local, mesh: jax.sharding.Mesh, spec=REPLICATED):
    """Assembles global arrays from each process's part of them.

    Every process passes its own data (numpy or host arrays): with `spec=jax.P("data")` the
    leading axis is split over the mesh axis "data" and each process holds the rows that
    belong to its devices, so the global leading size is the sum over processes; along an axis
    the spec leaves unsplit (all of them with the default `jax.P()`), every process passes the
    same full data. With one process this is `jax.device_put(local, NamedSharding(mesh, spec))`.

    Args:
      local: an array or a pytree of arrays, this process's part.
      mesh: the device mesh over all processes, e.g. `jax.make_mesh((jax.device_count(),),
        ("data",))`.
      spec: a `jax.P` for every leaf, or a pytree of them matching a prefix of `local`.

    Returns:
      `local`'s structure with global `jax.Array` leaves sharded as `NamedSharding(mesh, spec)`.
    """
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    specs = jax.tree.broadcast(spec, local, is_leaf=is_spec)
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs, is_leaf=is_spec)
    return jax.make_array_from_process_local_data(shardings, local)


def replicate(tree, mesh: jax.sharding.Mesh):
    """`tree` (the same on every process) replicated on every device of `mesh`.

    One process: a device-to-device copy. Several: each process places its own copies from
    host memory (`host_local_to_global` with `jax.P()`), nothing crosses hosts.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, jax.sharding.NamedSharding(mesh, REPLICATED))
    return host_local_to_global(jax.device_get(tree), mesh)


def process_rows(mesh: jax.sharding.Mesh, size: int) -> slice:
    """The rows of a leading axis of `size` split over `mesh`'s 'data' axis (`jax.P("data")`)
    that this process's devices hold: what it passes to `host_local_to_global`.

    Raises:
      ValueError: this process's rows are not one contiguous block (a mesh whose device order
        interleaves processes; `jax.make_mesh` never builds one).
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    index = sharding.addressable_devices_indices_map((size,)).values()
    blocks = sorted({(i[0].start or 0, size if i[0].stop is None else i[0].stop) for i in index})
    for (_, stop), (start, _) in zip(blocks, blocks[1:], strict=False):
        if stop != start:
            raise ValueError(f"Process {jax.process_index()} holds rows {blocks} of {size}, not "
                             "one block: build the mesh with jax.make_mesh.")  # fmt: skip
    return slice(blocks[0][0], blocks[-1][1])


def split_rows(whole, mesh: jax.sharding.Mesh):
    """Global arrays split over 'data' along the leading axis from host arrays that every
    process computed whole: each process passes only its own rows (`process_rows`)."""
    size = jax.tree.leaves(whole)[0].shape[0]
    rows = process_rows(mesh, size)
    local = jax.tree.map(lambda a: np.asarray(a)[rows], whole)
    return host_local_to_global(local, mesh, jax.P("data"))


def local_copy(tree):
    """Fully replicated global arrays as arrays on this process's first device, for work that
    each process does alone (meta-test, figures); other leaves are returned unchanged.

    Raises:
      ValueError: a leaf is split over devices of other processes (gather it first).
    """

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if not x.is_fully_replicated:
            raise ValueError(f"An array of shape {x.shape} sharded as {x.sharding} is split "
                             "over several processes; it has no local copy.")  # fmt: skip
        return x.addressable_data(0)

    return jax.tree.map(one, tree)


def gather(tree):
    """Host (numpy) copies of global arrays, each whole, on every process: a collective, so
    every process must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def simulated_cpu_devices(n: int) -> None:
    """Makes JAX run on `n` simulated CPU devices, for testing sharded code on one machine.

    JAX is restricted to the CPU platform, split into `n` devices (through `jax_num_cpu_devices`,
    what `XLA_FLAGS=--xla_force_host_platform_device_count=n` also does). Must run before
    anything initialises a backend (module docstring): JAX raises otherwise. Under a
    multi-process launch each process gets `n` devices.
    """
    if n < 1:
        raise ValueError(f"Need at least one CPU device, got {n}.")
    jax.config.update("jax_num_cpu_devices", n)  # Raises once a backend exists.
    jax.config.update("jax_platforms", "cpu")
