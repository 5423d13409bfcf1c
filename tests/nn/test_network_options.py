"""Network options: Fourier/periodic embeddings, weight factorization, modified MLP, PirateNet.

Jets against nested autograd of a plain-PyTorch twin (float64), gradcheck of the
fused paths, exact periodicity, storage policies, and the rebuilt model of a run file.
"""

import math

import pytest
import torch

import pinnsketch as ps
from pinnsketch.nn import MLP, JetSpec, ModifiedMLP, PirateNet, ResidualMLP, make_storage
from pinnsketch.nn.block import DenseBlock
from pinnsketch.nn.embeddings import FourierFeatures, PeriodicEmbedding
from pinnsketch.nn.functional import plain_jet
from pinnsketch.nn.gated import _JetOp, _Recomputed
from pinnsketch.nn.activations import get_activation

from nn_helpers import nested_derivatives, rel

SPEC = JetSpec(2, [(0,), (1,), (0, 0), (0, 1), (1, 1)])
SPEC4 = JetSpec(2, [(0, 0, 0, 0), (0, 1)])

OPTIONS = {
    "fourier": (MLP, dict(fourier={"features": 5, "scale": 1.5})),
    "fourier_trainable": (MLP, dict(fourier={"features": 3, "scale": 1.0, "trainable": True})),
    "periodic": (MLP, dict(periodic={0: 2.0}, harmonics=2)),
    "periodic_fourier": (ResidualMLP, dict(periodic={0: 2.0}, fourier={"features": 4, "scale": 1.0})),
    "factorized": (MLP, dict(factorized=(1.0, 0.1))),
    "modified": (ModifiedMLP, dict(fourier={"features": 4, "scale": 1.0}, factorized=(1.0, 0.1))),
    "pirate": (PirateNet, dict(fourier={"features": 3, "scale": 1.0}, periodic={0: 2.0})),
}


def build(name, storage="exact", dtype=torch.float64, **kw):
    cls, options = OPTIONS[name]
    model = cls(2, 2, width=6, depth=2, activation=kw.pop("activation", "tanh"), storage=storage, seed=3,
                dtype=dtype, **options, **kw)
    if isinstance(model, PirateNet):
        with torch.no_grad():          # alpha starts at 0, which would hide the residual blocks
            model.alpha.copy_(torch.tensor([0.4, -0.7], dtype=dtype))
    return model


