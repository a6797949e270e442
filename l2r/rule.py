"""A meta-trained update rule outside l2r's pipelines: `load_rule` restores θ from a workdir's
meta-training checkpoints, and `as_optax` makes a `Rule` an optax transformation for one's own
training loop (the extra argument `taps` carries the activations the rule reads).

    rule = load_rule("workdirs/exp1_cpu")
    tx = as_optax(rule)
    opt_state = tx.init(network)  # network: {"backbone": ..., <heads>: ...}
    (loss, taps), grads = jax.value_and_grad(loss_fn, has_aux=True)(network, x, y)
    updates, opt_state = tx.update(grads, opt_state, network, taps=taps)
    network = optax.apply_updates(network, updates)
"""

import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from l2r import checkpoint, metalearner, models
from l2r.meta import episodes as episodes_lib
from l2r.methods.learned import Rule
from l2r.models import registry as model_registry

CONFIG_FILE = "config.json"
# Channel counts `load_rule` tries when given no input shape: l2r's sources are grey or RGB.
# The built-in backbones pool over space, so their parameters depend on C alone.
_CHANNELS = (1, 3)
_PROBE_SIZE = 32  # H = W of the probe input used to find the backbone's parameter shapes.


def read_config(path: str) -> ml_collections.ConfigDict:
    """The experiment config saved in the workdir that holds `path` (a workdir, its `meta`
    folder or one meta-training run in it), from its `config.json`.

    Raises:
      FileNotFoundError: there is none (it is written when a run finishes).
    """
    workdir, _ = _layout(path)
    file = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"{file} does not exist (a run writes it when it finishes); pass config= the "
            "experiment config the rule was meta-trained with."
        )
    with open(file) as f:
        return ml_collections.ConfigDict(json.load(f))


def _steps(run_dir: str) -> list[int]:
    """The finished checkpoints of one meta-training run, oldest first (Orbax writes a step
    under a temporary name and renames it when complete)."""
    if not os.path.isdir(run_dir):
        return []
    found = [n for n in os.listdir(run_dir) if n.isdigit()]
    return sorted(int(n) for n in found if os.path.isdir(os.path.join(run_dir, n, "state")))


