"""Forward-mode jets agree with nested autograd; the residual's needs are discovered; bad problems fail clearly."""

import math

import numpy as np
import pytest
import torch

import pinnsketch.pinn as pp
from pinnsketch.nn.jet import JetSpec
from pinnsketch.pinn import geometry as G
from pinnsketch.pinn.derivatives import AutogradDerivatives, JetDerivatives, get_provider
from pinnsketch.pinn.errors import ProblemDefinitionError

from pinn_helpers import FunctionNet, PlainMLP

SPEC = JetSpec(3, [(0,), (1,), (2,), (0, 0), (0, 1), (1, 2), (2, 2), (0, 0, 0, 0), (1, 1, 2)])


def transform(x, u):  # a hard constraint: vanishes at x0 = 0, shifted by a smooth function
    return x[:, 0:1] * u + torch.sin(x[:, 1:2]) * x[:, 2:3]


@pytest.mark.parametrize("tf", [None, transform])
def test_jets_match_nested_autograd_float64(tf):
    net = PlainMLP(3, 2, width=12, depth=3)
    x = torch.rand(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = JetDerivatives()(net, x, SPEC, tf).streams
    b = AutogradDerivatives()(net, x, SPEC, tf).streams
    assert a.shape == (SPEC.size, 20, 2)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_jets_match_autograd_in_float32_and_gradients_agree():
    net = PlainMLP(3, 1, width=16, depth=2, dtype=torch.float32)
    x = torch.rand(50, 3, generator=torch.Generator().manual_seed(2))
    grads = []
    for provider in (JetDerivatives(), AutogradDerivatives()):
        net.zero_grad()
        streams = provider(net, x, SPEC).streams
        streams.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        grads.append(streams.detach())
    torch.testing.assert_close(grads[1], grads[3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-4, atol=1e-6)


def mlp_replica(mlp):
    """The pinnsketch MLP's map in plain torch ops (twice differentiable)."""

    def f(x):
        z = x
        for i, block in enumerate(mlp.blocks):
            a = z if i == 0 else block.activation(z)
            z = a @ block.weight.T + block.bias
        return z

    return f


def test_pinnsketch_mlp_jets_match_nested_autograd():
    from pinnsketch.nn.models import MLP

    mlp = MLP(3, 2, width=16, depth=3, storage="exact", seed=0, dtype=torch.float64)
    x = torch.rand(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = JetDerivatives()(mlp, x, SPEC).streams
    b = AutogradDerivatives()(mlp_replica(mlp), x, SPEC).streams
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    # and the training gradients: jets through the fused blocks vs autograd through the replica
    ga = torch.autograd.grad(a.square().sum(), list(mlp.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(mlp.parameters()))
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


ARCHITECTURES = [
    ("MLP", {}),
    ("ResidualMLP", {"fourier": {"features": 4, "scale": 1.0}}),
    ("ModifiedMLP", {"factorized": (1.0, 0.1)}),
    ("PirateNet", {"fourier": {"features": 4, "scale": 1.0}, "periodic": {1: 2.0}, "factorized": (1.0, 0.1)}),
]


@pytest.mark.parametrize("name,options", ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_built_networks_offer_nested_autograd_that_matches_their_jets(name, options):
    """derivatives="autograd" differentiates `autograd_forward` (plain ops) of every architecture the
    solver builds: up to fourth and mixed derivatives, and the parameters' gradients, as the jets."""
    import pinnsketch.nn as pn

    model = getattr(pn, name)(3, 2, width=8, depth=2, storage="exact", seed=0, dtype=torch.float64, **options)
    with torch.no_grad():  # nonzero biases and skip weights, so a misplaced term would show
        for p in model.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    x = torch.rand(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    jets = JetDerivatives()(model, x, SPEC).streams
    nested = AutogradDerivatives()(model, x, SPEC).streams
    torch.testing.assert_close(nested, jets, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(jets.square().sum(), list(model.parameters()))
    gb = torch.autograd.grad(nested.square().sum(), list(model.parameters()))
    for p, q in zip(ga, gb):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-9)


def test_autograd_refuses_first_order_fused_models():
    from pinnsketch.nn.models import CNN

    cnn = CNN(storage="exact")          # its blocks' backward is first order, and it has no plain forward
    with pytest.raises(TypeError, match="derivatives='jet'"):
        AutogradDerivatives()(cnn, torch.rand(4, 2), JetSpec(2, [(0, 0)]))


def test_provider_names():
    assert isinstance(get_provider("jet"), JetDerivatives)
    with pytest.raises(ValueError, match="autograd"):
        get_provider("finite-differences")


class Beam(pp.Problem):
    domain = G.Interval(0, 1) * G.TimeDomain(0, 1)

    def residual(self, x, u):
        return u.tt + u.xxxx


def test_spec_discovery_records_what_the_residual_reads():
    r = pp.solve(Beam(), network=PlainMLP(2, 1), adam=pp.Adam(steps=1), lbfgs=pp.LBFGS(steps=0),
                 points=pp.Points(domain=16), progress=False, dtype="float64")
    assert r.config["residual_derivatives"] == ["x", "t", "xx", "tt", "xxx", "xxxx"]
    assert r.config["terms"] == ["pde"]


def run_tiny(problem, **kw):
    dim = problem.domain.dim if problem.domain is not None else 1
    return pp.solve(problem, network=PlainMLP(dim, len(problem.output_names)),
                    adam=pp.Adam(steps=1), lbfgs=pp.LBFGS(steps=0), points=pp.Points(domain=16, boundary=4),
                    progress=False, dtype="float64", **kw)


def make(residual, domain=G.Interval(0, 1), **attrs):
    cls = type("Bad", (pp.Problem,), {"domain": domain, "residual": residual, **attrs})
    return cls()


@pytest.mark.parametrize("problem, error, match", [
    (make(lambda self, x, u: u.t), pp.DerivativeNameError, r"no derivative or attribute 't'.*inputs are \('x',\)"),
    (make(lambda self, x, u: u.xy), pp.DerivativeNameError, "'xy'"),
    (make(lambda self, x, u: u + x[:, 0:1]), ProblemDefinitionError, r"shape \(8, 8\).*x\[:, 0\]"),
    (make(lambda self, x, u: u.value[:3]), ProblemDefinitionError, r"shape \(3,\)"),
    (make(lambda self, x, u, v: u), ProblemDefinitionError, r"\(x, u\)"),
    (make(lambda self, x, u: ()), ProblemDefinitionError, "empty"),
    (make(lambda self, x, u: u, domain=None), ProblemDefinitionError, "Geometry"),
    (make(lambda self, x, u: u, output_names="u"), ProblemDefinitionError, "tuple"),
    (make(lambda self, x, u: u, reference=lambda self: (np.zeros((4, 1)), np.array([1, np.nan, 0, 0]))),
     ProblemDefinitionError, "NaN"),
    (make(lambda self, x, u: u, reference=lambda self: (np.zeros((4, 1)), np.ones((4, 3)))),
     ProblemDefinitionError, r"\(4, 1\)"),
    (make(lambda self, x, u: u, solver_defaults={"stepz": 1}), ProblemDefinitionError, "stepz"),
])
def test_bad_problem_definitions_say_what_to_fix(problem, error, match):
    with pytest.raises(error, match=match):
        run_tiny(problem)


def test_residual_as_dict_and_tuple_terms():
    r = run_tiny(make(lambda self, x, u: (u.xx, u - 1)))
    assert r.config["terms"] == ["pde_0", "pde_1"]
    r = run_tiny(make(lambda self, x, u: {"balance": u.xx, "level": u - 1}, conditions=[pp.Dirichlet(0.0)]))
    assert r.config["terms"] == ["balance", "level", "dirichlet_u"]


def test_empty_domain_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        make(lambda self, x, u: u.xx, domain=G.Interval(1, 0))


def test_exact_solution_evaluation_and_hard_constraint():
    class Sine(pp.Problem):
        domain = G.Interval(0, 1)

        def residual(self, x, u):
            return u.xx + math.pi**2 * torch.sin(math.pi * x[:, 0])

        def exact(self, x):
            return torch.sin(math.pi * x)

        def output_transform(self, x, u):  # u(0) = u(1) = 0 by construction
            return x * (1 - x) * u

    net = FunctionNet(lambda X: (math.pi * X).sin() / (X * (1 - X) + 1e-300))
    terms = pp.loss_terms(Sine(), net, points=pp.Points(domain=32))
    assert terms["pde"] < 1e-16
