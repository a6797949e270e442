"""Multi-process plumbing: launch detection, a real 2-process run, and the launch scripts."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from l2r import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch"]
# Variables that would make a child process think it is part of a cluster launch.
LAUNCH_PREFIXES = ("L2R_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE")
SRUN_ENV = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4",
}


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES)}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


@pytest.fixture
def recorded(monkeypatch):
    """Replaces jax.distributed.initialize by a recorder of its kwargs: nothing connects."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_initialize_does_nothing_without_launch_env(monkeypatch, recorded):
    for name in list(os.environ):
        if name.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(name)
    assert distributed.initialize() is None
    assert recorded == []
    monkeypatch.setenv("SLURM_NTASKS", "1")  # A one-task SLURM job is one process.
    monkeypatch.setenv("L2R_NUM_PROCESSES", "1")
    assert distributed.initialize() is None
    assert recorded == []


def test_explicit_env_is_passed_to_jax(monkeypatch, recorded):
    monkeypatch.setenv("L2R_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("L2R_NUM_PROCESSES", "4")
    monkeypatch.setenv("L2R_PROCESS_ID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # Explicit settings win over SLURM's.
    launch = distributed.initialize()
    assert launch.kind == "explicit"
    assert recorded == [
        dict(
            coordinator_address="10.0.0.1:1234",
            num_processes=4,
            process_id=2,
            cluster_detection_method="deactivate",
        )
    ]


def test_already_initialized_is_left_alone(monkeypatch, recorded):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.initialize({"L2R_DISTRIBUTED": "auto"}) is None
    assert recorded == []


@pytest.mark.parametrize(
    "env, kind, kwargs",
    [
        (SRUN_ENV, "slurm", {"cluster_detection_method": "slurm"}),
        ({**SRUN_ENV, "L2R_DISTRIBUTED": "off"}, None, None),
        ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, None, None),  # Not started by srun.
        ({"L2R_DISTRIBUTED": "auto"}, "auto", {}),
        ({"L2R_DISTRIBUTED": " AUTO "}, "auto", {}),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu", {}),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, None, None),  # A single-host TPU VM.
        ({"MEGASCALE_COORDINATOR_ADDRESS": "w0:8080"}, "tpu", {}),
        ({"L2R_NUM_PROCESSES": "1"}, None, None),
        ({}, None, None),
    ],
)
def test_detect(env, kind, kwargs):
    launch = distributed.detect(env)
    assert (launch and launch.kind) == kind
    assert (launch and launch.kwargs) == kwargs


@pytest.mark.parametrize(
    "env, words",
    [
        ({"L2R_NUM_PROCESSES": "2"}, "L2R_PROCESS_ID, L2R_COORDINATOR not"),
        ({"L2R_NUM_PROCESSES": "2", "L2R_PROCESS_ID": "2", "L2R_COORDINATOR": "h:1"}, "outside"),
        ({"L2R_NUM_PROCESSES": "two", "L2R_PROCESS_ID": "0", "L2R_COORDINATOR": "h:1"}, "integer"),
        ({"L2R_NUM_PROCESSES": "2", "L2R_PROCESS_ID": "0", "L2R_COORDINATOR": "h"}, "port"),
        ({"L2R_DISTRIBUTED": "yes"}, "'auto', 'off'"),
    ],
)
def test_bad_launch_env_is_an_error(env, words):
    with pytest.raises(ValueError, match=words):
        distributed.detect(env)


def test_host_local_to_global_single_process():
    mesh = jax.make_mesh((1,), ("data",))
    local = {"x": np.arange(6.0).reshape(3, 2), "y": np.ones(2)}
    out = distributed.host_local_to_global(local, mesh, {"x": jax.P("data"), "y": jax.P()})
    assert out["x"].sharding.spec == jax.P("data") and out["y"].sharding.spec == jax.P()
    np.testing.assert_array_equal(out["x"], local["x"])
    assert distributed.is_main()


WORKER = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from l2r import distributed, report, tracking, workdir
    distributed.simulated_cpu_devices(2)
    launch = distributed.initialize()
    path = sys.argv[1]
    with workdir.locked(path):  # Only process 0 takes the lock: both get in.
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        pid = jax.process_index()
        local = {"x": np.arange(2, dtype=np.float32) + 2 * pid, "w": np.ones(3, np.float32)}
        g = distributed.host_local_to_global(local, mesh, {"x": jax.P("data"), "w": jax.P()})
        total = jax.jit(lambda t: t["x"].sum() * t["w"].sum())(g)
        workdir.write_json_atomic(os.path.join(path, "config.json"), {"pid": pid})
        report.write_results_json({"pid": pid}, path)
        with tracking.writers(path, log=False) as runs:
            runs(f"tb{pid}").write_scalars(0, {"x": 1.0})
        print(json.dumps({"kind": launch.kind, "main": distributed.is_main(),
                          "runtime": distributed.describe(), "total": float(total),
                          "shape": list(g["x"].shape)}))
""")


def run_processes(code: str, *argv: str, num: int = 2, timeout: float = 120) -> list[str]:
    """Runs `python -c code argv...` as `num` processes joined by jax.distributed (the L2R_*
    launch variables, a coordinator on a free local port); returns their stdouts, in rank
    order, after checking that each exited 0."""
    with socket.socket() as s:  # A port free now (and very likely still free below).
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = clean_env(
        L2R_COORDINATOR=f"localhost:{port}", L2R_NUM_PROCESSES=str(num), PYTHONPATH=ROOT
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *argv],
            env={**env, "L2R_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(num)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}: " + err[-4000:]
    return [out for out, _ in outs]


def test_two_processes_share_one_global_array_and_process_0_writes(tmp_path):
    outs = run_processes(WORKER, str(tmp_path))
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert [r["main"] for r in reports] == [True, False]
    assert reports[1]["runtime"] == "process 1 of 2, 2 local / 4 global cpu devices"
    for r in reports:
        assert r["kind"] == "explicit" and r["shape"] == [4]
        assert r["total"] == (0 + 1 + 2 + 3) * 3  # Each process gave its own two rows.
    with open(tmp_path / "config.json") as f:
        assert json.load(f) == {"pid": 0}
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["pid"] == 0  # Process 0's, with the schema version added.
    assert os.listdir(tmp_path / "tb" / "tb0") and not os.path.exists(tmp_path / "tb" / "tb1")


def _local_sh(*args, timeout=900):
    return subprocess.run(["bash", "launch/local.sh", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=clean_env())  # fmt: skip


@pytest.mark.slow
def test_local_sh_runs_exp1_smoke_on_4_devices_and_on_2_processes_alike(tmp_path):
    """The README's commands: Exp 1's smoke preset (pre-training, meta-training with episodes
    split over the devices, meta-test with 4 seeds split likewise) on 4 simulated devices in one
    process, and on 2 processes of 2 devices joined by jax.distributed: the same results."""
    config = ["--config=experiments/configs/exp1.py:smoke", "--config.num_seeds=4"]
    runs = {
        "one": ["--cpu_devices=4", *config, f"--workdir={tmp_path / 'one'}"],
        "two": ["--processes=2", "--cpu_devices=2", *config, f"--workdir={tmp_path / 'two'}"],
    }
    results = {}
    for name, args in runs.items():
        proc = _local_sh(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runtime = "process 0 of 1, 4 local" if name == "one" else "process 0 of 2, 2 local"
        assert f"JAX runtime: {runtime} / 4 global cpu devices" in proc.stderr
        with open(tmp_path / name / "results.json") as f:
            results[name] = json.load(f)
        assert os.path.exists(tmp_path / name / "fig7_delta.png")
    one, two = results["one"], results["two"]
    assert one["experiment"] == "exp1" and one["preset"] == "smoke"
    assert list(one["methods"]) == list(two["methods"])
    for method in one["methods"]:
        np.testing.assert_allclose(one["methods"][method]["readout_A"],
                                   two["methods"][method]["readout_A"], atol=1e-6)  # fmt: skip


def write_stub(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return str(path)


def test_local_sh_starts_ranked_processes_and_stops_at_first_failure(tmp_path):
    log = tmp_path / "log"
    # A stand-in for python: records what each rank was told; rank 1 fails, rank 0 would hang.
    stub = write_stub(
        tmp_path / "python",
        textwrap.dedent(f"""
        echo "$L2R_PROCESS_ID/$L2R_NUM_PROCESSES $L2R_COORDINATOR $*" >> {log}
        if [ "$L2R_PROCESS_ID" = 1 ]; then sleep 1; exit 3; fi
        sleep 60
    """),
    )
    proc = subprocess.run(
        [
            "bash",
            "launch/local.sh",
            "--processes=2",
            "--port=4321",
            "--cpu_devices=2",
            "--config=c.py:smoke",
            "--workdir=w x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=clean_env(PYTHON=stub),
    )
    assert proc.returncode == 3, proc.stderr
    lines = sorted(log.read_text().splitlines())
    args = "-m experiments.run --num_cpu_devices=2 --config=c.py:smoke --workdir=w x"
    assert lines == [f"0/2 localhost:4321 {args}", f"1/2 localhost:4321 {args}"]


def test_slurm_sbatch_gives_one_task_per_node_all_gpus(tmp_path):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    write_stub(stub_dir / "srun", 'echo "srun ids=${JAX_LOCAL_DEVICE_IDS:-unset} $*"\n')
    env = clean_env(
        PATH=f"{stub_dir}:{os.environ['PATH']}",
        SLURM_SUBMIT_DIR=ROOT,
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="4",
    )
    run = lambda ntasks: subprocess.run(
        ["bash", "launch/slurm.sbatch", "--config=c.py", "--workdir=/shared/w"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "SLURM_NTASKS": ntasks},
    )
    per_node = run("2")
    assert per_node.returncode == 0, per_node.stderr
    assert "srun ids=0,1,2,3 --kill-on-bad-exit=1" in per_node.stdout
    assert per_node.stdout.rstrip().endswith("-m experiments.run --config=c.py --workdir=/shared/w")
    per_gpu = run("8")
    assert per_gpu.returncode == 0 and "srun ids=unset" in per_gpu.stdout
    mismatch = run("4")  # 2 tasks per node for 4 GPUs: neither layout.
    assert mismatch.returncode == 2 and "--ntasks-per-node=4" in mismatch.stderr


def test_tpu_pod_sh_creates_copies_installs_and_runs_on_all_workers(tmp_path):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    log = tmp_path / "gcloud.log"
    # describe fails, so the TPU is created; every call is logged, arguments NUL-terminated.
    write_stub(
        stub_dir / "gcloud",
        textwrap.dedent(f"""
        printf '%s\\0' "$@" >> {log}; echo >> {log}
        [ "$4" = describe ] && exit 1
        exit 0
    """),
    )
    proc = subprocess.run(
        [
            "bash",
            "launch/tpu_pod.sh",
            "--name=pod",
            "--zone=z1",
            "--type=v4-32",
            "--spot",
            "--config=experiments/configs/exp1.py:paper",
            "--workdir=/mnt/a b",
            "--config.x='q'",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=clean_env(PATH=f"{stub_dir}:{os.environ['PATH']}"),
    )
    assert proc.returncode == 0, proc.stderr
    calls = [c.split("\0") for c in log.read_text().split("\0\n")[:-1]]
    assert [c[3] for c in calls] == ["describe", "create", "scp", "ssh", "ssh"]
    assert "--accelerator-type=v4-32" in calls[1] and "--spot" in calls[1]
    assert "--worker=all" in calls[2] and "--worker=all" in calls[4]
    command = calls[4][calls[4].index("--command") + 1]
    assert command.startswith("cd ~/l2r && L2R_DISTRIBUTED=auto .venv/bin/python -m experiments")
    # The remote shell gets every argument back unchanged, spaces and quotes included.
    quoted = command.split("-m experiments.run", 1)[1]
    echo = subprocess.run(["bash", "-c", "printf '%s\\n'" + quoted], capture_output=True, text=True)
    echoed = echo.stdout.splitlines()
    assert echoed == [
        "--config=experiments/configs/exp1.py:paper",
        "--workdir=/mnt/a b",
        "--config.x='q'",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_parses(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_pass_shellcheck():
    proc = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
