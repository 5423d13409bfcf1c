"""Each condition's loss is ~0 on a function that satisfies it and clearly > 0 on one that does not."""

import math

import numpy as np
import pytest
import torch

import pinnsketch.pinn as pp
from pinnsketch.pinn import geometry as G
from pinnsketch.pinn.errors import ProblemDefinitionError

from pinn_helpers import FunctionNet

PI = math.pi
POINTS = pp.Points(domain=64, boundary=32, initial=32, sampler="random")


def terms(problem, f, derivatives="jet", points=POINTS):
    return pp.loss_terms(problem, FunctionNet(f), points=points, derivatives=derivatives)


class Heat(pp.Problem):
    domain = G.Interval(0, 1) * G.TimeDomain(0, 1)
    conditions = [pp.Dirichlet(0.0), pp.Initial(lambda x: torch.sin(PI * x[:, 0]))]

    def residual(self, x, u):
        return u.t - u.xx / PI**2


def heat_exact(X):
    return (PI * X[:, 0:1]).sin() * (-X[:, 1:2]).exp()


@pytest.mark.parametrize("derivatives", ["jet", "autograd"])
def test_dirichlet_initial_and_residual(derivatives):
    t = terms(Heat(), heat_exact, derivatives)
    assert set(t) == {"pde", "dirichlet_u", "initial_u"}
    assert max(t.values()) < 1e-24
    wrong = terms(Heat(), lambda X: heat_exact(X) + 0.1, derivatives)
    assert wrong["dirichlet_u"] == pytest.approx(0.01) and wrong["initial_u"] == pytest.approx(0.01)
    assert wrong["pde"] < 1e-24  # a constant shift still solves the PDE


class NeumannDisk(pp.Problem):
    domain = G.Disk((0, 0), 1)
    conditions = [pp.Neumann(2.0)]          # u = x^2 + y^2: du/dn = 2 r = 2 on the unit circle

    def residual(self, x, u):
        return u.xx + u.yy - 4


def test_neumann_uses_outward_normals():
    t = terms(NeumannDisk(), lambda X: X[:, 0:1] ** 2 + X[:, 1:2] ** 2)
    assert t["pde"] < 1e-24 and t["neumann_u"] < 1e-24
    t = terms(NeumannDisk(), lambda X: -(X[:, 0:1] ** 2) - X[:, 1:2] ** 2 + 8)  # du/dn = -2
    assert t["neumann_u"] == pytest.approx(16.0)


class RobinRod(pp.Problem):
    domain = G.Interval(0, 1)
    # u = e^x: at x = 1, du/dn = u; at x = 0, du/dn = -u
    conditions = [pp.Robin(lambda x, u: torch.where(x[:, 0] > 0.5, u, -u)),
                  pp.Neumann(lambda x: math.e * x[:, 0], on=lambda x, b: x[:, 0] > 0.5,
                             name="flux_right")]

    def residual(self, x, u):
        return u.xx - u


def test_robin_and_neumann_with_a_predicate():
    t = terms(RobinRod(), lambda X: X.exp())
    assert max(t.values()) < 1e-24
    t = terms(RobinRod(), lambda X: 2 * X.exp())
    assert t["robin_u"] == pytest.approx(0.0, abs=1e-24)  # linear condition: 2 e^x satisfies it too
    assert t["flux_right"] == pytest.approx(math.e**2)


class Ring(pp.Problem):
    domain = G.Interval(0, 1) * G.TimeDomain(0, 1)
    conditions = [pp.Periodic("x"), pp.Periodic("x", order=1)]

    def residual(self, x, u):
        return u.t


