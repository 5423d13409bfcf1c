"""Every library problem: its exact solution satisfies its own residual and conditions.

The exact solution is differentiated by nested autograd (pinnsketch's checked
fallback provider) and handed to the problem's `residual` and conditions as
`Field`s, so this checks the residual code of each problem, not only its maths.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pinnsketch import problems
from pinnsketch.nn import MLP
from pinnsketch.nn.jet import Jet, JetSpec
from pinnsketch.pinn.conditions import PointPool
from pinnsketch.pinn.derivatives import AutogradDerivatives, fields_of
from pinnsketch.pinn.problem import Layout
from pinnsketch.pinn.result import Evaluator

ALL = problems.names()
WITH_EXACT = [n for n in ALL if callable(getattr(problems.problem_class(n), "exact", None))]
WITH_TRANSFORM = [n for n in ALL if hasattr(problems.problem_class(n), "output_transform")]


def _spec(dim: int, order: int = 2) -> JetSpec:
    return JetSpec(dim, [mi for k in range(1, order + 1) for mi in itertools.combinations_with_replacement(range(dim), k)])


def _exact_fields(problem, x: torch.Tensor):
    """Fields of the exact solution at x (N, d) float64, derivatives up to order 2 by autograd."""
    layout = Layout.of(problem)
    jet = AutogradDerivatives()(problem.exact, x, _spec(layout.dim))
    return fields_of(jet, layout.input_names, layout.output_names)


def _terms(out) -> dict[str, torch.Tensor]:
    if isinstance(out, dict):
        return out
    if isinstance(out, (tuple, list)):
        return {f"pde_{i}": r for i, r in enumerate(out)}
    return {"pde": out}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _get(name: str):
    """The problem, with an inverse problem's parameters set to their true values (as a solve would)."""
    problem = problems.get(name)
    truth = getattr(problem, "true_parameters", {})
    if truth:
        problem._bind_parameters({k: torch.tensor(v, dtype=torch.float64) for k, v in truth.items()})
    return problem


@pytest.mark.parametrize("name", WITH_EXACT)
def test_exact_solution_satisfies_residual(name):
    problem = _get(name)
    layout = Layout.of(problem)
    x = torch.as_tensor(layout.domain.sample_domain(256, "random", _generator()))
    terms = _terms(problem.residual(x, *_exact_fields(problem, x)))
    for term, r in terms.items():
        r = torch.as_tensor(getattr(r, "value", r)).reshape(-1)
        assert r.shape == (256,), term
        assert r.abs().max().item() < 1e-9, (term, r.abs().max().item())


@pytest.mark.parametrize("name", WITH_EXACT)
def test_residual_detects_a_wrong_solution(name):
    # a perturbed exact solution must leave a clearly non-zero residual (the check above is not vacuous)
    problem = _get(name)
    layout = Layout.of(problem)
    x = torch.as_tensor(layout.domain.sample_domain(256, "random", _generator()))

    def perturbed(z):
        u = problem.exact(z)
        return u + 0.1 * torch.sin(2 * z[:, :1] + 1) * torch.cos(z[:, -1:])

    jet = AutogradDerivatives()(perturbed, x, _spec(layout.dim))
    fields = fields_of(jet, layout.input_names, layout.output_names)
    terms = _terms(problem.residual(x, *fields))
    worst = max(torch.as_tensor(getattr(r, "value", r)).abs().max().item() for r in terms.values())
    assert worst > 1e-3


@pytest.mark.parametrize("name", WITH_EXACT)
def test_exact_solution_satisfies_conditions(name):
    problem = _get(name)
    layout = Layout.of(problem)
    geom = layout.domain
    pool = PointPool(
        boundary=geom.sample_boundary(200, "random", _generator(1)),
        initial=geom.sample_initial(100, "random", _generator(2)) if geom.has_time else None,
    )
    for condition in problem.conditions:
        cp = condition.points(pool, layout)
        x = torch.as_tensor(cp.x)
        field = _exact_fields(problem, x)[layout.field_index(condition.field, type(condition).__name__)]
        extras = {k: torch.as_tensor(v) for k, v in cp.extras.items()}
        r = condition.residual(x, field, extras, layout)
        assert r.shape == (len(x),)
        assert r.abs().max().item() < 1e-9, (condition, r.abs().max().item())


