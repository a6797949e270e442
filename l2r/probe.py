"""Representation probes (SPEC §1, paper §3): how much task information a frozen network's
representation (the layer before the head) still holds, read as a fresh linear readout's test
accuracy (`readout_accuracy`; "Readout"), the task's original head's accuracy (`head_accuracy`;
"Original") and linear CKA between two representations (`linear_cka`). All are deterministic
pure functions of arrays (full batch, zero init), jit- and vmap-able; `readout_accuracies`
fits many snapshots in one call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SOLVERS = ("adam", "lbfgs")

# Full float32 matmuls on GPU/TPU too (no TF32/bf16 passes), so that fits and CKA agree across
# backends; the readout's matmuls are a small part of a probe's cost.
_HI = jax.lax.Precision.HIGHEST

# Units whose training std is at or below this are treated as dead: centred, not rescaled.
_DEAD_STD = 1e-6


class ReadoutConfig(NamedTuple):
    """How a linear readout is fitted.

    The default solver is L-BFGS, not the paper's Adam: on CPU it fits an order of magnitude
    faster, with test predictions as close to scikit-learn's as Adam's (docs/benchmarks.md,
    2026-11-25). ``PAPER_READOUT`` is the paper's protocol (§3: 500 full-batch Adam steps,
    lr 0.1) for exact reproduction; experiment configs name their solver explicitly.

    Attributes:
      solver: "lbfgs" (``optax.lbfgs`` with its zoom line search; stops once the largest
        gradient entry is below ``tol``, after ``steps`` iterations, or when the line search
        stops making progress; ``learning_rate`` is unused) or "adam" (``steps`` full-batch
        Adam steps at ``learning_rate``, the paper's protocol).
      steps: Adam steps, or the L-BFGS iteration cap (it typically needs 15-50). Must be >= 1.
      learning_rate: Adam learning rate.
      l2: Weight decay on the kernel (not the bias): the loss is the mean cross-entropy plus
        ``l2 / 2 * ||kernel||^2``. scikit-learn's ``LogisticRegression(C=c)`` on N examples is
        ``l2 = 1 / (c * N)``. With 0 and linearly separable features the optimum is at
        infinity; L-BFGS still stops (the gradient falls below ``tol``) with a max-margin-like
        direction, as the paper's fixed-budget Adam does.
      standardize: Standardise features with the training features' mean/std first.
      tol: L-BFGS tolerance on the largest absolute gradient entry (scipy/scikit-learn's gtol).
    """

    solver: str = "lbfgs"
    steps: int = 500
    learning_rate: float = 0.1
    l2: float = 0.0
    standardize: bool = True
    tol: float = 1e-4


DEFAULT_READOUT = ReadoutConfig()

# The paper's readout protocol (§3): 500 full-batch Adam steps at lr 0.1 from a zero init.
PAPER_READOUT = ReadoutConfig(solver="adam", steps=500, learning_rate=0.1)


class Readout(NamedTuple):
    """A fitted linear readout: ``logits = ((x - mean) / std) @ kernel + bias``.

    Attributes:
      kernel: [D, K] weights (on standardised features).
      bias: [K] biases.
      mean: [D] feature means subtracted first (zeros when not standardising).
      std: [D] feature scales divided by next (ones when not standardising).
    """

    kernel: jax.Array
    bias: jax.Array
    mean: jax.Array
    std: jax.Array


def validate_config(config: ReadoutConfig) -> None:
    """Raises ValueError, naming the fix, if `config` cannot be fitted."""
    if not isinstance(config, ReadoutConfig):
        raise TypeError(f"config must be a probe.ReadoutConfig, got {type(config).__name__}.")
    if config.solver not in SOLVERS:
        raise ValueError(
            f"ReadoutConfig.solver={config.solver!r} is unknown; choose one of "
            f"{', '.join(repr(s) for s in SOLVERS)}."
        )
    if not isinstance(config.steps, (int, np.integer)) or config.steps < 1:
        raise ValueError(f"ReadoutConfig.steps={config.steps!r}; use an integer >= 1.")
    if not config.learning_rate > 0:
        raise ValueError(f"ReadoutConfig.learning_rate={config.learning_rate}; use a value > 0.")
    if not config.l2 >= 0:
        raise ValueError(f"ReadoutConfig.l2={config.l2}; use a value >= 0 (0 = no decay).")
    if not config.tol > 0:
        raise ValueError(f"ReadoutConfig.tol={config.tol}; use a value > 0.")


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}; pass the task's class count (>= 2).")


def _check_labels(name: str, labels, num_classes: int) -> None:
    """Checks label dtype and, when the values are concrete (not traced), their range."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} has dtype {labels.dtype}; pass integer class ids.")
    if isinstance(labels, jax.core.Tracer):
        return  # Under jit/vmap the values are unknown; one_hot maps bad ids to all-zero rows.
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} holds ids in [{labels.min()}, {labels.max()}] but num_classes="
            f"{num_classes}; pass ids in [0, num_classes) or raise num_classes."
        )


