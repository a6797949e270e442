"""l2r.tracking: TensorBoard runs written while Task B and meta-training go on, the log file,
provenance, stage lines, and a progress ETA that leaves compilation out."""

import glob
import json
import logging
import math
import os
import re
import stat
import subprocess
import sys

import numpy as np
from absl import logging as absl_logging
from report_test import FakeClock, _read_events
from smoke_setup import tiny

from l2r import compare, console, distributed, report, task_b, tracking
from l2r.meta import episodes, loop
from l2r.methods import make_method


def events(run_dir) -> dict:
    """{(step, tag): value} of every event file of one TensorBoard run (directory)."""
    files = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))
    return {(step, tag): v for f in files for step, tag, v in _read_events(f)}


def test_writers_write_one_readable_run_per_name_at_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    writers = tracking.writers(tmp_path)
    writers("task_b/sgd").write_scalars(0, {"readout_A": 0.5, "loss": math.nan})
    writers("task_b/lwf").write_scalars(0, {"readout_A": 0.25})
    writers("task_b/sgd").write_scalars(10, {"readout_A": 0.75, "loss": 1.5})
    writers("meta").write_scalars(1, {"loss": np.float32(2.0), "tbptt": 3})
    writers("unused")  # A run that writes nothing makes no event file.
    # Readable before any flush or close: what TensorBoard shows while the run goes on.
    tb = tmp_path / "tb"
    assert events(tb / "task_b" / "sgd") == {
        (0, "readout_A"): 0.5,
        (10, "readout_A"): 0.75,
        (10, "loss"): 1.5,
    }  # The NaN loss is left out.
    assert events(tb / "task_b" / "lwf") == {(0, "readout_A"): 0.25}
    assert events(tb / "meta") == {(1, "loss"): 2.0, (1, "tbptt"): 3.0}
    assert sorted(os.listdir(tb)) == ["meta", "task_b"]
    assert "[task_b/sgd] step 10: readout_A=0.75, loss=1.5" in caplog.messages
    assert "[task_b/sgd] step 0: readout_A=0.5, loss=nan" in caplog.messages
    writers.close()
    # A second writer of the same run (a rerun) adds a file; both stay readable.
    with tracking.writers(tmp_path, log=False) as again:
        again("meta").write_scalars(2, {"loss": 1.0})
    assert len(glob.glob(str(tb / "meta" / "events.out.tfevents.*"))) == 2
    assert events(tb / "meta")[(2, "loss")] == 1.0


