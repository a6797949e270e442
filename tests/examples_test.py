"""The examples in `examples/`: a user's method (`my_method.py`) and model (`my_model.py`),
added from files outside l2r, run next to l2r's own through the pipeline API (`compare.py`) and
through the command line with a config file of one's own (`my_config.py`); no file of l2r names
them, the registries know them only once they are imported, and they change no built-in's key."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from l2r import config_checks, histories, models
from l2r.configs import fig1
from l2r.methods import groups, registry
from l2r.models import registry as model_registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
USER_MODULES = ("my_method", "my_model", "my_config")


def run(args, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def finite_results(workdir) -> dict:
    """results.json of `workdir`, asserting every metric of every method finite (the loss is
    NaN at step 0, before any step)."""
    results = json.loads((workdir / "results.json").read_text())
    for method, metrics in results["methods"].items():
        for name, values in metrics.items():
            values = np.asarray(values, float)  # null (JSON NaN) reads as NaN
            values = values[:, 1:] if name == "loss" else values
            assert np.isfinite(values).all(), (method, name)
    assert results["diverged"] == []
    return results


def test_the_python_example_compares_the_users_method_and_model_with_built_ins(tmp_path):
    done = run([str(EXAMPLES / "compare.py"), str(tmp_path / "w")], cwd=ROOT)
    results = finite_results(tmp_path / "w")
    assert list(results["methods"]) == ["sgd", "ewc", "l2_pull"]
    assert results["config"]["model"]["name"] == "my_mlp"
    assert results["config"]["task_b"]["l2_pull"] == {"coef": 1.0}
    for method in results["methods"]:
        assert f"| {method} |" in done.stdout
    # The pull keeps the representation closer to the pre-trained one than SGD does.
    cka = {m: np.mean(np.asarray(v["cka_A"])[:, -1]) for m, v in results["methods"].items()}
    assert cka["l2_pull"] > cka["sgd"], cka


def test_the_command_line_runs_a_users_config_file_from_any_folder(tmp_path):
    run(["-m", "l2r.cli.run", f"--config={EXAMPLES / 'my_config.py'}:smoke",
         f"--workdir={tmp_path / 'w'}", "--config.model.name=convnet",
         "--config.task_b.l2_pull.coef=0.3"], cwd=tmp_path)  # fmt: skip
    results = finite_results(tmp_path / "w")
    assert list(results["methods"]) == ["sgd", "ewc", "l2_pull"]
    assert results["config"]["model"]["name"] == "convnet"
    assert results["config"]["task_b"]["l2_pull"] == {"coef": 0.3}
    # Each method's histories are cached under its own key, the user's method's included.
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "w" / "task_b").glob("*.npz"))
    assert cached == ["ewc", "l2_pull", "sgd"]


def test_no_file_of_l2r_names_the_examples():
    for path in (ROOT / "l2r").rglob("*.py"):
        text = path.read_text()
        for name in ("l2_pull", "my_mlp", *USER_MODULES):
            assert name not in text, (path, name)


@pytest.fixture
def fresh_registries(monkeypatch):
    """The registries as l2r alone fills them, restored (and the examples forgotten) after."""
    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    monkeypatch.setattr(registry, "_PATTERNS", list(registry._PATTERNS))
    monkeypatch.setattr(groups, "_DEFAULTS", dict(groups._DEFAULTS))
    monkeypatch.setattr(model_registry, "_BUILDERS", dict(model_registry._BUILDERS))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in USER_MODULES:
        sys.modules.pop(name, None)


def test_importing_the_examples_registers_them_and_changes_no_built_in_key(fresh_registries):
    assert "l2_pull" not in registry.names() and "my_mlp" not in model_registry.names()
    before = fig1.get_config("smoke")
    assert "l2_pull" not in before.task_b
    model = models.make_model("convnet", widths=(4,), groups=2)
    start = {"w": np.zeros(3, np.float32)}
    built_ins = ("sgd", "teacher", "lwf", "ewc", "hat")

    def keys(config, names=built_ins):
        return [histories.history_key(config, [registry.build(n, model, config.task_b)], start, "d")
                for n in names]  # fmt: skip

    old = keys(before)

    import my_config  # noqa: F401  (imports my_method and my_model)

    assert registry.entry("l2_pull").group == "l2_pull" and "my_mlp" in model_registry.names()
    after = fig1.get_config("smoke")
    assert after.task_b.l2_pull.coef == 1.0
    assert keys(after) == old  # The new group is in no built-in's key.
    # A config built before the import lacks the group, which the checks say; the helper adds
    # it, to a locked config too.
    before.task_b.methods = ("sgd", "l2_pull")
    with pytest.raises(config_checks.ConfigError, match="task_b.l2_pull are not in the config"):
        config_checks.check_methods(before, rule=False, meta_data=False)
    before.lock()  # As the command line loads it.
    registry.add_config_groups(before.task_b)
    assert before.task_b.l2_pull.coef == 1.0
    config_checks.check_methods(before, rule=False, meta_data=False)
    # The user's coefficient is in the user's key, and in nobody else's.
    (pull,) = keys(after, ("l2_pull",))
    after.task_b.l2_pull.coef = 0.5
    assert keys(after, ("l2_pull",)) != [pull] and keys(after) == old
    # The user's file is part of the key: its source is read, as l2r's modules' are.
    method = registry.build("l2_pull", model, after.task_b)
    assert histories.method_modules([method]) == []
    assert set(histories.user_code([method])) == {"my_method"}


def test_a_taken_method_name_is_refused(fresh_registries):
    with pytest.raises(ValueError, match="already registered to l2r.methods.registry._ewc"):
        registry.register("ewc")(lambda name, model, task_b, context: None)
    with pytest.raises(ValueError, match="config group"):
        registry.register("sgd_y<f>", pattern=r"sgd_y\d+", group={"coef": 1.0})