def _check_features(name: str, x, ndim: int | None = None) -> None:
    if x.ndim < 2 or (ndim is not None and x.ndim != ndim):
        want = f"{ndim}-d" if ndim else "at least 2-d"
        raise ValueError(f"{name} has shape {x.shape}; pass {want} features [..., N, D].")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {x.dtype}; pass floating-point features.")


# ----------------------------------------------------------------------------------------------
# The fit. A readout step is two skinny matmuls ([K, D] @ [D, N] for the logits, [K, N] @ [N, D]
# for the gradient), which XLA:CPU runs fastest in different memory layouts; so the fit keeps
# both x and x.T, writes the softmax as element-wise ops over the K class rows, and writes the
# gradient by hand, so that autodiff cannot pick the slow layouts back (3x faster than optax
# Adam through autodiff: docs/benchmarks.md, 2026-11-25).


class _Data(NamedTuple):
    """Standardised training data in the two layouts the readout step wants."""

    x_ND: jax.Array
    x_DN: jax.Array
    y_KN: jax.Array  # one-hot labels, classes first


def _standardizer(x_ND: jax.Array, standardize: bool) -> tuple[jax.Array, jax.Array]:
    d = x_ND.shape[-1]
    if not standardize:
        return jnp.zeros((d,), x_ND.dtype), jnp.ones((d,), x_ND.dtype)
    # Why standardise: the representation's scale drifts while Task B trains the backbone, and
    # a fixed-lr (0.1) Adam protocol fitted on raw features would then behave differently per
    # snapshot (Adam's step is scale-free in the weights, so the logits move faster on larger
    # features). Dead units (std 0) are centred but not rescaled, so they stay exactly 0.
    mean = jnp.mean(x_ND, axis=0)
    std = jnp.std(x_ND, axis=0)
    return mean, jnp.where(std > _DEAD_STD, std, 1.0)


