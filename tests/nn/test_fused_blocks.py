"""Fused blocks in exact mode: gradcheck on values and jets, chunked backward, jets vs nested autograd."""

import pytest
import torch

from pinnsketch.nn import MLP, ResidualMLP, JetSpec, make_storage
from pinnsketch.nn.activations import ACTIVATIONS, get_activation
from pinnsketch.nn.fused import BlockCall, FusedDense, _chunks

from nn_helpers import nested_derivatives, plain_forward, rel

SPECS = {
    "value": JetSpec(2),
    "jet2": JetSpec(2, [(0,), (1,), (0, 0)]),
    "jet4": JetSpec(2, [(0, 0, 0, 0), (0, 1)]),
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("spec_name,chunk", [("value", 2**18), ("jet2", 2**18), ("jet2", 7), ("jet4", 2**18)])
def test_gradcheck_exact(activation, spec_name, chunk):
    spec = SPECS[spec_name]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(spec.size, 5, 3, generator=g, dtype=torch.float64)
    if activation == "relu":
        z[0] = z[0] + 0.1 * z[0].sign()     # stay off the kink where finite differences break
    z.requires_grad_(True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    call = BlockCall(get_activation(activation), spec, make_storage("exact"), chunk_elements=chunk)
    assert torch.autograd.gradcheck(lambda z, w, b: FusedDense.apply(z, w, b, call), (z, w, b))


def test_forward_matches_jet_linear(spec2):
    g = torch.Generator().manual_seed(1)
    from pinnsketch.nn import Jet

    z = torch.randn(spec2.size, 6, 3, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    call = BlockCall(get_activation("tanh"), spec2, make_storage("exact"))
    expected = Jet(z, spec2).map("tanh").linear(w, b).streams
    torch.testing.assert_close(FusedDense.apply(z, w, b, call), expected)


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
@pytest.mark.parametrize("activation", ["tanh", "sin", "gelu", "relu"])
def test_model_jet_matches_nested_autograd(cls, activation, spec2):
    model = cls(2, 2, width=8, depth=3, activation=activation, seed=3, dtype=torch.float64)
    x = torch.rand(11, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    jet = model.jet(x, spec2)
    ref = nested_derivatives(lambda x: plain_forward(model, x), x, spec2)
    torch.testing.assert_close(jet.streams, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model(x), ref[0].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
def test_parameter_gradients_match_nested_autograd(cls, spec2):
    """A Burgers-like residual loss: first-order backward through jets == double backward."""
    model = cls(2, 1, width=8, depth=3, activation="tanh", seed=5, dtype=torch.float64)
    x = torch.rand(13, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def loss_of(streams):
        u, ux, ut, uxx = streams
        return ((ut + u * ux - 0.01 * uxx) ** 2).mean() + (u ** 2).mean()

    loss_of(model.jet(x, spec2).streams).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_of(nested_derivatives(lambda x: plain_forward(model, x), x, spec2)).backward()
    for mine, ref in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


def test_chunked_backward_equals_unchunked(spec2):
    model = MLP(2, 1, width=16, depth=3, seed=7, dtype=torch.float64)
    x = torch.rand(50, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = []
    for chunk in (2**20, 64):
        for block in model.blocks:
            block.chunk_elements = chunk
        model.zero_grad()
        (model.jet(x, spec2).streams ** 2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-12


def test_chunks_split_only_layers_above_the_element_budget():
    assert _chunks(2780, 4 * 20, 2**20) == [slice(None)]          # the Burgers benchmark's layers: one chunk
    parts = _chunks(100, 10, 250)                                   # 25 rows of 10 elements per chunk
    assert [(p.start, p.stop) for p in parts] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert [(p.start, p.stop) for p in _chunks(5, 10, 1)] == [(i, i + 1) for i in range(5)]


def test_block_shape_errors(spec2):
    model = MLP(2, 1, width=4, depth=1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        model(torch.rand(3, 3))
    with pytest.raises(ValueError, match="in_features=2"):
        model.jet(torch.rand(3, 3), JetSpec(3, [(0,)]))