def test_write_history_writes_the_seed_means_of_every_probe_step(tmp_path):
    history = {"readout_A": np.array([[0.5, 0.25], [1.0, 0.75]]), "loss": np.array(
        [[np.nan, 2.0], [np.nan, 4.0]])}  # fmt: skip
    with tracking.writers(tmp_path, log=False) as writers:
        tracking.write_history(writers("task_b/ewc"), [0, 5], history)
    assert events(tmp_path / "tb" / "task_b" / "ewc") == {
        (0, "readout_A"): 0.75, (5, "readout_A"): 0.5, (5, "loss"): 3.0}  # fmt: skip


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    writers = tracking.writers(tmp_path)
    assert writers("meta") is tracking.NOOP
    writers("meta").write_scalars(1, {"loss": 1.0})
    assert tracking.attach_log_file(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []


def test_log_file_gets_every_line_appended_across_runs_and_is_0644(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    old_umask = os.umask(0o077)  # A strict umask: the log is still readable by teammates.
    try:
        tracking.attach_log_file(str(tmp_path))
        absl_logging.info("first run %d", 1)
        tracking.attach_log_file(str(tmp_path))  # A rerun: appended, after a header of its own.
        absl_logging.info("second run")
        logging.getLogger("some.library").warning("a library's warning")
    finally:
        tracking.detach_log_file()
        os.umask(old_umask)
    absl_logging.info("after detaching")
    path = tmp_path / "log.txt"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    lines = path.read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("==== ")]
    assert len(headers) == 2 and headers[0] == 0
    assert lines[1].startswith("I") and lines[1].endswith("] first run 1")  # absl's format.
    assert lines[headers[1] + 1].endswith("] second run")
    assert lines[-1].startswith("W") and lines[-1].endswith("] a library's warning")
    assert not any("after detaching" in line for line in lines)


def test_provenance_names_the_code_libraries_devices_and_command():
    p = tracking.provenance()
    assert re.fullmatch(r"[0-9a-f]{40}", p["commit"])  # This checkout.
    assert isinstance(p["dirty"], bool)
    assert set(p["versions"]) == {"python", "jax", "jaxlib", "flax", "optax", "orbax", "numpy",
                                  "l2r"}  # fmt: skip
    assert p["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert all(isinstance(v, str) for v in p["versions"].values())
    assert p["devices"] == distributed.describe() and p["device_kind"]
    assert p["command"] == sys.argv and p["hostname"]
    assert p["time_utc"].endswith("+00:00")
    json.dumps(report.to_jsonable(p), allow_nan=False)  # It goes into results.json.


def test_provenance_without_git_says_none(tmp_path, monkeypatch):
    assert tracking._git(str(tmp_path)) == (None, None)  # Not a checkout.

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    p = tracking.provenance()
    assert p["commit"] is None and p["dirty"] is None


def test_progress_eta_leaves_compilation_out(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    clock = FakeClock()
    progress = console.Progress(100, "task_b", interval_s=0.0, clock=clock)
    clock.now += 60.0  # The first chunk: 10 steps, and a minute of compilation.
    assert progress.update(10) == "[task_b] 10/100 (10%) ? steps/s, ETA ?"
    clock.now += 9.0  # Compiled: 1 step/s; the first minute would have made it 0.29.
    assert progress.update(19) == "[task_b] 19/100 (19%) 1.0 steps/s, ETA 1m21s"
    line = progress.compiling("the steps of phase 2")
    assert line == "[task_b] compiling the steps of phase 2…" and line in caplog.messages
    clock.now += 30.0  # One step and the compilation of phase 2: left out too.
    assert progress.update(20) == "[task_b] 20/100 (20%) 1.0 steps/s, ETA 1m20s"
    clock.now += 20.0  # 10 steps in 20 s: 19 steps in 29 s measured.
    assert progress.update(30) == "[task_b] 30/100 (30%) 0.655 steps/s, ETA 1m47s"


def test_stages_count_and_time_the_stages_a_run_has():
    clock = FakeClock()
    stages = tracking.Stages("exp1", "pre-training", None, "meta-test", "report", clock=clock)
    assert stages.begin("pre-training") == "[exp1] stage 1/3: pre-training"
    clock.now += 65.0
    assert stages.begin("meta-test") == "[exp1] stage 2/3: meta-test (after 1m05s)"


def test_meta_training_streams_every_window_while_it_runs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    config, model, pretrained, data_a, data_b = tiny(max_windows=3)
    run = loop.MetaRun(config, model, episodes.two_tasks(config, model, pretrained, data_a,
                                                         data_b))  # fmt: skip
    run_dir, seen = tmp_path / "tb" / "meta", []
    run_window = run.run_window

    def watched(state):  # What TensorBoard would show before each window.
        seen.append(sorted({step for step, _ in events(run_dir)}))
        return run_window(state)

    run.run_window = watched
    with tracking.writers(tmp_path) as writers:
        _, _, history = loop.meta_train(config, model, None, None, None, str(tmp_path / "meta"),
                                        run=run, writer=writers("meta"))  # fmt: skip
    assert seen == [[], [1], [1, 2]]
    written = events(run_dir)
    for name in ("loss", "threshold", "tbptt", "restarts", "skipped", "episodes_done"):
        np.testing.assert_allclose([written[(w, name)] for w in (1, 2, 3)], history[name],
                                   rtol=1e-6, err_msg=name)  # fmt: skip
    compiling = [m for m in caplog.messages if "compiling" in m]
    assert compiling == ["[meta-train] compiling the first window (3 T-BPTT steps)…"]


def test_task_b_streams_each_method_to_its_own_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    config, model, pretrained, data_a, data_b = tiny()
    config.num_seeds, config.task_b.steps, config.task_b.probe_every = 2, 4, 2
    streams = task_b.make_streams(config, 32, 32, config.num_seeds)
    nets0 = compare.initial_networks(config, pretrained, 3, model.representation_dim)
    initial = ({"readout_A": np.array([0.5, 0.75])}, None)
    seen = []

    def probe_fn(networks, sets, ref_rep=None, represent=None):
        """A stand-in probe that records what TensorBoard shows when it is called."""
        seen.append(sorted({step for step, _ in events(run_dir)}))
        return {"readout_A": np.array([0.25, 0.5]) + len(seen)}, None

    histories = {}
    with tracking.writers(tmp_path) as writers:
        for name in ("sgd", "teacher"):
            run_dir, seen = tmp_path / "tb" / "task_b" / name, []
            phases = [task_b.Phase(make_method(name, model, config.task_b), data_a, data_b,
                                   streams)]  # fmt: skip
            histories[name], *_ = task_b.run_phases(
                phases, nets0, config, probe_fn, None, initial, writer=writers(f"task_b/{name}")
            )
            assert seen == [[0], [0, 2]], name  # Each probe step is on disk as it is measured.
    for name, history in histories.items():
        written = events(tmp_path / "tb" / "task_b" / name)
        assert {tag for _, tag in written} == {"readout_A", "loss"}
        for i, step in enumerate((0, 2, 4)):
            np.testing.assert_allclose(written[(step, "readout_A")],
                                       history["readout_A"][:, i].mean(), rtol=1e-6)  # fmt: skip
            if step:
                np.testing.assert_allclose(written[(step, "loss")], history["loss"][:, i].mean(),
                                           rtol=1e-6)  # fmt: skip
    assert "[sgd x2] compiling the steps and the probe…" in caplog.messages