def _softmax_rows(z_KN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the K class rows of [K, N] logits, and log-partition [N].

    Written as element-wise ops across rows (one fused loop over N): XLA:CPU reduces over a
    short leading axis several times slower.
    """
    rows = [z_KN[k] for k in range(z_KN.shape[0])]
    m_N = functools.reduce(jnp.maximum, rows)
    e_KN = jnp.exp(z_KN - m_N)
    s_N = functools.reduce(jnp.add, [e_KN[k] for k in range(z_KN.shape[0])])
    return e_KN / s_N, m_N + jnp.log(s_N)


def _loss_and_grad(params, data: _Data, l2: float):
    """Mean softmax cross-entropy + l2/2 ||W||^2 and its gradient, by hand.

    Args:
      params: (w_KD [K, D], b_K [K]).
      data: the standardised training data.
      l2: kernel weight decay.

    Returns:
      (loss scalar, (g_KD, g_K)).
    """
    w_KD, b_K = params
    n = data.x_ND.shape[0]
    z_KN = jnp.matmul(w_KD, data.x_DN, precision=_HI) + b_K[:, None]  # fast layout for logits
    p_KN, logz_N = _softmax_rows(z_KN)
    loss = jnp.mean(logz_N - jnp.sum(data.y_KN * z_KN, axis=0)) + 0.5 * l2 * jnp.sum(w_KD**2)
    g_KN = (p_KN - data.y_KN) * (1.0 / n)
    g_KD = jnp.matmul(g_KN, data.x_ND, precision=_HI) + l2 * w_KD  # fast layout for the gradient
    return loss, (g_KD, jnp.sum(g_KN, axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _loss(params, data: _Data, l2: float):
    """The readout loss with a hand-written VJP, for solvers that call jax.grad (L-BFGS)."""
    return _loss_and_grad(params, data, l2)[0]


def _loss_fwd(params, data, l2):
    loss, grad = _loss_and_grad(params, data, l2)
    return loss, (grad, data)


def _loss_bwd(l2, res, ct):
    grad, data = res
    zeros = jax.tree.map(jnp.zeros_like, data)  # the data are constants; XLA drops these
    return jax.tree.map(lambda g: ct * g, grad), zeros


_loss.defvjp(_loss_fwd, _loss_bwd)


def _fit_adam(params, data: _Data, config: ReadoutConfig):
    opt = optax.adam(config.learning_rate)

    def step(carry, _):
        params, state = carry
        _, grad = _loss_and_grad(params, data, config.l2)
        updates, state = opt.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, config.steps)
    return params


def _fit_lbfgs(params, data: _Data, config: ReadoutConfig):
    opt = optax.lbfgs()
    fn = lambda p: _loss(p, data, config.l2)  # noqa: E731
    value, grad = _loss_and_grad(params, data, config.l2)

    def running(carry):
        i, _, _, _, grad, moved = carry
        gmax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g)) for g in grad])
        # `moved` is False once the line search finds no decrease (float32 floor): stop then
        # rather than spin until `steps`.
        return (i < config.steps) & (gmax > config.tol) & moved

    def step(carry):
        i, params, state, value, grad, _ = carry
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fn)
        moved = functools.reduce(jnp.logical_or, [jnp.any(u != 0) for u in updates])
        params = optax.apply_updates(params, updates)
        # The zoom line search already evaluated the value and gradient at the new point.
        value = optax.tree.get(state, "value")
        grad = optax.tree.get(state, "grad")
        return i + 1, params, state, value, grad, moved

    carry = (0, params, opt.init(params), value, grad, jnp.array(True))
    return jax.lax.while_loop(running, step, carry)[1]


def _fit(x_ND: jax.Array, y_N: jax.Array, num_classes: int, config: ReadoutConfig) -> Readout:
    x_ND = x_ND.astype(jnp.float32) if x_ND.dtype != jnp.float64 else x_ND
    mean, std = _standardizer(x_ND, config.standardize)
    xs_ND = (x_ND - mean) / std
    data = _Data(xs_ND, xs_ND.T, jax.nn.one_hot(y_N, num_classes, dtype=x_ND.dtype).T)
    d = x_ND.shape[-1]
    params = (jnp.zeros((num_classes, d), x_ND.dtype), jnp.zeros((num_classes,), x_ND.dtype))
    fit = _fit_adam if config.solver == "adam" else _fit_lbfgs
    w_KD, b_K = fit(params, data, config)
    return Readout(kernel=w_KD.T, bias=b_K, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------
# Public API.


def _check_fit_inputs(x_train, y_train, num_classes, config, x_test=None, y_test=None):
    """Validates a fit's inputs ([*S, N, D] features, [N] shared labels) before any work."""
    validate_config(config)
    _check_num_classes(num_classes)
    _check_features("x_train", x_train)
    _check_labels("y_train", y_train, num_classes)
    if y_train.shape != x_train.shape[-2:-1]:
        raise ValueError(
            f"y_train has shape {y_train.shape} but x_train has {x_train.shape}; "
            "pass one label per training row: [N] labels for [..., N, D] features."
        )
    if x_test is None:
        return
    _check_features("x_test", x_test)
    _check_labels("y_test", y_test, num_classes)
    if x_test.shape[:-2] != x_train.shape[:-2] or x_test.shape[-1] != x_train.shape[-1]:
        raise ValueError(
            f"x_test {x_test.shape} does not match x_train {x_train.shape}; pass "
            "the same leading (snapshot) dims and feature size D."
        )
    if y_test.shape != x_test.shape[-2:-1]:
        raise ValueError(
            f"y_test has shape {y_test.shape} but x_test has {x_test.shape}; pass "
            "one label per test row: [M] labels for [..., M, D] features."
        )


def fit_readout(
    x_ND: jax.Array, y_N: jax.Array, num_classes: int, config: ReadoutConfig = DEFAULT_READOUT
) -> Readout:
    """Fits a linear softmax readout on frozen features (full batch, zero init, deterministic).

    Args:
      x_ND: [N, D] training features.
      y_N: [N] integer labels in [0, num_classes).
      num_classes: K (static).
      config: the solver and its settings.

    Returns:
      The fitted `Readout` (kernel [D, K], bias [K], mean [D], std [D]).
    """
    _check_fit_inputs(x_ND, y_N, num_classes, config)
    if x_ND.ndim != 2:
        raise ValueError(
            f"x_ND has shape {x_ND.shape}; pass [N, D] features (fit_readouts "
            "takes leading snapshot dims)."
        )
    return _jit_fit(x_ND, y_N, num_classes, config)


def predict(readout: Readout, x_ND: jax.Array) -> jax.Array:
    """Readout logits [N, K] for features [N, D], standardised as in the fit.

    Also takes readouts with leading dims [*S] and features [*S, N, D] (-> [*S, N, K]).
    """
    mean, std = readout.mean[..., None, :], readout.std[..., None, :]
    xs = (x_ND - mean) / std
    return jnp.matmul(xs, readout.kernel, precision=_HI) + readout.bias[..., None, :]


def readout_accuracy(
    x_train_ND: jax.Array,
    y_train_N: jax.Array,
    x_test_MD: jax.Array,
    y_test_M: jax.Array,
    num_classes: int,
    config: ReadoutConfig = DEFAULT_READOUT,
) -> jax.Array:
    """Test accuracy (scalar in [0, 1]) of a readout fitted on the training features.

    Args:
      x_train_ND: [N, D] training features.
      y_train_N: [N] training labels.
      x_test_MD: [M, D] test features (same network, same D).
      y_test_M: [M] test labels.
      num_classes: K (static).
      config: the solver and its settings.
    """
    _check_fit_inputs(x_train_ND, y_train_N, num_classes, config, x_test_MD, y_test_M)
    if x_train_ND.ndim != 2:
        raise ValueError(
            f"x_train_ND has shape {x_train_ND.shape}; pass [N, D] features "
            "(readout_accuracies takes leading snapshot dims)."
        )
    return head_accuracy(
        predict(fit_readout(x_train_ND, y_train_N, num_classes, config), x_test_MD), y_test_M
    )


def fit_readouts(
    x_train_SND: jax.Array,
    y_train_N: jax.Array,
    num_classes: int,
    config: ReadoutConfig = DEFAULT_READOUT,
    chunk: int | None = None,
) -> Readout:
    """Fits one readout per snapshot: every leading index of `x_train_SND` has its own features.

    Args:
      x_train_SND: [*S, N, D] features, any leading dims (e.g. [seeds, steps, N, D]).
      y_train_N: [N] labels shared by all snapshots.
      num_classes: K (static).
      config: the solver and its settings.
      chunk: how many fits are vmapped together; the flattened snapshots go through `lax.map`
        in chunks of this size. None picks by backend: 1 on CPU, where vmapping is no faster
        (each fit is memory-bound, and one fit's features stay in cache; docs/benchmarks.md,
        2026-11-25); on accelerators as many as keep the working copies of the features under
        ~1 GiB (all of them in the experiments).

    Returns:
      A `Readout` whose fields have leading dims [*S].
    """
    _check_fit_inputs(x_train_SND, y_train_N, num_classes, config)
    if chunk is not None and (not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk={chunk!r}; use None (pick by backend) or an integer >= 1.")
    return _jit_fit_many(x_train_SND, y_train_N, num_classes, config, chunk)


def readout_accuracies(
    x_train_SND: jax.Array,
    y_train_N: jax.Array,
    x_test_SMD: jax.Array,
    y_test_M: jax.Array,
    num_classes: int,
    config: ReadoutConfig = DEFAULT_READOUT,
    chunk: int | None = None,
) -> jax.Array:
    """Readout test accuracies of many snapshots in one call.

    Args:
      x_train_SND: [*S, N, D] training features per snapshot (any leading dims *S).
      y_train_N: [N] training labels, shared.
      x_test_SMD: [*S, M, D] test features per snapshot.
      y_test_M: [M] test labels, shared.
      num_classes: K (static).
      config: the solver and its settings.
      chunk: fits vmapped together; see `fit_readouts`.

    Returns:
      [*S] accuracies in [0, 1].
    """
    _check_fit_inputs(x_train_SND, y_train_N, num_classes, config, x_test_SMD, y_test_M)
    readouts = fit_readouts(x_train_SND, y_train_N, num_classes, config, chunk)
    return head_accuracy(predict(readouts, x_test_SMD), y_test_M)


def _auto_chunk(num_fits: int, n: int, d: int) -> int:
    """Fits per vmapped chunk when the caller does not say: 1 on CPU (vmapping is no faster
    there); on accelerators as many as keep the fit's working copies (standardised
    features in two layouts) under ~1 GiB."""
    if jax.default_backend() == "cpu":
        return 1
    return max(1, min(num_fits, (1 << 30) // (2 * n * d * 4)))


def _fit_many(x_SND, y_N, num_classes, config, chunk):
    lead = x_SND.shape[:-2]
    x_FND = x_SND.reshape((-1, *x_SND.shape[-2:]))
    f = x_FND.shape[0]
    if chunk is None:
        chunk = _auto_chunk(f, x_FND.shape[-2], x_FND.shape[-1])
    fit = functools.partial(_fit, y_N=y_N, num_classes=num_classes, config=config)
    readouts = jax.lax.map(fit, x_FND, batch_size=min(chunk, f) if chunk > 1 else None)
    return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), readouts)


_jit_fit = jax.jit(_fit, static_argnums=(2, 3))
_jit_fit_many = jax.jit(_fit_many, static_argnums=(2, 3, 4))


def head_accuracy(logits_NK: jax.Array, labels_N: jax.Array) -> jax.Array:
    """Accuracy of a classification head: mean of argmax(logits) == label.

    Args:
      logits_NK: [..., N, K] logits.
      labels_N: [..., N] integer labels (broadcast against the logits' leading dims).

    Returns:
      [...] accuracies in [0, 1].
    """
    if logits_NK.ndim < 2 or labels_N.ndim < 1 or logits_NK.shape[-2] != labels_N.shape[-1]:
        raise ValueError(
            f"logits {logits_NK.shape} and labels {labels_N.shape} do not match; "
            "pass logits [..., N, K] and labels [..., N]."
        )
    return jnp.mean(jnp.argmax(logits_NK, axis=-1) == labels_N, axis=-1)


def linear_cka(x_ND: jax.Array, y_NE: jax.Array) -> jax.Array:
    """Centred linear CKA between two representations of the same N inputs.

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y (the feature-space
    form of HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels); in [0, 1],
    invariant to orthogonal transforms and isotropic scaling of either input. NaN when either
    representation is constant over the inputs (CKA is undefined there).

    Args:
      x_ND: [N, D] features.
      y_NE: [N, E] features of the same inputs (E may differ from D).

    Returns:
      Scalar CKA.
    """
    if x_ND.ndim != 2 or y_NE.ndim != 2 or x_ND.shape[0] != y_NE.shape[0]:
        raise ValueError(
            f"linear_cka got {x_ND.shape} and {y_NE.shape}; pass [N, D] and "
            "[N, E] features of the same N inputs (vmap for leading dims)."
        )
    dtype = jnp.promote_types(jnp.result_type(x_ND, y_NE), jnp.float32)

    def prep(a):
        a = a.astype(dtype)
        a = a - jnp.mean(a, axis=0)
        # Unit Frobenius norm first: every product below is then <= 1 in magnitude, so nothing
        # overflows float32 however large N or the activations are (CKA is scale-invariant).
        return a / jnp.linalg.norm(a)

    x, y = prep(x_ND), prep(y_NE)
    cross = jnp.sum(jnp.matmul(y.T, x, precision=_HI) ** 2)
    xx = jnp.linalg.norm(jnp.matmul(x.T, x, precision=_HI))
    yy = jnp.linalg.norm(jnp.matmul(y.T, y, precision=_HI))
    return cross / (xx * yy)


def layer_cka(reps_x: dict, reps_y: dict) -> dict:
    """`linear_cka` layer by layer: {name: [N, ...]} and {name: [N, ...]} of the same N inputs
    (two networks' feature maps, or their taps' `outputs`; trailing dims are flattened) ->
    {name: scalar CKA}."""
    if reps_x.keys() != reps_y.keys():
        raise ValueError(f"layer_cka got layers {sorted(reps_x)} and {sorted(reps_y)}; pass the "
                         "same layer names for both.")  # fmt: skip
    flat = lambda a: jnp.reshape(a, (a.shape[0], -1))  # noqa: E731
    return {k: linear_cka(flat(reps_x[k]), flat(reps_y[k])) for k in reps_x}
