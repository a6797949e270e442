"""The command lines as a user meets them: shipped configs found by name from any folder,
`--help` listing the experiments, `--dry_run`, the console scripts, and a wheel that installs
`l2r` alone."""

import os
import subprocess
import sys
import zipfile

import pytest

from l2r import configs
from l2r.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("given, preset", [("exp3", ":cpu"), ("exp3.py", ":cpu"), ("exp3", ""),
                                           ("experiments/configs/exp3.py", ":smoke")])  # fmt: skip
def test_a_bare_name_finds_the_shipped_config_from_any_folder(given, preset, tmp_path,
                                                              monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # No such file here: the shipped one is meant.
    argv = run.resolve_config_path(["l2r-run", f"--config={given}{preset}", "--workdir=w"])
    assert argv == ["l2r-run", f"--config={configs.FOLDER}/exp3.py{preset}", "--workdir=w"]
    assert run.resolve_config_path(["x", "--config", given])[2] == f"{configs.FOLDER}/exp3.py"


def test_a_file_of_ones_own_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp3.py").write_text("")
    assert run.resolve_config_path(["x", "--config=exp3.py:cpu"])[1] == "--config=exp3.py:cpu"
    assert run.resolve_config_path(["x", "--config=mine.py"])[1] == "--config=mine.py"


def test_help_lists_every_experiment_and_its_presets():
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--help"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, check=True)  # fmt: skip
    for name in configs.EXPERIMENTS:
        assert f"\n    {name}" in out.stdout, name
    assert "Presets: cpu, paper, cifar_offline, smoke." in out.stdout
    assert "--dry_run" in out.stdout and "--workdir" in out.stdout


@pytest.mark.parametrize("module, first_line, own_flag", [
    ("experiments.validate", "Every method of an experiment at hyper-parameters selected",
     "--sgd_scales"),
    ("experiments.sweep", "Sweeps config fields", "--select"),
])  # fmt: skip
def test_each_command_helps_with_its_own_text_and_flags(module, first_line, own_flag):
    """`l2r-validate --help` and `l2r-sweep --help` describe themselves, not `l2r-run`, and
    list their own flags beside the shared ones."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.startswith(first_line), out.stdout[:200]
    assert own_flag in out.stdout and "--workdir" in out.stdout and "--config" in out.stdout


def test_console_script_dry_run_from_an_empty_folder(tmp_path):
    """`l2r-run` (installed by `pip install -e .`) works outside the checkout; --dry_run shows
    the resolved config and the stages and runs none of them."""
    script = os.path.join(BIN, "l2r-run")
    if not os.path.exists(script):
        pytest.skip("l2r is not installed in this environment (no l2r-run script)")
    out = subprocess.run([script, "--config=exp1:smoke", "--workdir=w", "--dry_run",
                          "--config.task_b.steps=40"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "steps: 40" in out.stdout and "Stages:" in out.stdout
    assert "2. pre-training: 1 network(s)" in out.stdout and "0 cached" in out.stdout
    assert "meta-training" in out.stdout
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_the_wheel_installs_l2r_alone_with_its_configs_and_scripts(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), ROOT], check=True, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("l2r-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"l2r"}, tops
    for name in configs.EXPERIMENTS:
        assert f"l2r/configs/{name}.py" in names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "l2r-run = l2r.cli.run:main" in text and "l2r-sweep = l2r.cli.sweep:main" in text