def twin(model, x):
    """The model's function in plain torch ops, written from the papers' formulas (for nested autograd)."""
    act = model.activation
    h = x if model.embedding is None else model.embedding(x)   # FourierFeatures/PeriodicEmbedding.forward
    blocks = list(model.blocks)

    def dense(b, t):
        return t @ b.weight.T + b.bias

    if isinstance(model, (ModifiedMLP, PirateNet)):
        u, v = act(dense(blocks[0], h)), act(dense(blocks[1], h))
        if isinstance(model, ModifiedMLP):
            for b in blocks[2:-1]:
                g = act(dense(b, h))
                h = g * u + (1 - g) * v
        else:
            for layer in range(model.depth):
                b1, b2, b3 = blocks[2 + 3 * layer:5 + 3 * layer]
                f = act(dense(b1, h))
                z1 = f * u + (1 - f) * v
                g = act(dense(b2, z1))
                z2 = g * u + (1 - g) * v
                a = model.alpha[layer]
                h = a * act(dense(b3, z2)) + (1 - a) * h
        return dense(blocks[-1], h)
    h = dense(blocks[0], h)
    for b in blocks[1:-1]:
        step = dense(b, act(h))
        h = h + step if isinstance(model, ResidualMLP) else step
    return dense(blocks[-1], act(h))


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("spec", [SPEC, SPEC4], ids=["order2", "order4"])
def test_jet_matches_nested_autograd_float64(name, spec):
    model = build(name)
    x = torch.rand(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    jet = model.jet(x, spec).streams
    ref = nested_derivatives(lambda t: twin(model, t), x, spec)
    assert rel(jet.detach(), ref.detach()) < 1e-12
    with torch.no_grad():
        assert torch.allclose(model(x), twin(model, x), atol=1e-13, rtol=0)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_parameter_gradients_match_the_twin(name):
    """The training gradient through the fused blocks equals autograd through the twin's derivatives."""
    model = build(name)
    x = torch.rand(11, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]
    ga = torch.autograd.grad(model.jet(x, SPEC).streams.square().sum(), params)
    ref = nested_derivatives(lambda t: twin(model, t), x, SPEC)
    gb = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_gradcheck_fused_path_float64(name):
    """gradcheck of the whole network jet (fused blocks, embeddings, gates) in its parameters."""
    model = build(name)
    x = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = tuple(p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad)
    wrapper = _JetOf(model)
    assert torch.autograd.gradcheck(
        lambda *params: torch.func.functional_call(wrapper, {f"model.{n}": p for n, p in zip(names, params)}, (x,)),
        values, fast_mode=True)


class _JetOf(torch.nn.Module):
    """forward(x) = model.jet(x, SPEC).streams, so that functional_call can swap the parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.jet(x, SPEC).streams


@pytest.mark.parametrize("kind", ["act", "gate", "residual"])
@pytest.mark.parametrize("spec", [SPEC, SPEC4], ids=["order2", "order4"])
def test_gradcheck_recomputed_jet_ops(kind, spec):
    g = torch.Generator().manual_seed(5)
    shape = (spec.size, 3, 4)
    tensors = [torch.randn(shape, dtype=torch.float64, generator=g) for _ in range({"act": 1}.get(kind, 3))]
    if kind == "residual":
        tensors = tensors[:2] + [torch.tensor([0.3], dtype=torch.float64)]
    tensors = [t.requires_grad_(True) for t in tensors]
    op = _JetOp(kind, get_activation("tanh"), spec)
    assert torch.autograd.gradcheck(lambda *t: _Recomputed.apply(op, *t), tensors)


@pytest.mark.parametrize("name", ["periodic", "periodic_fourier", "pirate"])
def test_periodic_embedding_is_exactly_periodic_with_derivatives(name):
    model = build(name)
    x = torch.rand(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    shifted = x + torch.tensor([2.0, 0.0], dtype=torch.float64)
    a, b = model.jet(x, SPEC).streams, model.jet(shifted, SPEC).streams
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # and not periodic along the other axis (the embedding passes it through)
    c = model.jet(x + torch.tensor([0.0, 2.0], dtype=torch.float64), SPEC).streams
    assert (a - c).abs().max() > 1e-3


def test_periodic_embedding_features():
    emb = PeriodicEmbedding(2, {1: 4.0}, harmonics=2, dtype=torch.float64)
    x = torch.tensor([[0.3, 1.0]], dtype=torch.float64)
    expected = [0.3, math.cos(math.pi / 2), math.cos(math.pi), math.sin(math.pi / 2), math.sin(math.pi)]
    assert emb.out_features == 5
    assert torch.allclose(emb(x), torch.tensor([expected], dtype=torch.float64), atol=1e-15)


def test_fourier_features_draw_from_the_generator():
    a = FourierFeatures(2, 8, 3.0, generator=torch.Generator().manual_seed(0))
    b = FourierFeatures(2, 8, 3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.B, b.B) and "B" in dict(a.named_buffers())
    assert 1.5 < float(a.B.std()) < 5.0
    assert "B" in dict(FourierFeatures(2, 8, 3.0, trainable=True).named_parameters())


def test_factorization_keeps_the_initial_weight_and_trains_s_and_v():
    gen = dict(generator=torch.Generator().manual_seed(0))
    plain = DenseBlock(3, 4, "tanh", make_storage("exact"), **gen)
    gen = dict(generator=torch.Generator().manual_seed(0))
    fact = DenseBlock(3, 4, "tanh", make_storage("exact"), factorized=(1.0, 0.1), **gen)
    assert torch.allclose(fact.weight, plain.weight, atol=1e-6)
    assert [n for n, _ in fact.named_parameters()] == ["weight_s", "weight_v", "bias"]
    assert 0.5 < float(fact.weight_s.detach().mean()) < 1.5
    z = torch.randn(1, 5, 3)
    fact(z, JetSpec(3)).square().sum().backward()
    assert fact.weight_s.grad.abs().sum() > 0 and fact.weight_v.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["fourier", "periodic_fourier", "factorized"])
def test_plain_jet_applies_embedding_and_factorized_weights(name):
    model = build(name)
    x = torch.rand(5, 2, dtype=torch.float64)
    assert torch.allclose(plain_jet(model, x, SPEC).streams, model.jet(x, SPEC).streams, atol=1e-13)


@pytest.mark.parametrize("name", ["modified", "pirate", "fourier", "factorized"])
@pytest.mark.parametrize("storage", ["lowrank", "checkpoint", "ema", "projection"])
def test_policies_give_the_exact_forward_and_close_gradients(name, storage):
    x = torch.rand(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ref, model = build(name), build(name, storage)
    a, b = ref.jet(x, SPEC).streams, model.jet(x, SPEC).streams
    assert torch.allclose(a, b, atol=1e-12)
    ga = torch.autograd.grad(a.square().sum(), list(ref.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(model.parameters()))
    a, b = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
    if storage in ("projection", "ema"):       # these estimate the weight gradients: close in direction
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.7
    else:
        assert rel(b, a) < 1e-3


def test_gated_networks_save_less_under_lowrank():
    """The policies still compress the blocks' inputs; the gates' tensors are saved exactly."""
    x = torch.rand(2048, 2, generator=torch.Generator().manual_seed(8))
    saved = {}
    for storage in ("exact", "lowrank"):
        model = ModifiedMLP(2, 1, width=64, depth=4, storage=storage, seed=0)
        with ps.MemoryMeter() as meter:
            out = model.jet(x, SPEC).streams
        saved[storage] = meter.peak_bytes
        out.sum().backward()
    assert saved["lowrank"] < 0.9 * saved["exact"]


@pytest.mark.parametrize("bad,match", [
    (dict(architecture="resnet"), "architecture"),
    (dict(fourier=ps.Fourier(features=4), periodic={"x": -1.0}), "period"),
    (dict(periodic={0: 2.0}), "input name"),
    (dict(periodic={}), "non-empty"),
    (dict(fourier=3), "ps.Fourier"),
    (dict(harmonics=0), "harmonics"),
    (dict(harmonics=3), "periodic="),
])
def test_network_option_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ps.Network(**bad)


def test_option_object_errors():
    with pytest.raises(ValueError, match="features"):
        ps.Fourier(features=0)
    with pytest.raises(ValueError, match="scale"):
        ps.Fourier(scale=-1.0)
    with pytest.raises(ValueError, match="std"):
        ps.Factorized(std=-0.1)
    with pytest.raises(ValueError, match="not one of the inputs"):
        ps.Network(periodic={"y": 1.0}).build(2, 1, "exact", torch.Generator(), torch.float32, torch.device("cpu"),
                                              input_names=("x", "t"))
    with pytest.raises(ValueError, match="factorized"):
        MLP(2, 1, factorized=1.0)
    with pytest.raises(ValueError, match="periodic axis"):
        MLP(2, 1, periodic={5: 1.0})


def test_network_config_round_trip():
    net = ps.Network(width=8, depth=2, architecture="pirate", fourier=True, periodic={"x": 2.0}, harmonics=2,
                     factorized=True)
    config = net.config()
    assert config["fourier"] == {"features": 64, "scale": 1.0, "trainable": False}
    assert config["factorized"] == {"mean": 1.0, "std": 0.1} and config["periodic"] == {"x": 2.0}
    assert ps.Network(**config) == net
    assert ps.Network().config() == {"width": 32, "depth": 4, "activation": "tanh"}


NETWORKS = {
    "fourier": ps.Network(width=8, depth=2, fourier=ps.Fourier(features=4, scale=1.0)),
    "periodic": ps.Network(width=8, depth=2, periodic={"x": 2.0}),
    "factorized": ps.Network(width=8, depth=2, factorized=True),
    "modified": ps.Network(width=8, depth=2, architecture="modified"),
    "pirate": ps.Network(width=8, depth=1, architecture="pirate", fourier=ps.Fourier(features=4),
                         periodic={"x": 2.0}, factorized=True),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("storage", ["exact", "lowrank"])
def test_solve_save_load_predict(name, storage, tmp_path):
    """A few steps of `ps.solve` with each option; the run file rebuilds the network and predicts the same."""
    from pinnsketch import problems

    result = ps.solve(problems.get("burgers"), network=NETWORKS[name], storage=storage,
                      adam=ps.Adam(steps=3), lbfgs=ps.LBFGS(steps=1, max_iter=2),
                      points=ps.Points(domain=64, boundary=8, initial=8), eval_every=100, eval_points=64,
                      progress=False, seed=1)
    assert all(math.isfinite(v) for v in result.history["loss"])
    assert result.config["network"] == NETWORKS[name].config()
    path = tmp_path / "run.h5"
    ps.save(result, path)
    run = ps.load(path)
    x = torch.rand(20, 2, dtype=torch.float64).numpy() * [2, 1] - [1, 0]
    with torch.no_grad():
        direct = result.model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    assert type(run.model) is type(result.model)
    assert abs(run.predict(x) - direct).max() < 1e-6
