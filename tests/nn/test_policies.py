"""Storage policies: validation, convergence to the exact gradient as the rank grows, unbiasedness."""

import math

import pytest
import torch

from pinnsketch.nn import (MLP, EMAStorage, JetSpec, LowRankStorage, ProjectionStorage, StorageError,
                           make_storage)
from pinnsketch.nn.activations import get_activation
from pinnsketch.nn.fused import BlockCall, FusedDense
from pinnsketch.nn.policies import STORAGES

from nn_helpers import rel

SPEC = JetSpec(2, [(0,), (1,), (0, 0)])
WIDTH, N = 12, 40


def weight_grads(storage, *, activation="tanh", seed=0, dtype=torch.float64, x=None):
    model = MLP(2, 1, width=WIDTH, depth=3, activation=activation, storage=storage, seed=seed, dtype=dtype)
    if x is None:
        x = torch.rand(N, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype) * 2 - 1
    u = model.jet(x, SPEC).streams
    (u[2] + u[0] * u[1] - 0.05 * u[3]).pow(2).mean().backward()
    return torch.cat([b.weight.grad.flatten() for b in model.blocks])


@pytest.fixture(scope="module")
def exact_grads():
    return {act: weight_grads("exact", activation=act) for act in ("tanh", "relu")}


# -- validation ----------------------------------------------------------------------
def test_unknown_policy_lists_choices():
    with pytest.raises(ValueError, match="choose one of") as err:
        make_storage("lowrnk")
    for name in STORAGES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="lowrnk"):
        MLP(2, 1, storage="lowrnk")


def test_a_spec_with_options_builds_the_policy_everywhere_a_name_does():
    policy = make_storage("lowrank:residual=int8,target=5e-3,rank=none")
    assert isinstance(policy, LowRankStorage) and policy.bits == 8 and policy.target == 5e-3
    assert policy.config() == {"residual": "int8", "target": 5e-3}
    model = MLP(2, 1, width=8, depth=2, storage="ema:beta=0.5")
    assert all(isinstance(s, EMAStorage) and s.beta == 0.5 for s in model.storages[1:])
    with pytest.raises(ValueError, match=r"bad options for storage 'lowrank' in 'lowrank:bogus=1'.*bogus"):
        make_storage("lowrank:bogus=1")
    with pytest.raises(ValueError, match=r"'rank' in 'lowrank:rank' is not KEY=VALUE; write e.g. lowrank:rank=8"):
        make_storage("lowrank:rank")
    with pytest.raises(ValueError, match=r"unknown storage policy 'lowrnk' in 'lowrnk:rank=2'"):
        make_storage("lowrnk:rank=2")


def test_storage_list_length_checked():
    with pytest.raises(ValueError, match="4 blocks"):
        MLP(2, 1, width=4, depth=3, storage=["exact", "lowrank"])


@pytest.mark.parametrize("factory", [lambda: LowRankStorage(rank=0), lambda: EMAStorage(rank=0),
                                     lambda: ProjectionStorage(k=0), lambda: LowRankStorage(r_min=5, r_max=2),
                                     lambda: EMAStorage(beta=1.0), lambda: LowRankStorage(residual="int3")])
def test_bad_options(factory):
    with pytest.raises(StorageError):
        factory()


@pytest.mark.parametrize("storage", [LowRankStorage(rank=WIDTH + 1, adaptive=False), EMAStorage(rank=WIDTH + 1),
                                     ProjectionStorage(k=N + 1)])
def test_rank_above_layer_size(storage):
    with pytest.raises(StorageError, match=r"exceeds .*pass"):
        weight_grads(["exact", storage, "exact", "exact"])


@pytest.mark.parametrize("name", ["lowrank", "ema", "projection"])
def test_non_finite_activation_reaching_sketch(name):
    x = torch.rand(N, 2, dtype=torch.float64)
    x[3, 0] = math.nan
    with pytest.raises(StorageError, match="non-finite"):
        weight_grads(name, x=x)


# -- convergence at full rank -------------------------------------------------------------
FULL = {
    "lowrank_sketch_only": lambda r: LowRankStorage(rank=r, residual=None, value_residual=None, adaptive=False,
                                                    r_max=WIDTH),
    "lowrank_int4": lambda r: LowRankStorage(rank=r, residual="int4", adaptive=False, r_max=WIDTH),
    "ema": lambda r: EMAStorage(beta=0.5, rank=r, derivative="exact"),
    "projection": lambda r: ProjectionStorage(k=r * N // WIDTH, derivative="exact"),
}


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_rank_is_exact(name, activation, exact_grads):
    # Block 0 (2 inputs) stays exact; the hidden blocks use the policy at full rank.
    policy = FULL[name](WIDTH)
    grads = weight_grads(["exact", policy, policy, policy], activation=activation)
    assert rel(grads, exact_grads[activation]) < 1e-5


@pytest.mark.parametrize("name", ["lowrank_sketch_only", "ema", "projection"])
def test_error_falls_as_rank_grows(name, exact_grads):
    errors = [rel(weight_grads(["exact"] + [FULL[name](r)] * 3), exact_grads["tanh"]) for r in (2, 6, WIDTH)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5


def test_residual_reduces_lowrank_error(exact_grads):
    def err(residual):
        p = LowRankStorage(rank=2, residual=residual, value_residual=residual, adaptive=False)
        return rel(weight_grads(["exact", p, p, p]), exact_grads["tanh"])

    e_none, e4, e8 = err(None), err("int4"), err("int8")
    assert e8 < e4 < e_none
    assert e8 < 1e-2 * e_none


# -- projection is unbiased ----------------------------------------------------------------
def test_projection_unbiased_at_expected_rate():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(SPEC.size, 64, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(SPEC.size, 64, 5, generator=g, dtype=torch.float64)

    def grad_w(storage):
        w.grad = None
        call = BlockCall(get_activation("tanh"), SPEC, storage)
        FusedDense.apply(z, w, None, call).backward(grad_out)
        return w.grad.clone()

    exact = grad_w(make_storage("exact"))
    samples = torch.stack([grad_w(ProjectionStorage(k=8, operator="gaussian").bind(0, seed)) for seed in range(400)])
    single = sum(rel(s, exact) for s in samples[:50]) / 50
    err_100 = rel(samples[:100].mean(0), exact)
    err_400 = rel(samples.mean(0), exact)
    # the mean converges like 1/sqrt(n): within a generous factor of single/sqrt(n)
    assert err_400 < 3 * single / math.sqrt(400)
    assert err_100 < 3 * single / math.sqrt(100)
    assert err_400 < err_100
    assert single > 0.3         # one draw is far off: the agreement comes from averaging


def test_policy_object_is_cloned_per_block():
    p = LowRankStorage(target=0.05)
    model = MLP(2, 1, width=8, depth=2, storage=p)
    storages = model.storages
    assert len({id(s) for s in storages}) == 3 and all(s is not p for s in storages)
    assert [s.layer for s in storages] == [0, 1, 2] and all(s.target == 0.05 for s in storages)


@pytest.mark.parametrize("policy", [LowRankStorage(target=1e-3, residual="int8", r_max=16), EMAStorage(beta=0.5),
                                    ProjectionStorage(k=8), LowRankStorage()])
def test_config_rebuilds_the_policy(policy):
    """config() lists the constructor arguments that differ from the defaults, so run files can record
    a policy object and rebuild it."""
    config = policy.config()
    assert type(policy)(**config).config() == config
    assert config == {k: v for k, v in config.items() if k in type(policy).__init__.__code__.co_varnames}