def test_periodic_orders_zero_and_one():
    t = terms(Ring(), lambda X: (2 * PI * X[:, 0:1]).sin() + X[:, 1:2] * 0)
    assert set(t) == {"pde", "periodic_u_x", "periodic_u_dx"}
    assert t["periodic_u_x"] < 1e-24 and t["periodic_u_dx"] < 1e-20
    t = terms(Ring(), lambda X: X[:, 0:1] + X[:, 0:1] ** 2 / 2)  # u(1) - u(0) = 1.5, u'(1) - u'(0) = 1
    assert t["periodic_u_x"] == pytest.approx(2.25) and t["periodic_u_dx"] == pytest.approx(1.0)


class Wave(pp.Problem):
    domain = G.Interval(0, 1) * G.TimeDomain(0, 1)
    conditions = [pp.Dirichlet(0.0), pp.Initial(0.0), pp.InitialVelocity(lambda x: PI * torch.sin(PI * x[:, 0:1]))]

    def residual(self, x, u):
        return u.tt - u.xx


def test_initial_velocity():
    t = terms(Wave(), lambda X: (PI * X[:, 0:1]).sin() * (PI * X[:, 1:2]).sin())
    assert max(t.values()) < 1e-20
    t = terms(Wave(), lambda X: (PI * X[:, 0:1]).sin() * (PI * X[:, 1:2]).cos())
    assert t["initial_u"] > 0.1 and t["initial_velocity_u"] == pytest.approx(PI**2 / 2, rel=0.2)


def test_point_data_and_several_fields():
    xs = np.linspace(0, 1, 11)[:, None]

    class Pair(pp.Problem):
        domain = G.Interval(0, 1)
        output_names = ("u", "v")
        conditions = [pp.PointData(xs, np.sin(xs), field="u"), pp.PointData(xs, 2 * xs[:, 0], field="v")]

        def residual(self, x, u, v):
            return {"uu": u.xx + u, "vv": v.xx}

    both = lambda X: Pair._cat(X.sin(), 2 * X)  # noqa: E731
    Pair._cat = staticmethod(lambda a, b: torch.cat([a, b], -1) if isinstance(a, torch.Tensor) else type(a).cat([a, b]))
    t = terms(Pair(), both)
    assert set(t) == {"uu", "vv", "data_u", "data_v"} and max(t.values()) < 1e-24
    t = terms(Pair(), lambda X: Pair._cat(X.sin(), 2 * X + 1))
    assert t["data_v"] == pytest.approx(1.0) and t["data_u"] < 1e-24


@pytest.mark.parametrize("conditions, match", [
    ([pp.Initial(0.0)], "time axis"),
    ([pp.Periodic("y")], "inputs are"),
    ([pp.Dirichlet(0.0, field="w")], "outputs are"),
    ([pp.Dirichlet(0.0, on=lambda x, b: x[:, 0] > 5)], "selects none"),
    ([pp.PointData(np.zeros((3, 2)), np.zeros(3))], r"\(M, 1\)"),
    (["u = 0"], "ps.Dirichlet"),
])
def test_bad_conditions(conditions, match):
    class Rod(pp.Problem):
        domain = G.Interval(0, 1)

        def residual(self, x, u):
            return u.xx

    Rod.conditions = conditions
    with pytest.raises(ProblemDefinitionError, match=match):
        terms(Rod(), lambda X: X)


def test_condition_option_validation():
    with pytest.raises(ValueError, match="order"):
        pp.Periodic("x", order=2)
    with pytest.raises(ValueError, match="on="):
        pp.Dirichlet(0.0, on="left")
    with pytest.raises(TypeError, match="number or a callable"):
        pp.Dirichlet("zero")
    with pytest.raises(ValueError, match="weight"):
        pp.Dirichlet(0.0, weight=-1)


def test_deepxde_style_per_point_predicate():
    class Rod(pp.Problem):
        domain = G.Interval(0, 1)
        conditions = [pp.Dirichlet(1.0, on=lambda x, on_boundary: on_boundary and np.isclose(x[0], 0))]

        def residual(self, x, u):
            return u.xx

    t = terms(Rod(), lambda X: 1 + X)  # u(0) = 1 holds; u(1) = 2 would not be selected
    assert t["dirichlet_u"] < 1e-24
