"""The learned update rule: one stacked-LSTM gate per backbone parameter leaf (paper §4, §5.1).

For every parameter leaf `w` of the student's backbone (not the classification heads: §5.1 trains
them with plain SGD), a stacked LSTM `f_θ` outputs a gate δ of `w`'s shape and the student steps
`w ← w − α δ ⊙ g`. Each leaf has its own LSTM (§5.1: "a separate ... meta-learner for each
layer"), shared across the leaf's output units, which form the LSTM's batch.

    ml = metalearner.make(backbone_params, taps)        # static structure, from shapes only
    theta = ml.init(key)                                 # plain nested dict
    state = ml.start(params)                             # LSTM (c, h) per leaf and layer, zeros
    deltas, pulls, state = ml.gates(theta, state, params, grads, taps)
    params = metalearner.update(params, grads, deltas, lr, pulls=pulls, anchor=state.anchor)

LSTM input per output unit j (§5.1), with the taps (spatial means) averaged over the batch too:
  * conv kernel [kH, kW, Cin, Cout], Cout units: the kernel column w[..., j] and its gradient
    g[..., j] flattened (kH·kW·Cin each), the layer input (Cin, the same for every unit) and the
    unit's output (1): 2·kH·kW·Cin + Cin + 1 → kH·kW·Cin (3×3×10: 191 → 90). A dense kernel
    [Din, Dout] is the kH = kW = 1 case.
  * 1-D leaf [C] (GroupNorm scale/bias, dense bias), one unit: w, g, an activation vector of
    width C and the mean of the layer's output: 3·C + 1 → C (§5.1: "Cin × 3 + 1"). The vector is
    the layer input for a GroupNorm (its pre-activation, width C) and the layer output for a
    dense bias (whose input has Din entries; the bias acts on the output). Which one is decided
    by the layer (a sibling 2-D kernel means dense), not by comparing widths.

Choices the paper leaves open:
  * Input normalisation: weights (~1e-1), gradients (~1e-3) and activations differ by orders of
    magnitude across layers and over training, and an LSTM reading raw values would barely see
    the gradients. Each of the four inputs (w, g, input and output activation) is divided by its
    own RMS over the whole leaf / tap vector, with the gradient of the RMS stopped, plus `eps`,
    then clipped to ±`clip`. δ is thus invariant to rescaling any one of them.
  * ReLU on the feed-forward output of every LSTM layer ("ReLU in the hidden layers"); the
    recurrence uses the raw h. The cell is `flax.linen.LSTMCell`'s equations with the gates fused
    into one kernel (`lstm_cell`), faster to run and to compile than `nn.OptimizedLSTMCell`
    (docs/benchmarks.md, "Measured facts behind code choices").
    Kernels are lecun-normal, biases zero. Flax's orthogonal recurrent init is not used: two
    batched QRs in one jitted program intermittently deadlocked XLA:CPU (jaxlib 0.10.2); and
    the zero output layer makes δ independent of the LSTM weights at initialisation anyway.
  * Output (§5.1): dense with zero weights and bias 1, tanh, times a learnable per-leaf scale
    initialised to 1/tanh(1), so δ ≡ 1 at initialisation (up to float rounding): plain SGD.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

Path = tuple[str, ...]
GATES = ("tanh", "exp")
_HINT = (
    "pass make()/apply() the backbone params only (not the classification heads, which are "
    "trained by plain SGD) and the taps of the same backbone: model.apply(params, x, taps=True)."
)


class Config(NamedTuple):
    """Meta-learner hyper-parameters.

    Attributes:
      hidden_kernel: LSTM width for conv and dense kernels (§5.1: 64).
      hidden_vector: LSTM width for 1-D leaves, GroupNorm γ/β and dense biases (§5.1: 32).
      num_layers: stacked LSTM layers (§5.1: 3).
      clip: RMS-normalised inputs are clipped to [-clip, clip].
      first_order: stop gradients through the LSTM inputs (w, g, activations), so meta-gradients
        skip the second-order path through ĝ into f. Alone this changes them little (1e-5
        relative on a tiny net); the large second-order term is g inside the update, which
        `update(..., first_order=True)` also cuts. Use both for a first-order meta-gradient.
      eps: added to each RMS before dividing.
      gate: "tanh" (§5.1: δ = scale · tanh(z), bias 1, scale 1/tanh(1); δ can turn negative,
        i.e. gradient ascent on Task B) or "exp" (a departure: δ = exp(scale · tanh(z)), bias 0,
        scale `log_range`; δ ∈ (e^-scale, e^scale) stays positive, and a move of z scales the
        step multiplicatively rather than additively). Both give δ ≡ 1 at initialisation.
      log_range: the initial scale of the "exp" gate (2.0: δ ∈ (0.14, 7.4)); learnable.
      pull: a learned pull towards the anchor w0 (the backbone at the start of the task, kept
        in the `State`): the step becomes w − α δ ⊙ g − ρ ⊙ (w − w0), where ρ, the fraction of
        the drift w − w0 taken back per step, is `pull_max` · sigmoid(z) · clip(s, 0, 1): z from
        a second output head of each LSTM (weights and bias 0 at first), s a learnable scalar per
        leaf, 0 at first, so ρ ≡ 0 and the rule is plain SGD at initialisation (clip passes half
        a gradient at 0, so s still learns; if the meta-gradient wants ρ < 0, s stays at 0 and
        the pull off). The LSTM also reads w − w0 (RMS-normalised like w). A learned, data-free
        cousin of EWC's quadratic penalty. ρ is kept in [0, pull_max]: a push away from w0
        (ρ < 0) grows the drift geometrically, which windows of a few steps reward and 500-step
        tasks do not survive (the first, unbounded version diverged at meta-test).
      pull_max: the largest ρ (0.05: a drift is halved in 14 steps at most).
      history: inputs that carry more history than the LSTM's memory of past inputs: per
        weight, a momentum m ← β m + (1 − β) g of the gradient (RMS-normalised like g, after
        this step's g is folded in), and per unit the steps taken so far, as log(1 + t) / 8
        (≈ 1 at t = 3000; logarithmic so that a task longer than the meta-training episodes
        moves it little). The momentum and t live in the `State`. Gates start at δ ≡ 1 all the
        same (the output head is zero at initialisation).
      momentum_decay: β of the momentum input (0.9).
    """

    hidden_kernel: int = 64
    hidden_vector: int = 32
    num_layers: int = 3
    clip: float = 5.0
    first_order: bool = False
    eps: float = 1e-8
    gate: str = "tanh"
    log_range: float = 2.0
    pull: bool = False
    pull_max: float = 0.05
    history: bool = False
    momentum_decay: float = 0.9


class Leaf(NamedTuple):
    """Static description of one parameter leaf and of its LSTM."""

    path: Path  # Key path in the params tree, e.g. ("stage1_block0", "conv1", "kernel").
    tap: str  # Key in taps, e.g. "stage1_block0/conv1".
    shape: tuple[int, ...]  # The leaf's shape.
    units: int  # LSTM batch: Cout for kernels, 1 for 1-D leaves.
    in_size: int  # 2·K + Cin + 1 for kernels (K = kH·kW·Cin), 3·C + 1 for 1-D leaves.
    out_size: int  # K for kernels, C for 1-D leaves.
    hidden: int  # LSTM width.
    act: str  # Tap field feeding a 1-D leaf's activation vector ("inputs"/"outputs"); "" else.


class State(NamedTuple):
    """LSTM memory. `lstm` mirrors params: each leaf holds one (c, h) per layer, [units, H].
    `anchor`: with `Config.pull`, the backbone params w0 the rule pulls towards; else None.
    `momentum`, `step`: with `Config.history`, the gradient momentum (params' tree) and the
    number of steps taken (a float scalar); else None."""

    lstm: dict
    anchor: Any = None
    momentum: Any = None
    step: Any = None


def _get(tree: Any, path: Path) -> Any:
    return functools.reduce(lambda t, k: t[k], path, tree)


def _name(path: Path) -> str:
    return "/".join(path)


def _flat(tree: Any, what: str) -> dict[Path, Any]:
    if not isinstance(tree, dict) or not tree:
        raise ValueError(f"metalearner: {what} must be a non-empty nested dict; {_HINT}")
    return traverse_util.flatten_dict(tree)


def _describe(path: Path, shape: tuple[int, ...], flat: dict[Path, Any], config: Config) -> Leaf:
    name, tap = _name(path), _name(path[:-1])
    # Read per weight like w: w − w0 (pull) and the momentum (history); per unit: t (history).
    extra = int(config.pull) + int(config.history)
    per_unit = 1 + int(config.history)
    if len(shape) in (2, 4):  # Dense [Din, Dout] is a 1x1 conv [1, 1, Din, Dout].
        k, cin, cout = math.prod(shape[:-1]), shape[-2], shape[-1]
        return Leaf(path, tap, shape, cout, (2 + extra) * k + cin + per_unit, k,
                    config.hidden_kernel, "")  # fmt: skip
    if len(shape) == 1:
        sibling = flat.get((*path[:-1], "kernel"))
        act = "outputs" if sibling is not None and len(sibling.shape) == 2 else "inputs"
        c = shape[0]
        return Leaf(path, tap, shape, 1, (3 + extra) * c + per_unit, c, config.hidden_vector,
                    act)  # fmt: skip
    raise ValueError(
        f"metalearner: parameter {name!r} has shape {shape}; expected a conv kernel "
        f"[kH, kW, Cin, Cout], a dense kernel [Din, Dout] or a 1-D scale/bias [C]."
    )


def _check_tap(leaf: Leaf, taps: Any) -> None:
    if not isinstance(taps, dict) or leaf.tap not in taps:
        known = sorted(taps) if isinstance(taps, dict) else type(taps).__name__
        raise ValueError(
            f"metalearner: no tap {leaf.tap!r} for parameter {_name(leaf.path)!r} (taps: "
            f"{known}); {_HINT}"
        )
    tap = taps[leaf.tap]
    if len(leaf.shape) == 1:
        widths = {leaf.act: leaf.shape[0]}
    else:
        widths = {"inputs": leaf.shape[-2], "outputs": leaf.shape[-1]}
    for field, width in widths.items():
        got = tuple(getattr(tap, field).shape)
        if len(got) != 2 or got[1] != width:
            raise ValueError(
                f"metalearner: tap {leaf.tap!r}.{field} has shape {got} but parameter "
                f"{_name(leaf.path)!r} {leaf.shape} needs [N, {width}]; {_HINT}"
            )


def _check_tree(leaves: tuple[Leaf, ...], tree: Any, what: str) -> dict[Path, Any]:
    flat = _flat(tree, what)
    want = {leaf.path: leaf.shape for leaf in leaves}
    got = {path: tuple(jnp.shape(x)) for path, x in flat.items()}
    if got != want:
        missing = sorted(_name(p) for p in want.keys() - got.keys())
        extra = sorted(_name(p) for p in got.keys() - want.keys())
        shapes = [f"{_name(p)}: {got[p]} != {s}" for p, s in want.items() if got.get(p, s) != s]
        raise ValueError(
            f"metalearner: {what} do not match the params given to make(): missing {missing}, "
            f"unexpected {extra}, shape mismatches {shapes}; {_HINT}"
        )
    return flat


def _scale(x: jax.Array) -> jax.Array:
    """RMS of the whole tensor, gradient stopped: a scale, not a path for meta-gradients."""
    return lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(x))))


def lstm_cell(
    theta: dict, carry: tuple[jax.Array, jax.Array], x_UxI: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One LSTM step, the equations of `flax.linen.LSTMCell` with the four gates fused.

    Args:
      theta: {"wi": [I, 4H], "wh": [H, 4H], "b": [4H]}, gate blocks ordered i, f, g, o.
      carry: (c, h), each [U, H].
      x_UxI: [U, I] inputs.

    Returns:
      ((c', h'), h'), like a flax cell.
    """
    c, h = carry
    i, f, g, o = jnp.split(x_UxI @ theta["wi"] + h @ theta["wh"] + theta["b"], 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h


@dataclasses.dataclass(frozen=True)
class MetaLearner:
    """The gates of one backbone's parameter leaves, as pure functions (build with `make`).

    Attributes:
      leaves: one `Leaf` per backbone parameter leaf, in params order.
      config: the hyper-parameters.
    """

    leaves: tuple[Leaf, ...]
    config: Config

    def init(self, key: jax.Array) -> dict:
        """θ, a nested dict mirroring params; under each leaf's path:

        {"lstm{l}": {"wi": [I, 4H], "wh": [H, 4H], "b": [4H]} for l < num_layers (see
        `lstm_cell`), "out": {"kernel": [H, out] zeros, "bias": [out] ones}, "scale": []}.
        Call it without jit: eagerly it compiles a few programs; under jit, ResNet-32's ~900
        outputs take XLA:CPU ~15 s to compile.
        """
        shapes = {}  # Flat θ path -> shape of every LSTM kernel.
        for leaf in self.leaves:
            for layer in range(self.config.num_layers):
                in_size = leaf.in_size if layer == 0 else leaf.hidden
                shapes[(*leaf.path, f"lstm{layer}", "wi")] = (in_size, 4 * leaf.hidden)
                shapes[(*leaf.path, f"lstm{layer}", "wh")] = (leaf.hidden, 4 * leaf.hidden)
        # One draw for all kernels, cut with dynamic slices: eagerly, XLA then compiles one
        # program per distinct kernel size rather than one per kernel.
        noise = jax.random.normal(key, (sum(math.prod(s) for s in shapes.values()),))
        flat, offset = {}, 0
        for p, shape in shapes.items():
            size = math.prod(shape)
            chunk = lax.dynamic_slice_in_dim(noise, offset, size).reshape(shape)
            flat[p] = chunk / math.sqrt(shape[0])  # Lecun normal (untruncated).
            flat[(*p[:-1], "b")] = jnp.zeros(shape[1])
            offset += size
        tanh_gate = self.config.gate == "tanh"
        for leaf in self.leaves:  # §5.1: output weights 0, bias 1, learnable scale.
            flat[(*leaf.path, "out", "kernel")] = jnp.zeros((leaf.hidden, leaf.out_size))
            bias = jnp.ones if tanh_gate else jnp.zeros
            flat[(*leaf.path, "out", "bias")] = bias((leaf.out_size,))
            scale = 1.0 / math.tanh(1.0) if tanh_gate else self.config.log_range
            flat[(*leaf.path, "scale")] = jnp.asarray(scale, jnp.float32)
            if self.config.pull:  # ρ ≡ 0 at initialisation (s = 0): plain SGD.
                flat[(*leaf.path, "pull", "kernel")] = jnp.zeros((leaf.hidden, leaf.out_size))
                flat[(*leaf.path, "pull", "bias")] = jnp.zeros((leaf.out_size,))
                flat[(*leaf.path, "pull_scale")] = jnp.asarray(0.0, jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def init_state(self, dtype: Any = jnp.float32, anchor: dict | None = None) -> State:
        """Zero LSTM memory (start of an episode): per leaf, num_layers × (c, h) [units, H];
        with `Config.pull`, `anchor` is the backbone w0 the rule pulls towards (required)."""
        if self.config.pull and anchor is None:
            raise ValueError("metalearner: Config.pull needs init_state(anchor=backbone params "
                             "at the start of the task).")  # fmt: skip
        zeros = lambda leaf: jnp.zeros((leaf.units, leaf.hidden), dtype)
        lstm = traverse_util.unflatten_dict(
            {
                leaf.path: tuple((zeros(leaf), zeros(leaf)) for _ in range(self.config.num_layers))
                for leaf in self.leaves
            }
        )
        if self.config.pull:
            _check_tree(self.leaves, anchor, "anchor")
        momentum = step = None
        if self.config.history:
            momentum = traverse_util.unflatten_dict(
                {leaf.path: jnp.zeros(leaf.shape, dtype) for leaf in self.leaves}
            )
            step = jnp.zeros((), dtype)
        return State(lstm, anchor if self.config.pull else None, momentum, step)

    def start(self, backbone: dict, dtype: Any = jnp.float32) -> State:
        """The state at the start of a task learned from `backbone`: zero memory, and with
        `Config.pull` the backbone as the anchor."""
        return self.init_state(dtype, anchor=backbone if self.config.pull else None)

    def groups(self) -> list[tuple[Leaf, ...]]:
        """The leaves by the shapes of their LSTMs (units, input, width, output), in order."""
        groups = {}
        for leaf in self.leaves:
            shape = (leaf.units, leaf.in_size, leaf.hidden, leaf.out_size)
            groups.setdefault(shape, []).append(leaf)
        return [tuple(g) for g in groups.values()]

    def _lstm_input(self, leaf: Leaf, w, g, tap, extra=(), per_unit=()) -> jax.Array:
        """The LSTM input of one leaf, [units, in_size] (see the module docstring); `extra`
        per-weight tensors (w − w0, the momentum) follow g, normalised the same way, and
        `per_unit` scalars (the step feature) come last, as they are."""
        cfg = self.config
        norm = lambda x: jnp.clip(x / (_scale(x) + cfg.eps), -cfg.clip, cfg.clip)  # noqa: E731
        h_in, h_out = norm(tap.inputs.mean(0)), norm(tap.outputs.mean(0))
        per_weight = [w, g, *extra]
        if w.ndim == 1:
            act = h_in if leaf.act == "inputs" else h_out
            scalars = [h_out.mean(keepdims=True), *(jnp.reshape(x, (1,)) for x in per_unit)]
            return jnp.concatenate([*map(norm, per_weight), act, *scalars])[None]
        cout = w.shape[-1]
        cols = [norm(x).reshape(-1, cout).T for x in per_weight]
        h_in_UxC = jnp.broadcast_to(h_in, (cout, h_in.shape[0]))
        units = [jnp.broadcast_to(jnp.reshape(x, (1, 1)), (cout, 1)) for x in per_unit]
        return jnp.concatenate([*cols, h_in_UxC, h_out[:, None], *units], axis=1)

    def _gate(self, th: dict, carry: tuple, x: jax.Array):
        """One leaf's stacked LSTM: (δ [units, out_size], ρ [units, out_size] or None, new
        (c, h) per layer)."""
        new = []
        for layer in range(self.config.num_layers):
            c_h, x = lstm_cell(th[f"lstm{layer}"], carry[layer], x)
            new.append(c_h)
            x = jax.nn.relu(x)  # §5.1: ReLU in the hidden layers.
        z = x @ th["out"]["kernel"] + th["out"]["bias"]
        delta_UxO = th["scale"] * jnp.tanh(z)  # §5.1: tanh output, learnable scale.
        if self.config.gate == "exp":
            delta_UxO = jnp.exp(delta_UxO)
        pull_UxO = None
        if self.config.pull:
            z_pull = x @ th["pull"]["kernel"] + th["pull"]["bias"]
            s = jnp.clip(th["pull_scale"], 0.0, 1.0)
            pull_UxO = self.config.pull_max * s * jax.nn.sigmoid(z_pull)
        return delta_UxO, pull_UxO, tuple(new)

    def apply(
        self, theta: dict, state: State, params: dict, grads: dict, taps: dict
    ) -> tuple[dict, State]:
        """Gates δ for one student step (§4: δ·j = f(w·j, g·j, h, h'j; θ)); with `Config.pull`
        use `gates`, which also returns γ."""
        if self.config.pull:
            raise ValueError("metalearner: with Config.pull, call gates() for δ and γ, and "
                             "update(..., pulls=γ, anchor=state.anchor).")  # fmt: skip
        deltas, _, state = self.gates(theta, state, params, grads, taps)
        return deltas, state

    def gates(
        self, theta: dict, state: State, params: dict, grads: dict, taps: dict
    ) -> tuple[dict, dict | None, State]:
        """Gates δ (and, with `Config.pull`, pulls ρ) for one student step (§4: δ·j = f(w·j,
        g·j, h, h'j; θ)).

        Args:
          theta: from `init`.
          state: from `init_state` or the previous `apply`.
          params: backbone params, shaped as given to `make`.
          grads: gradients of the student loss, same tree as params.
          taps: {layer path: Tap(inputs [N, Cin], outputs [N, Cout])} from the forward pass
            that produced grads (extra entries are ignored).

        Returns:
          (deltas, pulls, state): deltas (and pulls; None without `Config.pull`) have the tree
          and shapes of params; state the new LSTM memory (the anchor carried unchanged; with
          `Config.history`, the momentum with this g folded in and the step count plus one).
          Add a leading episode axis to state/params/grads/taps with `jax.vmap` (θ unbatched).
        """
        cfg = self.config
        flat_w = _check_tree(self.leaves, params, "params")
        flat_g = _check_tree(self.leaves, grads, "grads")
        flat_0 = _check_tree(self.leaves, state.anchor, "anchor") if cfg.pull else None
        flat_m, step, per_unit = {}, None, ()
        if cfg.history:
            flat_m = _check_tree(self.leaves, state.momentum, "momentum")
            beta = cfg.momentum_decay
            flat_m = {p: beta * m + (1.0 - beta) * flat_g[p] for p, m in flat_m.items()}
            per_unit = (jnp.log1p(state.step) / 8.0,)
            step = state.step + 1
        xs = {}
        for leaf in self.leaves:
            _check_tap(leaf, taps)
            w, g = flat_w[leaf.path], flat_g[leaf.path]
            extra = (w - flat_0[leaf.path],) if cfg.pull else ()
            if cfg.history:
                extra = (*extra, flat_m[leaf.path])
            inputs = (w, g, taps[leaf.tap], extra, per_unit)
            if cfg.first_order:
                inputs = lax.stop_gradient(inputs)
            xs[leaf.path] = self._lstm_input(leaf, *inputs)
        deltas, pulls, memory = {}, {}, {}
        # Leaves whose LSTMs have the same shapes run as one LSTM vmapped over them (their θ
        # stacked on the fly; θ keeps its tree): the same values from fewer, larger ops.
        # ResNet-32's 99 leaves form 11 groups and its window traces in 17 s instead of 27 s
        # (docs/benchmarks.md, 2026-12-05).
        for group in self.groups():
            stack = lambda f, g=group: jax.tree.map(lambda *a: jnp.stack(a), *map(f, g))  # noqa: E731
            th = stack(lambda leaf: _get(theta, leaf.path))
            carry = stack(lambda leaf: _get(state.lstm, leaf.path))
            delta, pull, new = jax.vmap(self._gate)(th, carry,
                                                     stack(lambda leaf: xs[leaf.path]))  # fmt: skip
            for i, leaf in enumerate(group):
                w = flat_w[leaf.path]
                as_w = lambda x_UxO, w=w: x_UxO[0] if w.ndim == 1 else x_UxO.T.reshape(w.shape)  # noqa: E731
                deltas[leaf.path] = as_w(delta[i])
                if pull is not None:
                    pulls[leaf.path] = as_w(pull[i])
                memory[leaf.path] = jax.tree.map(lambda a, i=i: a[i], new)
        unflat = traverse_util.unflatten_dict
        momentum = unflat(flat_m) if cfg.history else None
        return (unflat(deltas), unflat(pulls) if cfg.pull else None,
                State(unflat(memory), state.anchor, momentum, step))  # fmt: skip


def make(params: dict, taps: dict, config: Config | None = None) -> MetaLearner:
    """Builds the meta-learner of a backbone from shapes only.

    Args:
      params: backbone params (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`);
        leaves are conv kernels [kH, kW, Cin, Cout], dense kernels [Din, Dout] or 1-D [C].
      taps: {layer path: Tap} of the same backbone (arrays or shape structs).
      config: hyper-parameters (default `Config()`).

    Returns:
      The `MetaLearner`.

    Raises:
      ValueError: a leaf of another rank, a leaf without a tap, or a tap of the wrong width.
    """
    config = Config() if config is None else config
    if config.gate not in GATES:
        raise ValueError(f"metalearner: gate={config.gate!r}; choose one of {GATES}.")
    flat = _flat(params, "params")
    leaves = tuple(_describe(path, tuple(x.shape), flat, config) for path, x in flat.items())
    for leaf in leaves:
        _check_tap(leaf, taps)
    return MetaLearner(leaves, config)


def update(
    params: dict, grads: dict, deltas: dict, lr: float, *, first_order: bool = False,
    pulls: dict | None = None, anchor: dict | None = None,
) -> dict:  # fmt: skip
    """The student step w − lr · δ ⊙ g (§4), leaf by leaf; with `pulls` ρ (`Config.pull`),
    w − lr · δ ⊙ g − ρ ⊙ (w − anchor).

    With `first_order`, g is a constant for meta-gradients (no Hessian term through ĝ).
    """
    if first_order:
        grads = lax.stop_gradient(grads)
    if pulls is None:
        return jax.tree.map(lambda w, g, d: w - lr * d * g, params, grads, deltas)
    step = lambda w, g, d, p, w0: w - lr * d * g - p * (w - w0)  # noqa: E731
    return jax.tree.map(step, params, grads, deltas, pulls, anchor)
