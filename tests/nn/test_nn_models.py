"""Models: construction, seeding and initialization, CNN and residual networks with every policy."""

import pytest
import torch

from pinnsketch.nn import CNN, MLP, ResidualMLP, MemoryMeter
from pinnsketch.nn.policies import STORAGES


def test_seed_and_generator_give_reproducible_weights():
    a, b = MLP(2, 1, width=8, depth=2, seed=5), MLP(2, 1, width=8, depth=2, seed=5)
    c = MLP(2, 1, width=8, depth=2, seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.blocks[1].weight, c.blocks[1].weight)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d, e = MLP(2, 1, width=8, depth=2, seed=g1), MLP(2, 1, width=8, depth=2, seed=g2)
    assert torch.equal(d.blocks[2].weight, e.blocks[2].weight)
    state = torch.random.get_rng_state()
    MLP(2, 1, width=8, depth=2, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())       # the global RNG is untouched


@pytest.mark.parametrize("activation,std", [("tanh", (2 / (400 + 400)) ** 0.5), ("relu", (2 / 400) ** 0.5)])
def test_initialization_scale(activation, std):
    w = MLP(400, 1, width=400, depth=2, activation=activation).blocks[1].weight
    assert abs(float(w.detach().std()) / std - 1) < 0.02
    assert float(MLP(400, 1, width=400, depth=2).blocks[1].bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("bad", [dict(width=0), dict(depth=-1), dict(in_features=2.5), dict(seed=-1),
                                 dict(activation="swish")])
def test_bad_model_arguments(bad):
    kwargs = dict(in_features=2, out_features=1, width=4, depth=2) | bad
    with pytest.raises(ValueError):
        MLP(**kwargs)


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_residual_mlp_trains_with_every_policy(storage, spec2):
    model = ResidualMLP(2, 1, width=12, depth=2, storage=storage, seed=1)
    assert len(model.blocks) == 4
    x = torch.rand(48, 2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        u = model.jet(x, spec2)
        loss = ((u.d((1,)) + u.value * u.d((0,)) - 0.1 * u.d((0, 0))) ** 2).mean() + ((u.value - 1) ** 2).mean()
        loss.backward()
        opt.step()
        model.advance()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert len(model.storage_report()) == 4


@pytest.mark.parametrize("storage", ["exact", "lowrank", "projection", "checkpoint"])
def test_cnn_forward_backward(storage):
    model = CNN(storage=storage, channels=(4, 8), hidden=32, seed=0)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    with MemoryMeter() as meter:
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
    assert logits.shape == (16, 10) and meter.peak_bytes > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(torch.rand(2, 3, 28, 28))


def test_cnn_exact_head_gradients_match_plain_pytorch():
    model = CNN(channels=(4, 8), hidden=32, seed=2, dtype=torch.float64)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model(x).square().sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    h = model.features(x).flatten(1)
    b0, b1 = model.blocks
    out = torch.relu(h @ b0.weight.T + b0.bias) @ b1.weight.T + b1.bias
    out.square().sum().backward()
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)