# what each hard constraint enforces: (point set, expected value at x (n, d) -> (n, 1))
CONSTRAINTS = {
    "helmholtz": [("boundary", lambda x: torch.zeros_like(x[:, :1]))],
    "allen_cahn": [
        ("boundary", lambda x: -torch.ones_like(x[:, :1])),
        ("initial", lambda x: x[:, :1] ** 2 * torch.cos(math.pi * x[:, :1])),
    ],
    "burgers": [
        ("boundary", lambda x: torch.zeros_like(x[:, :1])),
        ("initial", lambda x: -torch.sin(math.pi * x[:, :1])),
    ],
    "wave": [
        ("boundary", lambda x: torch.zeros_like(x[:, :1])),
        ("initial", lambda x: torch.sin(math.pi * x[:, :1])),
    ],
}


def test_every_hard_constraint_is_checked():
    assert set(WITH_TRANSFORM) == set(CONSTRAINTS)


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_hard_constraints_hold_for_any_network(name):
    problem = problems.get(name)
    layout = Layout.of(problem)
    net = MLP(layout.dim, len(layout.output_names), width=8, depth=2, storage="exact").double()
    spec = JetSpec(layout.dim)
    for where, expected in CONSTRAINTS[name]:
        sample = getattr(layout.domain, f"sample_{where}")
        x = torch.as_tensor(sample(64, "random", _generator()))
        with torch.no_grad():
            raw = net(x)
            u = problem.output_transform(Jet.input(x, spec), Jet(raw.unsqueeze(0), spec)).value
        assert raw.abs().min() > 0  # the network's raw output is not what makes the constraint hold
        torch.testing.assert_close(u, expected(x), atol=1e-12, rtol=0)


