"""The benchmark's yardsticks: PyTorch's ResNet-GN is l2r's, XLA's FLOP count of a matmul, and
the readout-solver comparison agrees with scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench.common import num_params
from experiments.bench.flops import xla_flops
from experiments.bench.probe import print_fits
from experiments.bench.torch_ref import copy_to_torch, torch_resnet_gn
from l2r import models


def test_torch_resnet_gn_is_l2rs():
    torch = pytest.importorskip("torch")
    model = models.make_model("resnet", depth=32, widths=(16, 32, 64))
    key = jax.random.key(0)
    params = {
        "backbone": model.init(key, (1, 16, 16, 3)),
        "head": models.init_head(key, model.representation_dim, 10),
    }
    # Non-trivial GroupNorm affines and head bias, so that a swapped or transposed copy shows.
    gen = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.1 * gen.standard_normal(a.shape, np.float32), params)
    net = torch_resnet_gn(depth=32)
    assert sum(p.numel() for p in net.parameters()) == num_params(params)

    copy_to_torch(params, net)
    # 16x16 pads the two stride-2 convs (0, 1), like XLA's 'SAME' and unlike PyTorch's habit.
    x = gen.standard_normal((2, 16, 16, 3), np.float32)
    logits = lambda p, x: models.apply_head(p["head"], model.apply(p["backbone"], x).representation)
    want = np.asarray(jax.jit(logits)(params, x))
    with torch.no_grad():
        got = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_xla_flops_of_a_matmul():
    n = 64
    a = jnp.ones((n, n), jnp.float32)
    compiled = jax.jit(jnp.dot).lower(a, a).compile()
    assert xla_flops(compiled) == 2 * n**3


@pytest.mark.slow
def test_readout_solvers_agree_with_sklearn(capsys):
    out = print_fits(num_fits=2, n=600, d=8, k=3)
    assert set(out["seconds"]) >= {"adam_one_by_one", "adam_vmap", "lbfgs_vmap", "sklearn"}
    assert min(out["agreement_vs_sklearn"].values()) >= 0.97
    assert "| lbfgs_vmap |" in capsys.readouterr().out


def test_meta_bench_times_a_teacher_step_of_a_meta_run():
    from experiments.bench.meta import IMAGE_SHAPES, meta_setup, teacher_step_seconds

    _, _, run = meta_setup("smoke", dict(num_episodes_parallel=1), IMAGE_SHAPES["smoke"], n=64)
    assert run.problem.batches(0, 2)[0].shape[:2] == (1, 2)
    assert teacher_step_seconds(run, repeats=1, steps=2) > 0


def test_paper_projection_walks_the_curriculum():
    from experiments.bench.paper import projected_seconds
    from l2r.configs import exp1

    config = exp1.get_config("paper")  # 900 episodes of 500 steps, 4 in flight, T-BPTT 5/7/9.
    # 300 episodes per stage: 75 rounds of 4 episodes, 100 / 72 / 56 windows each.
    assert projected_seconds(config, {5: 1.0, 7: 10.0, 9: 100.0}) == 7500 + 54000 + 420000
