"""Algorithm 1's host loop: the meta-state on the devices, compiled windows, the curriculum,
Orbax checkpoints keyed by everything the run reads, resume, history and progress lines.

Episodes are split over a 1-D device mesh ('data') when there are several devices
(`training.RunAxis`); θ, its optimiser state and the counters are replicated, so the mean
meta-gradient is an all-reduce. The batches of a window are made on the host from the window
index alone (`Problem.batches`), so a resumed run sees exactly the data it would have.
"""

import collections
import functools
import os
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from l2r import checkpoint, console, distributed, keys, models, rng, tracking, training
from l2r.meta import episodes as episodes_lib
from l2r.meta import window as window_lib
from l2r.meta.curriculum import curriculum, finished
from l2r.meta.window import MetaState

# `meta` fields that only bound how long a run goes on (or where it runs): raising them resumes
# the same run, so they stay out of its key.
BUDGET_FIELDS = ("max_windows", "max_minutes", "checkpoint_minutes", "episodes",
                 "shard_episodes", "episode_chunk")  # fmt: skip
# Meta-validation's history: the window after which θ was scored, and its score.
VALIDATION = ("validation_window", "validation_score")
HISTORY = ("window", "episodes_done", "threshold", "tbptt", "loss", "restarts", "skipped",
           "seconds")  # fmt: skip
# What each window streams to its writer (TensorBoard run `meta`), with the problem's metrics.
STREAMED = ("loss", "threshold", "tbptt", "restarts", "skipped", "episodes_done", "seconds")