def test_wave_initial_velocity_is_built_in():
    """wave's output_transform also fixes u_t(x, 0) = pi c sin(2 pi x), whatever the network."""
    problem = problems.get("wave")
    layout = Layout.of(problem)
    net = MLP(2, 1, width=8, depth=2, storage="exact").double()
    spec = JetSpec(2, [(1,)])
    x = torch.as_tensor(layout.domain.sample_initial(64, "random", _generator()))
    with torch.no_grad():
        u = problem.output_transform(Jet.input(x, spec), net.jet(x, spec))
    u_t = u.streams[spec.index((1,)), :, 0]
    torch.testing.assert_close(u_t, math.pi * problem.c * torch.sin(2 * math.pi * x[:, 0]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_problem_constructs_and_evaluates(name):
    # the layout validates, the residual runs on a real network's jets, the reference is usable
    problem = problems.get(name)
    assert problem.name == name
    layout = Layout.of(problem)
    assert isinstance(problem.tolerance, float) and 0 < problem.tolerance <= 0.1
    net = MLP(layout.dim, len(layout.output_names), width=8, depth=2, storage="exact")
    x = torch.as_tensor(layout.domain.sample_domain(32, "random", _generator()), dtype=torch.float32)
    jet = net.jet(x, _spec(layout.dim))
    transform = getattr(problem, "output_transform", None)
    if transform is not None:
        jet = transform(Jet.input(x, jet.spec), jet)
    for r in _terms(problem.residual(x, *fields_of(jet, layout.input_names, layout.output_names))).values():
        r = torch.as_tensor(getattr(r, "value", r))
        assert r.reshape(-1).shape == (32,) and torch.isfinite(r).all()
    evaluator = Evaluator(problem, layout, n_points=500)
    assert evaluator.available and evaluator.u.shape[1] == len(layout.output_names)


@pytest.mark.parametrize("name", WITH_EXACT)
def test_exact_solution_is_consistent_in_float32(name):
    problem = problems.get(name)
    layout = Layout.of(problem)
    x = torch.as_tensor(layout.domain.sample_domain(64, "random", _generator()))
    u64 = problem.exact(x)
    u32 = problem.exact(x.float())
    assert u32.dtype == torch.float32 and u64.dtype == torch.float64
    torch.testing.assert_close(u32.double(), u64, atol=1e-5, rtol=1e-5)


def test_inverse_problem_data_and_parameter():
    problem = problems.get("inverse_diffusion")
    (truth,) = problem.true_parameters.values()
    name = next(iter(problem.true_parameters))
    assert name in type(problem).parameters()
    # before training the parameter is the initial guess, far from the truth
    assert abs(float(getattr(problem, name)) - truth) > 0.5
    data = [c for c in problem.conditions if type(c).__name__ == "PointData"]
    assert len(data) == 1
    layout = Layout.of(problem)
    cp = data[0].points(PointPool(None, None), layout)
    assert layout.domain.inside(cp.x).all()
    np.testing.assert_allclose(cp.extras["values"], problem.exact(torch.as_tensor(cp.x))[:, 0].numpy(), atol=1e-14)


def test_registry():
    assert problems.names() == sorted(problems.names())
    assert {"burgers", "poisson", "heat", "wave", "helmholtz", "diffusion_reaction", "klein_gordon",
            "kovasznay", "allen_cahn", "inverse_diffusion", "poisson_corner"} <= set(problems.names())
    assert type(problems.get("Klein-Gordon")).__name__ == "KleinGordon"
    assert problems.get("heat") is not problems.get("heat")  # fresh instances, no shared state
    with pytest.raises(ValueError, match="unknown problem 'navier'.*burgers"):
        problems.get("navier")
    with pytest.raises(TypeError, match="str"):
        problems.get(3)
    lines = problems.describe()
    assert len(lines) == len(problems.names())
    assert all(line.split()[0] in problems.names() and "tol" in line for line in lines)
    from pinnsketch.problems import Burgers

    assert Burgers is problems.problem_class("burgers")
    with pytest.raises(AttributeError):
        problems.NoSuchProblem  # noqa: B018


def test_references_are_cached_per_instance():
    class Counting(problems.problem_class("burgers")):
        def compute_reference(self):
            self.calls = getattr(self, "calls", 0) + 1
            return super().compute_reference()

    a, b = Counting(), Counting()
    xa, ua = a.reference()
    a.reference()
    assert a.calls == 1  # computed once per instance ...
    b.reference()
    assert b.calls == 1  # ... and not shared between instances
    ua[0, 0] = 123.0  # callers get copies: mutating one leaves the cache intact
    assert a.reference()[1][0, 0] != 123.0
    assert xa.shape == (25600, 2) and ua.shape == (25600, 1)
    # grid order: rows (x_i, t_j) at i * 100 + j, like DeepXDE's usol[x, t]
    np.testing.assert_array_equal(xa[:3, 0], -1.0)
    np.testing.assert_allclose(xa[:3, 1], [0.0, 0.01, 0.02])


def test_allen_cahn_reference_grid():
    x, u = problems.get("allen_cahn").reference()
    assert x.shape == (256 * 101, 2) and u.shape == (256 * 101, 1)
    grid = u.reshape(256, 101)
    np.testing.assert_allclose(grid[:, 0], x[::101, 0] ** 2 * np.cos(np.pi * x[::101, 0]), atol=1e-5)
    assert np.isfinite(grid).all() and np.abs(grid).max() <= 1.0 + 1e-9


@pytest.mark.parametrize("name", ALL)
def test_problem_runs_through_solve(name):
    # integration only (a few steps, tiny network): accuracy is benchmarks/pinn_suite.py's job
    import pinnsketch.pinn as ps

    problem = problems.get(name)
    result = problem.solve(
        network=ps.Network(width=8, depth=2), adam=ps.Adam(steps=3), lbfgs=ps.LBFGS(steps=1),
        points=ps.Points(domain=64, boundary=16, initial=16), storage="exact", seed=0, progress=False,
        device="cpu", eval_every=2,
    )
    assert result.l2_relative_error is not None and math.isfinite(result.l2_relative_error)
    truth = getattr(problem, "true_parameters", {})
    assert set(result.parameters) == set(truth)
