"""Forward-mode jets against nested reverse-mode autograd (float64)."""

import pytest
import torch

from pinnsketch.nn.activations import ACTIVATIONS, get_activation
from pinnsketch.nn.jet import Jet, JetSpec


def autograd_derivative(fn, x, mi):
    """d^mi fn(x) by nested autograd; fn maps (N, d) -> (N, w). Returns (N, w)."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    cols = []
    for c in range(out.shape[1]):
        y = out[:, c]
        for axis in mi:
            if not y.requires_grad:  # already constant in x: higher derivatives vanish
                y = torch.zeros_like(y)
                break
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True, materialize_grads=True)
            y = g[:, axis]
        cols.append(y)
    return torch.stack(cols, dim=1).detach()


SPEC = JetSpec(2, [(0,), (1,), (0, 0), (0, 1), (0, 0, 0, 0), (1, 1, 1)])


def random_params(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5,
         torch.randn(o, generator=g, dtype=torch.float64))
        for i, o in zip(sizes[:-1], sizes[1:])
    ]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_network_jet_matches_nested_autograd(activation):
    params = random_params(0, [2, 5, 4, 3])
    act = get_activation(activation)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if activation == "relu":
        x = x + 0.01  # stay away from kinks

    def plain(x):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w.T + b
            if i < len(params) - 1:
                h = act(h)
        return h

    jet = Jet.input(x, SPEC)
    for i, (w, b) in enumerate(params):
        jet = jet.linear(w, b)
        if i < len(params) - 1:
            jet = jet.map(act)
    for mi in SPEC.indices:
        torch.testing.assert_close(jet.d(mi), autograd_derivative(plain, x, mi), rtol=1e-10, atol=1e-10)


def test_arithmetic_and_elementary_functions_match_autograd():
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    c = torch.linspace(1.0, 2.0, 6, dtype=torch.float64).unsqueeze(1)

    def plain(x):
        a, b = x[:, 0:1], x[:, 1:2]
        return torch.cat([
            a * b + 3.0 - b / a,
            torch.sin(a) * torch.exp(b) - a ** 3,
            torch.log(a + b).sqrt() + a ** 0.5 * torch.cos(b),
            (2.0 - a) * c + torch.tanh(a * b) / (1.0 + b),
        ], dim=1)

    xj = Jet.input(x, SPEC)
    a, b = xj[:, 0:1], xj[:, 1:2]
    jet = Jet.cat([
        a * b + 3.0 - b / a,
        torch.sin(a) * b.exp() - a ** 3,
        (a + b).log().sqrt() + a ** 0.5 * b.cos(),
        (2.0 - a) * c + (a * b).tanh() / (1.0 + b),
    ])
    for mi in SPEC.indices:
        torch.testing.assert_close(jet.d(mi), autograd_derivative(plain, x, mi), rtol=1e-10, atol=1e-10)


def test_tensor_on_the_left_dispatches_to_the_jet():
    x = torch.rand(4, 2, dtype=torch.float64)
    xj = Jet.input(x, SPEC)
    t = torch.full((4, 1), 2.0, dtype=torch.float64)
    assert isinstance(t * xj[:, 0:1], Jet)
    torch.testing.assert_close((t - xj[:, 0:1]).d((0,)), -torch.ones(4, 1, dtype=torch.float64))


def test_spec_closure_order_and_names():
    spec = JetSpec.from_names(["xx", "t"], input_names=("x", "t"))
    assert spec.indices == ((), (0,), (1,), (0, 0))
    assert spec.order == 2 and spec.size == 4
    assert spec.index((0, 0)) == 3
    assert spec.name_of((0, 1), ("x", "t")) == "xt"
    assert JetSpec(1, [(0, 0, 0, 0)]).size == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_agrees_with_torch_tanh_to_a_few_eps(dtype):
    """Tanh computes tanh through sigmoid on the CPU: absolute error of a few eps, exact +-1 far out."""
    x64 = torch.cat([torch.linspace(-30, 30, 20001, dtype=torch.float64),
                     torch.logspace(-30, 0, 301, dtype=torch.float64),
                     -torch.logspace(-30, 0, 301, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = x64.to(dtype)
    ours = get_activation("tanh")(x)
    ref = torch.tanh(x.double())
    err = (ours.double() - ref).abs().max()
    assert ours.dtype == dtype and float(err) < 4 * torch.finfo(dtype).eps
    assert ours[x64.abs() > 20].abs().eq(1).all()
    special = get_activation("tanh")(torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype))
    assert special[0] == 1 and special[1] == -1 and torch.isnan(special[2])


def test_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="outside"):
        JetSpec(2, [(2,)])
    with pytest.raises(ValueError, match="'xy'"):
        JetSpec.from_names(["xy"], input_names=("x", "t"))
    with pytest.raises(KeyError, match=r"\(1, 1\)"):
        JetSpec(2, [(0,)]).index((1, 1))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        get_activation("swish")
    with pytest.raises(ValueError, match="order=6"):
        get_activation("tanh").derivatives(torch.zeros(2), 6)