class MetaRun:
    """One episodes problem set up on the devices: its inputs placed once, the state's layout,
    and the jitted windows (one per T-BPTT length, compiled on first use)."""

    def __init__(self, config, model: models.Model, problem: episodes_lib.Problem):
        self.cfg, self.seed, self.model, self.problem = config.meta, config.seed, model, problem
        self.ml, self.lr = problem.ml, problem.learning_rate
        self.opt = window_lib.make_optimizer(self.cfg)
        # Episodes split over the devices; on each, its share is vmapped (GSPMD partitions the
        # vmapped axis), and the mean meta-gradient becomes an all-reduce.
        self.axis = training.RunAxis(
            self.cfg.num_episodes_parallel,
            "parallel episodes (meta.num_episodes_parallel)",
            enabled=self.cfg.get("shard_episodes", True),
            strict=True,
        )
        self.mesh = self.axis.mesh
        # Episodes mapped together: a device's whole share on a mesh; else `episode_chunk`
        # (0: the backend's default).
        self.chunk = self.axis.chunk or self.cfg.get("episode_chunk", 0) or None
        # Replicated on every device once: left uncommitted, they would be copied every window.
        self.inputs = self.axis.replicate(problem.inputs)
        self.traces = collections.Counter()  # T-BPTT length -> times its window was traced
        # When set, a window traced more than this many times raises (`chex.assert_max_traces`)
        # instead of warning: tests set 1 to prove that nothing recompiles after the first.
        # chex counts traces per call site, across runs: set it on one run a process.
        self.max_traces: int | None = None
        self._windows = {}
        self.best_theta = None  # The θ meta-validation kept (`meta_train(validate=...)`).

    @functools.cached_property
    def data_digest(self) -> dict:
        """Content digests of what the episodes read: the data, the w0 networks, the tasks."""
        inp = self.problem.inputs
        return {"data_a": training.train_digest(inp.data_a),
                "data_b": training.train_digest(inp.data_b),
                "pretrained": checkpoint.digest(inp.pretrained),
                "class_table": checkpoint.digest(inp.class_table)}  # fmt: skip

    def state_sharding(self):
        """θ, its optimiser state and the counters replicated, the episodes split over the
        mesh's 'data' axis (a pytree prefix of `MetaState`); one device without a mesh."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        rep, split = training.replicated(self.mesh), training.split(self.mesh)
        return MetaState(rep, rep, split, rep, rep, rep, rep, rep)

    def init(self) -> MetaState:
        """The state before the first window, laid out as the window's outputs are (otherwise
        the second window compiles again): on a mesh, built by one program whose outputs are
        already global arrays, so that it works the same with one process or many."""
        e = self.cfg.num_episodes_parallel
        theta = self.axis.replicate(self.ml.init(rng.key_for(self.seed, "theta")))

        def build(theta, inputs):
            i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
            eps = self.problem.fresh(inputs, jnp.arange(e, dtype=jnp.int32))
            return MetaState(theta, self.opt.init(theta), eps, i32(0), i32(e), i32(0), i32(0),
                             i32(0))  # fmt: skip

        return jax.jit(build, out_shardings=self.state_sharding())(theta, self.inputs)

    def window(self, num_steps: int):
        """The jitted `num_steps`-step window (`window.make_window`), compiled on first use."""
        if num_steps not in self._windows:
            self._windows[num_steps] = self._jit(num_steps)
        return self._windows[num_steps]

    def is_compiled(self, num_steps: int) -> bool:
        """Whether the `num_steps`-step window has been built (its first call compiles it)."""
        return num_steps in self._windows

    def _count_trace(self, num_steps: int) -> None:
        self.traces[num_steps] += 1
        if self.traces[num_steps] > 1:
            logging.warning("The %d-step meta-training window was traced again (%d times): "
                            "argument shapes or shardings changed between windows.",
                            num_steps, self.traces[num_steps])  # fmt: skip

    def _jit(self, num_steps: int):
        window = window_lib.make_window(self.problem, self.model, self.cfg, self.chunk,
                                        on_trace=self._count_trace)  # fmt: skip

        # The state is donated (updated in place) on accelerators, where memory is short; not
        # on CPU, where tests and callers reuse a state after a window.
        donate = (0,) if jax.default_backend() != "cpu" else ()
        if self.max_traces:
            window = chex.assert_max_traces(window, n=self.max_traces)
        if self.mesh is None:
            return jax.jit(window, donate_argnums=donate)
        rep, split = training.replicated(self.mesh), training.split(self.mesh)
        state_sh = self.state_sharding()
        return jax.jit(
            window,
            in_shardings=(state_sh, rep, split, rep),
            out_shardings=(state_sh, {"loss": rep, "losses": split, "restarted": split}),
            donate_argnums=donate,
        )

    def call_window(self, state: MetaState, batches, threshold):
        """Runs the jitted window on host-made batch indices (idx_a [E, s, Ba], idx_b [E, s, Bb])
        and a threshold ([] or [E]).

        On a mesh each process places only its own episodes' rows of the indices (every
        process draws them whole, so that the data stream does not depend on the number of
        processes) and `jax.make_array_from_process_local_data` assembles the global arrays.
        """
        window = self.window(batches[0].shape[1])
        batches = self.axis.split(tuple(batches))
        threshold = self.axis.replicate(np.asarray(threshold, np.float32))
        return window(state, self.inputs, batches, threshold)

    def run_window(self, state: MetaState):
        """The next window of the curriculum: (state, metrics, threshold, T-BPTT steps)."""
        problem = self.problem
        threshold, s = curriculum(self.cfg, int(state.episodes_done))
        tasks = self.axis.host(state.episodes.task) if problem.needs_tasks else None
        batches = problem.batches(int(state.window), s, tasks)
        state, metrics = self.call_window(state, batches, problem.thresholds(threshold, tasks))
        if problem.host_metrics is not None:
            after = self.axis.host(state.episodes.task)
            metrics = {**metrics, **problem.host_metrics(tasks, after)}
        return state, metrics, threshold, s


def run_key(config, run: MetaRun) -> str:
    """The key of a meta-training run: the `meta` group less its budget fields, the student's
    learning rate and batches, the seed, the model, the digests of the data, networks and tasks
    the episodes read, and the source of the modules the run executes."""
    meta = {k: v for k, v in config.meta.to_dict().items() if k not in BUDGET_FIELDS}
    task_b = {k: config.task_b[k] for k in ("learning_rate", "batch_size", "teacher_batch_a")}
    return keys.stage_key(
        meta=meta,
        task_b=task_b,
        seed=config.seed,
        model=config.model.to_dict(),
        inputs=run.data_digest,
        code=keys.source_digest(__name__, run.problem.module),
    )


def _restore_latest(manager: ocp.CheckpointManager, like: MetaState, ckpt_dir: str,
                    best: bool = False):  # fmt: skip
    """(state, history, best θ or None) of the newest intact checkpoint in `manager`, or None
    when there is none; `best`: the checkpoint holds the best θ of meta-validation too. A
    damaged one (unreadable, or a digest differs from the one saved with it) is reported in
    one warning, deleted, and the one before it tried."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            checkpoint.verify_manifest(os.path.join(ckpt_dir, str(step)))
            items = dict(state=ocp.args.StandardRestore(like), history=ocp.args.JsonRestore(),
                         digest=ocp.args.JsonRestore())  # fmt: skip
            # A checkpoint saved without meta-validation has no best θ: it resumes without one.
            has_best = best and os.path.isdir(os.path.join(ckpt_dir, str(step), "best"))
            if has_best:
                items["best"] = ocp.args.StandardRestore(like.theta)
            restored = manager.restore(step, args=ocp.args.Composite(**items))
            if checkpoint.digest(restored.state) != restored.digest["state"]:
                raise ValueError("its state differs from the one saved (digest mismatch)")
            if has_best and checkpoint.digest(restored.best) != restored.digest["best"]:
                raise ValueError("its best θ differs from the one saved (digest mismatch)")
            return restored.state, restored.history, restored.best if has_best else None
        except Exception as e:  # Orbax and TensorStore raise many types, some bare Exception.
            logging.warning("Damaged meta-training checkpoint %s/%d, deleted: %s.", ckpt_dir, step,
                            checkpoint.describe_error(e))  # fmt: skip
            manager.delete(step)
    return None