def _layout(path: str) -> tuple[str, list[str]]:
    """(workdir, meta-training run folders) for a workdir, its `meta` folder or one run."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder; pass a workdir or its meta/ folder.")
    if _steps(path):  # One run: <workdir>/meta/<key>.
        return os.path.dirname(os.path.dirname(path)), [path]
    meta = os.path.join(path, "meta")
    workdir, meta = (path, meta) if os.path.isdir(meta) else (os.path.dirname(path), path)
    return workdir, sorted(os.path.join(meta, k) for k in os.listdir(meta))


def _newest_run(path: str, key: str | None) -> str:
    """The run `key`, or the run whose latest checkpoint was written last."""
    _, runs = _layout(path)
    if key is not None:
        runs = [r for r in runs if os.path.basename(r) == key]
    runs = [r for r in runs if _steps(r)]
    if not runs:
        which = f"run {key!r}" if key is not None else "any run"
        raise FileNotFoundError(
            f"No meta-training checkpoint of {which} under {os.path.abspath(path)}; pass a "
            "workdir whose run meta-trained the `learned` method (it holds meta/<key>/<step>)."
        )
    return max(runs, key=lambda r: os.path.getmtime(os.path.join(r, str(_steps(r)[-1]))))


def _restore_theta(step_dir: str) -> dict:
    """θ of one checkpoint, after checking the checkpoint's files against the digests recorded
    when it was written (they stand in for the array digests saved beside it): the `best` item
    when meta-validation ran (the θ the meta-test used), else θ alone from the `state` item
    (Orbax partial restore)."""
    checkpoint.verify_manifest(step_dir)
    # The item's handler, not a Checkpointer: those look for step metadata in the item folder.
    handler = ocp.PyTreeCheckpointHandler()
    best_dir = epath.Path(step_dir) / "best"
    item_dir = best_dir if best_dir.is_dir() else epath.Path(step_dir) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    struct = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)  # noqa: E731
    tree = handler.metadata(item_dir).tree
    like = {"theta": jax.tree.map(struct, tree if best_dir.is_dir() else tree["theta"])}
    if best_dir.is_dir():
        like = like["theta"]
    restore_args = ocp.checkpoint_utils.construct_restore_args(like)
    args = ocp.args.PyTreeRestore(item=like, restore_args=restore_args, partial_restore=True)
    try:
        restored = handler.restore(item_dir, args=args)
        return restored if best_dir.is_dir() else restored["theta"]
    finally:
        handler.close()


def _shapes(tree) -> dict:
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _metalearner(config, model: models.Model, input_shape, theta_shapes) -> metalearner.MetaLearner:
    """The meta-learner of `model` configured by `config.meta`, for inputs of `input_shape`
    (None: the channel count whose θ has the saved shapes)."""
    if input_shape is None:
        shapes = [(_PROBE_SIZE, _PROBE_SIZE, c) for c in _CHANNELS]
    else:
        shapes = [tuple(input_shape)]
    for shape in shapes:
        ml = episodes_lib.make_metalearner(config.meta, model, (1, *shape))
        if _shapes(jax.eval_shape(ml.init, jax.random.key(0))) == theta_shapes:
            return ml
    raise ValueError(
        f"The saved θ does not fit the meta-learner of model {config.model.name!r} on inputs "
        f"{shapes[0] if input_shape is not None else 'of 1 or 3 channels'}; pass the config, "
        "model and input_shape (H, W, C) the rule was meta-trained with."
    )


def load_rule(
    path: str,
    input_shape: tuple[int, int, int] | None = None,
    *,
    config: ml_collections.ConfigDict | None = None,
    model: models.Model | None = None,
    key: str | None = None,
) -> Rule:
    """The rule meta-trained in a workdir: θ of its newest intact meta-training checkpoint (the
    best-scoring θ when meta-validation ran, as the run's meta-test used).

    Args:
      path: a workdir (`<workdir>/meta/<key>/<step>/` holds the checkpoints), its `meta`
        folder, or one run `<workdir>/meta/<key>`.
      input_shape: (H, W, C) of one input image of the meta-training data. None: found from
        the saved θ among 1 and 3 channels (enough for the built-in backbones).
      config: the experiment config of the run (`meta`, `model`, `task_b.learning_rate`);
        None: read from `<workdir>/config.json`.
      model: the backbone; None: `config.model` from the model registry (register a model of
        one's own before calling).
      key: the run `meta/<key>` to read when there are several; None: the one whose latest
        checkpoint was written last (the latest run with a changed meta-training setting).

    Returns:
      `Rule(ml, theta, learning_rate)`: the meta-learner of the backbone, θ as saved (a nested
      dict of arrays on the first local device) and the student's learning rate α.

    Raises:
      FileNotFoundError: no checkpoint (or no config.json, when `config` is None).
      ValueError: θ does not fit the meta-learner the config and model describe, or every
        checkpoint of the run is damaged.
    """
    config = read_config(path) if config is None else config
    model = model_registry.from_config(config.model) if model is None else model
    run = _newest_run(path, key)
    for step in reversed(_steps(run)):
        # Damaged ones are passed over, not deleted: meta-training resumes from the same folder
        # and deletes them itself.
        try:
            theta = _restore_theta(os.path.join(run, str(step)))
        except Exception as e:  # Orbax and TensorStore raise many types, some bare Exception.
            logging.warning("Damaged meta-training checkpoint %s/%d passed over: %s.", run, step,
                            checkpoint.describe_error(e))  # fmt: skip
            continue
        ml = _metalearner(config, model, input_shape, _shapes(theta))
        logging.info("Learned rule loaded from %s/%d.", run, step)
        return Rule(ml, theta, float(config.task_b.learning_rate))
    raise ValueError(f"Every meta-training checkpoint in {run} is damaged; meta-train again.")


class RuleState(NamedTuple):
    """The state of `as_optax`.

    Attributes:
      theta: the rule's meta-parameters (in the state, not closed over, so that a jitted step
        receives them as an argument rather than baking them into the program as constants).
      lstm: the meta-learner's memory, zeros at `init` (the start of an episode in
        meta-training), carried from step to step.
    """

    theta: dict
    lstm: metalearner.State


def as_optax(
    rule: Rule, backbone: str | None = "backbone"
) -> optax.GradientTransformationExtraArgs:
    """The learned rule as an optax transformation: l2r's student step (§4, §5.1).

    The backbone's leaves move by `-α δ ⊙ g`, with gates δ from the meta-learner, which reads
    the weights, the gradients and the taps of the forward pass that gave the gradients; every
    other leaf (the heads) moves by plain SGD, `-α g`. A head with zero gradient (one not in
    the loss) stays put. With `optax.apply_updates`, a step is the same arithmetic as
    `l2r.methods.learned.student_step`.

    `update(grads, state, params, taps=taps)` needs, besides the gradients:
      params: the current parameters (the gates read the weights); same tree as the grads.
      taps: `model.apply(params[backbone], x, taps=True).taps` of the very forward pass whose
        loss gave `grads` (return it as `has_aux` from the loss): {layer path: `models.Tap`
        (inputs [N, Cin], outputs [N, Cout])}, the spatial means of every tapped layer's input
        and output (extra entries are ignored).

    Args:
      rule: from `load_rule`, or `Rule(ml, theta, learning_rate)` built by hand.
      backbone: the key of the params dict that holds the backbone the rule's meta-learner was
        built for; None: the whole params tree is that backbone (chain the heads' optimiser
        yourself, e.g. with `optax.partition`).

    Returns:
      A `GradientTransformationExtraArgs` whose state is a `RuleState`.
    """
    ml, lr = rule.ml, rule.learning_rate

    def split(tree, what):
        if backbone is None:
            return tree, {}
        if not isinstance(tree, Mapping) or backbone not in tree:
            got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ValueError(
                f"as_optax: {what} has no {backbone!r} entry (got {got}); pass the network "
                f"dict {{{backbone!r}: backbone params, ...heads}}, or as_optax(rule, "
                "backbone=None) for the backbone alone."
            )
        return tree[backbone], {k: v for k, v in tree.items() if k != backbone}

    def init_fn(params):
        w_body, _ = split(params, "params")
        return RuleState(rule.theta, ml.start(w_body))

    def update_fn(updates, state, params=None, *, taps=None, **extra_args):
        del extra_args  # Meant for other transformations of a chain.
        if params is None or taps is None:
            raise ValueError(
                "as_optax: update needs params and taps: tx.update(grads, state, params, "
                "taps=model.apply(backbone, x, taps=True).taps) of the forward pass of grads."
            )
        g_body, _ = split(updates, "grads")
        w_body, _ = split(params, "params")
        deltas, pulls, lstm = ml.gates(state.theta, state.lstm, w_body, g_body, taps)
        # Added to w, `-(lr * d * g)` is exactly `metalearner.update`'s w - lr * d * g (and
        # with pulls, `-(lr * d * g + p * (w - w0))` its w - lr * δ ⊙ g - ρ ⊙ (w - w0)).
        if pulls is None:
            u_body = jax.tree.map(lambda g, d: -(lr * d * g), g_body, deltas)
        else:
            u_body = jax.tree.map(lambda g, d, p, w, w0: -(lr * d * g + p * (w - w0)),
                                  g_body, deltas, pulls, w_body, lstm.anchor)  # fmt: skip
        if backbone is None:
            return u_body, RuleState(state.theta, lstm)
        sgd = lambda g: -(lr * g)  # noqa: E731
        out = {k: u_body if k == backbone else jax.tree.map(sgd, v) for k, v in updates.items()}
        return out, RuleState(state.theta, lstm)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
