"""The hand-written vjp of the Faa di Bruno jet map against autograd (float64)."""

import pytest
import torch

from pinnsketch.nn.activations import ACTIVATIONS, MAX_ORDER, Activation, get_activation
from pinnsketch.nn.fused import BlockCall, FusedDense
from pinnsketch.nn.jet import Jet, JetSpec, compose_streams, compose_vjp
from pinnsketch.nn import make_storage

# orders 1..4, single-axis and mixed streams, repeated blocks (z_x^2, z_x^3, z_x^2 z_t ...)
SPECS = {
    "order1": JetSpec(3, [(0,), (1,), (2,)]),
    "order2-mixed": JetSpec(2, [(0, 0), (0, 1), (1, 1)]),
    "order3-mixed": JetSpec(2, [(0, 0, 1), (1, 1, 1)]),
    "order3-three-axes": JetSpec(3, [(0, 1, 2)]),
    "order4": JetSpec(1, [(0, 0, 0, 0)]),
    "order4-mixed": JetSpec(2, [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1)]),
}


def _inputs(spec, activation, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(spec.size, 6, 3, generator=g, dtype=torch.float64)
    if activation == "relu":
        z[0] = z[0] + 0.1 * z[0].sign()
    grad_a = torch.randn(spec.size, 6, 3, generator=g, dtype=torch.float64)
    return z, grad_a


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_compose_vjp_matches_autograd(activation, spec_name):
    spec, act = SPECS[spec_name], get_activation(activation)
    z, grad_a = _inputs(spec, activation)
    z_leaf = z.clone().requires_grad_(True)
    a = compose_streams(z_leaf, act.derivatives(z_leaf[0], spec.order), spec)
    (expected,) = torch.autograd.grad(a, z_leaf, grad_a)
    derivs = act.derivatives(z[0], spec.order + 1)
    ours = compose_vjp(z, derivs, grad_a, spec)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    scratch = grad_a.clone()
    in_place = compose_vjp(z, derivs, scratch, spec, overwrite=True)
    assert in_place.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(in_place, ours, rtol=0, atol=0)
    # the no-graph forward equals the differentiable one and Jet.map
    with torch.no_grad():
        fast = compose_streams(z, derivs, spec)
    torch.testing.assert_close(fast, a.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(Jet(z, spec).map(act).streams, fast, rtol=0, atol=0)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_derivatives_are_consistent(activation):
    """f^(k+1) is the derivative of f^(k), up to the fifth (the backward of a 4th-order jet needs it)."""
    act = get_activation(activation)
    z = torch.linspace(-2.3, 2.1, 17, dtype=torch.float64)
    if activation == "relu":
        z = z[z.abs() > 0.05]
    derivs = act.derivatives(z, MAX_ORDER)
    assert len(derivs) == MAX_ORDER + 1 == 6
    for k in range(MAX_ORDER):
        z_leaf = z.clone().requires_grad_(True)
        f_k = act.derivatives(z_leaf, k)[k]
        if f_k.requires_grad:
            (d,) = torch.autograd.grad(f_k.sum(), z_leaf)
        else:  # a constant derivative (ReLU, identity)
            d = torch.zeros_like(z)
        torch.testing.assert_close(derivs[k + 1], d, rtol=1e-12, atol=1e-12)


class _FourDerivativeTanh(Activation):
    """A user activation that stops at the fourth derivative: the fused block falls back to autograd."""

    name = "tanh4"

    def _derivatives(self, z, order):
        return get_activation("tanh").derivatives(z, min(order, 4))


def test_fused_block_falls_back_to_autograd_without_the_next_derivative():
    spec = SPECS["order4-mixed"]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(spec.size, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    call = BlockCall(_FourDerivativeTanh(), spec, make_storage("exact"))
    assert torch.autograd.gradcheck(lambda z, w, b: FusedDense.apply(z, w, b, call), (z, w, b))
    # and the same gradients as the built-in tanh's hand-written vjp
    ref = BlockCall(get_activation("tanh"), spec, make_storage("exact"))
    grads = [torch.autograd.grad(FusedDense.apply(z, w, b, c).square().sum(), (z, w, b)) for c in (call, ref)]
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