def meta_train(config, model, pretrained, data_a, data_b, workdir_meta: str, episodes=None,
               class_table=None, run: MetaRun | None = None,
               writer: tracking.MetricWriter = tracking.NOOP, validate=None):  # fmt: skip
    """Runs Algorithm 1 until `meta.episodes` episodes have finished (or `meta.max_windows`
    windows, or `meta.max_minutes` of window time, compilation included: a wall-clock budget,
    so the number of windows it allows depends on the machine), resuming from the latest
    checkpoint in `workdir_meta/<run_key>`: a changed hyper-parameter starts afresh in its own
    folder, a raised budget resumes.

    Args:
      pretrained, data_a, data_b, class_table: the two-task episodes (`episodes.two_tasks`);
        unused when `episodes` or `run` is given.
      episodes: an `episodes.Problem` (e.g. `three_tasks.three_tasks(...)`); None: two tasks.
      run: a `MetaRun` built for the same problem and config, to reuse its compiled windows.
      writer: where each window's loss, threshold, T-BPTT length, restarts, skipped episodes,
        seconds and the problem's history metrics stream to, at its window number
        (`tracking.writers(workdir)("meta")`).
      validate: meta-validation, `validate(ml, θ, lr) -> score` (higher is better;
        `l2r.meta.validation.Scorer`), called every `meta.validate_every` windows and after
        the last; the best θ is checkpointed with the state and set as `run.best_theta`.

    Returns:
      (run: its `ml` and `lr` make the learned rule, and `run.best_theta` is the θ of the best
      validation score (None without `validate`), final MetaState, history {name: list} per
      window; besides the fixed entries, one per `Problem.history_metrics`, and with
      `validate` "validation_window" and "validation_score", one entry per validation).
    """
    cfg = config.meta
    if run is None:
        if episodes is None:
            episodes = episodes_lib.two_tasks(config, model, pretrained, data_a, data_b,
                                              class_table)  # fmt: skip
        run = MetaRun(config, model, episodes)
    extra = tuple(run.problem.history_metrics)
    key = run_key(config, run)
    ckpt_dir = os.path.abspath(os.path.join(workdir_meta, key))
    state = run.init()
    every = cfg.get("validate_every", 0) if validate is not None else 0
    best = None  # (score, θ) of the best meta-validation so far.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        history = {k: [] for k in (*HISTORY, *extra, *(VALIDATION if every else ()))}
        restored = _restore_latest(manager, state, ckpt_dir, best=bool(every))
        if restored is None:
            logging.info("Meta-training run %s starts in %s.", key, ckpt_dir)
        else:
            state, history, best_theta = restored
            for k in VALIDATION if every else ():  # Saved by a caller that did not validate.
                history.setdefault(k, [])
            if every and history["validation_score"] and best_theta is not None:
                best = (max(history["validation_score"]), best_theta)
            logging.info("Meta-training run %s resumes from %s at window %d (%d episodes done).",
                         key, ckpt_dir, int(state.window), int(state.episodes_done))  # fmt: skip
        progress = console.Progress(cfg.episodes, "meta-train", unit="episodes",
                                   start=int(state.episodes_done))  # fmt: skip
        last_save = time.monotonic()

        def save(state):
            items = dict(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history))
            digests = {"state": checkpoint.digest(state)}
            if every:  # The best θ so far (the current one before any validation).
                theta = state.theta if best is None else best[1]
                items["best"] = ocp.args.StandardSave(theta)
                digests["best"] = checkpoint.digest(theta)
            items["digest"] = ocp.args.JsonSave(digests)
            manager.save(int(state.window), args=ocp.args.Composite(**items))
            manager.wait_until_finished()
            checkpoint.write_manifest(os.path.join(ckpt_dir, str(int(state.window))))

        def validated(state):
            """Scores θ of `state` unless it was scored already; keeps it if it is the best."""
            nonlocal best
            window = int(state.window)
            if not every or window in history["validation_window"]:
                return
            theta = distributed.local_copy(state.theta)
            score = float(validate(run.ml, theta, run.lr))
            history["validation_window"].append(window)
            history["validation_score"].append(score)
            writer.write_scalars(window, {"validation_score": score})
            if best is None or score > best[0]:  # A copy: windows may donate the state.
                best = (score, jax.tree.map(lambda x: x.copy(), state.theta))

        while not finished(cfg, int(state.window), int(state.episodes_done), history["seconds"]):
            steps = curriculum(cfg, int(state.episodes_done))[1]  # The next window's length.
            if not run.is_compiled(steps):  # Its first call compiles it: minutes, at times.
                which = "a longer window" if run.traces else "the first window"
                progress.compiling(f"{which} ({steps} T-BPTT steps)")
            t0 = time.monotonic()
            state, metrics, threshold, s = run.run_window(state)
            loss = float(metrics["loss"])
            for k, v in (("window", int(state.window)), ("episodes_done", int(state.episodes_done)),
                         ("threshold", threshold), ("tbptt", s), ("loss", loss),
                         ("restarts", int(state.restarts)), ("skipped", int(state.skipped)),
                         ("seconds", time.monotonic() - t0),
                         *((name, float(metrics[name])) for name in extra)):  # fmt: skip
                history[k].append(v)
            writer.write_scalars(int(state.window), {k: history[k][-1] for k in STREAMED + extra})
            progress.update(int(state.episodes_done), window=int(state.window), loss=loss,
                            threshold=threshold, tbptt=s, restarts=int(state.restarts),
                            skipped=int(state.skipped))  # fmt: skip
            if every and int(state.window) % every == 0:
                validated(state)
            if time.monotonic() - last_save > 60 * cfg.checkpoint_minutes:
                save(state)
                last_save = time.monotonic()
        if every and int(state.window) not in history["validation_window"]:
            validated(state)
            if manager.latest_step() == int(state.window):  # Saved before its validation.
                manager.delete(int(state.window))
        if manager.latest_step() != int(state.window):
            save(state)
        manager.wait_until_finished()
    run.best_theta = best[1] if best is not None else None
    if best is not None:
        i = int(np.argmax(history["validation_score"]))
        logging.info("Meta-validation: θ of window %d kept (score %.4f; last window %d: %.4f).",
                     history["validation_window"][i], best[0], history["validation_window"][-1],
                     history["validation_score"][-1])  # fmt: skip
    return run, state, history
