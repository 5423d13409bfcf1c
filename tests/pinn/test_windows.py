"""Time-window marching: window split, point assignment, continuation targets, marched runs, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pinnsketch as ps
from pinnsketch.cli import solve_options_from_config
from pinnsketch.io import RunWriter, load_checkpoint
from pinnsketch.monitor import GradientMonitor
from pinnsketch.nn.jet import JetSpec
from pinnsketch.pinn.derivatives import get_provider
from pinnsketch.pinn.problem import Layout
from pinnsketch.pinn.result import predict
from pinnsketch.pinn.windows import TimeWindowNetwork, continuation_conditions, window_bounds
from pinnsketch.problems.heat import Heat

from pinn_helpers import FunctionNet, Interrupt, PlainMLP

SMALL = dict(storage="exact", adam=ps.Adam(steps=12), lbfgs=ps.LBFGS(steps=4, max_iter=2),
             points=ps.Points(domain=60, boundary=12, initial=12, sampler="random", refine=None),
             eval_every=5, eval_points=400, progress=False)


class HardDecay(ps.Problem):
    """u_t = -u on [0, 1] x [0, 2], u(x, 0) = 1 as a hard constraint u = 1 + t N (no Initial condition)."""

    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 2)
    conditions = ()

    def residual(self, x, u):
        return u.t + u

    def output_transform(self, x, u):
        return 1 + x[:, 1:2] * u

    def exact(self, x):
        return torch.exp(-x[:, 1:2])


class Wave(ps.Problem):
    """u_tt = u_xx with u(x, 0) = sin(pi x), u_t(x, 0) = 0: second order in time."""

    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    conditions = (ps.Initial(lambda x: torch.sin(math.pi * x[:, 0])), ps.InitialVelocity(0.0))

    def residual(self, x, u):
        return u.tt - u.xx


class Steady(ps.Problem):
    domain = ps.geometry.Interval(0, 1)
    conditions = (ps.Dirichlet(0.0),)

    def residual(self, x, u):
        return u.xx + 1


class Inverse(ps.Problem):
    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    kappa = ps.Parameter(1.0)
    conditions = (ps.Initial(0.0),)

    def residual(self, x, u):
        return u.t - self.kappa * u.xx


class Observed(ps.Problem):
    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    conditions = (ps.Initial(0.0), ps.PointData(np.array([[0.5, 0.5]]), np.array([1.0])))

    def residual(self, x, u):
        return u.t - u.xx


# --- the split and the point assignment -------------------------------------------------------
def test_window_bounds_split_the_interval_equally():
    assert window_bounds(0.0, 1.0, 4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    b = window_bounds(-1.0, 0.7, 3)
    assert b[0] == -1.0 and b[-1] == 0.7 and np.allclose(np.diff(b), 1.7 / 3)


def _constant_members(k: int) -> list[torch.nn.Module]:
    """Member j answers j + 10 everywhere (so the output names the window that answered)."""
    return [FunctionNet(lambda x, j=j: 0 * x[:, 0:1] + (j + 10)) for j in range(k)]


def test_points_go_to_the_window_of_their_time():
    net = TimeWindowNetwork(_constant_members(4), bounds=window_bounds(0.0, 1.0, 4), time_axis=1)
    t = torch.tensor([0.0, 0.1, 0.25, 0.2499, 0.5, 0.74, 0.75, 1.0, -0.5, 1.5], dtype=torch.float64)
    x = torch.stack([torch.zeros_like(t), t], 1)
    expected = [0, 0, 1, 0, 2, 2, 3, 3, 0, 3]  # [t_k, t_{k+1}); outside [t_0, t_K]: the nearest window
    assert net.window_of(x).tolist() == expected
    assert net(x)[:, 0].tolist() == [k + 10 for k in expected]
    net.active.fill_(1)  # during training windows after the active one answer with the active one
    assert net(x)[:, 0].tolist() == [min(k, 1) + 10 for k in expected]
    with pytest.raises(ValueError, match="one network per window"):
        TimeWindowNetwork(_constant_members(3), bounds=[0.0, 0.5, 1.0], time_axis=1)


def test_time_windows_validates():
    for bad in (1, 0, 2.0, True, "4"):
        with pytest.raises(ValueError, match="TimeWindows windows="):
            ps.TimeWindows(bad)
    assert ps.TimeWindows(3).config() == {"name": "time_windows", "windows": 3}


# --- the initial condition of window k > 0 ------------------------------------------------------
def _targets(problem, previous, x, residual_derivatives):
    """The Initial-type conditions of window k > 0 (kind, term, targets at x); `residual_derivatives`:
    the multi-indices the residual reads."""
    layout = Layout.of(problem)
    spec = JetSpec(layout.dim, residual_derivatives)
    conditions = continuation_conditions(problem, layout, spec, previous, get_provider("jet"))
    initial = [c for c in conditions if isinstance(c, ps.Initial)]
    return [(type(c).__name__, c.term_name(layout), c.value(x)) for c in initial], conditions


def test_continuation_targets_are_the_previous_window_at_t_k():
    previous = PlainMLP(2, 1, seed=3)
    x = torch.rand(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 0.5
    # heat: its Initial condition, now with window k-1's values; the Dirichlet condition unchanged
    targets, conditions = _targets(Heat(), previous, x, {(1,), (0, 0)})
    assert [(kind, name) for kind, name, _ in targets] == [("Initial", "initial_u")]
    assert torch.allclose(targets[0][2], predict(previous, Heat(), x)[:, 0], rtol=0, atol=1e-12)
    assert isinstance(conditions[0], ps.Dirichlet) and conditions[0] is Heat.conditions[0]
    # a hard initial condition (output transform): one Initial term, targets through the transform
    targets, _ = _targets(HardDecay(), previous, x, {(1,)})
    assert [(kind, name) for kind, name, _ in targets] == [("Initial", "initial_u")]
    assert torch.allclose(targets[0][2], 1 + 0.5 * previous(x)[:, 0], rtol=0, atol=1e-12)
    # second order in time: the velocity condition takes window k-1's u_t
    targets, _ = _targets(Wave(), previous, x, {(1, 1), (0, 0)})
    assert [kind for kind, _, _ in targets] == ["Initial", "InitialVelocity"]
    xr = x.clone().requires_grad_(True)
    u_t = torch.autograd.grad(previous(xr).sum(), xr)[0][:, 1]
    assert torch.allclose(targets[1][2], u_t, rtol=0, atol=1e-10)
    assert not targets[1][2].requires_grad


# --- marched runs -----------------------------------------------------------------------------------
def test_marched_run_starts_window_k_from_window_k_minus_1():
    r = ps.solve(Heat(), windows=ps.TimeWindows(2), seed=2, **SMALL)
    h, w = r.history, r.history["windows"]
    assert isinstance(r.model, TimeWindowNetwork) and int(r.model.active) == 1
    assert w["index"] == [0, 1] and w["t0"] == [0.0, 0.5] and w["t1"] == [0.5, 1.0]
    assert w["first_step"] == [0, 16] and w["last_step"] == [16, 32] and h["step"][-1] == 32
    end0 = h["step"].index(16) + 1  # the rows of window 0 end with its step 16
    assert h["window"] == [0] * end0 + [1] * (len(h["step"]) - end0)
    assert [s["reason"] for s in w["lbfgs_stop"]] == ["step budget"] * 2 and h["lbfgs_stop"]["step"] == 32
    assert len(w["l2_relative_error"]) == 2 and all(e > 0 for e in w["l2_relative_error"])
    # window 1 starts from window 0's weights, so its initial term (window 0's values at t = 0.5) starts at 0
    first = h["window"].index(1)
    assert h["terms"]["initial_u"][first] < 1e-12 < h["terms"]["initial_u"][first + 1]
    assert r.config["windows"] == {"name": "time_windows", "windows": 2}
    assert solve_options_from_config(r.config)["windows"] == ps.TimeWindows(2)
    # the whole horizon at the end: the run's error is that of the combined prediction
    ev = r.evaluation
    assert np.allclose(ev["prediction"], r.predict(ev["x"]))
    assert r.l2_relative_error == pytest.approx(np.linalg.norm(ev["prediction"] - ev["reference"])
                                                / np.linalg.norm(ev["reference"]))


def test_marched_run_writes_a_valid_run_file(tmp_path):
    path = tmp_path / "heat.h5"
    writer = RunWriter(path, checkpoint_every=10, monitor=GradientMonitor(rank=2, window=16))
    r = ps.solve(Heat(), windows=ps.TimeWindows(2), callbacks=[writer], **SMALL)
    run = ps.load(path)
    assert run.completed and run.steps == r.config["steps_done"] == 32
    assert run.config["windows"] == {"name": "time_windows", "windows": 2}
    assert run.l2_relative_error == pytest.approx(r.l2_relative_error)
    model = run.model  # rebuilt from the file: the two windows' networks
    assert isinstance(model, TimeWindowNetwork) and model.bounds == [0.0, 0.5, 1.0]
    x = np.random.default_rng(0).uniform(0, 1, (50, 2))
    assert np.allclose(run.predict(x), r.predict(x), atol=1e-6)
    assert set(run.losses) == {"pde", "dirichlet_u", "initial_u"}
    assert len(run.gradient_steps) == len(r.history["step"])  # the monitor saw every step of both windows
    saved = tmp_path / "saved.h5"
    ps.save(r, saved)
    assert ps.load(saved).config["windows"]["windows"] == 2
    assert np.allclose(ps.load(saved).predict(x), r.predict(x), atol=1e-6)


def test_marched_prediction_is_continuous_at_the_window_boundary():
    options = dict(SMALL, adam=ps.Adam(steps=300), lbfgs=ps.LBFGS(steps=50, max_iter=2),
                   points=ps.Points(domain=60, boundary=12, initial=100, sampler="random", refine=None),
                   eval_every=1000)
    r = ps.solve(Heat(), windows=ps.TimeWindows(2), **options)
    # at t_1 = 0.5 the jump is what window 1's initial term measures (its RMS), and small
    xs = np.linspace(0, 1, 201)
    left = r.predict(np.stack([xs, np.full_like(xs, 0.5 - 1e-6)], 1))  # distinct from 0.5 in float32
    right = r.predict(np.stack([xs, np.full_like(xs, 0.5)], 1))
    rms = float(np.sqrt(np.mean((left - right) ** 2)))
    assert rms == pytest.approx(math.sqrt(r.history["terms"]["initial_u"][-1]), rel=0.3)
    assert rms < 0.04  # at this budget; max |u(., 0.5)| = exp(-0.2 pi^2) = 0.14


@pytest.mark.parametrize("at, storage", [(6, "exact"), (22, "exact"), (22, "lowrank")])  # windows 0 and 1
def test_marched_run_resumes_where_it_stopped(at, storage):
    kw = dict(SMALL, windows=ps.TimeWindows(2), seed=1, storage=storage,
              points=ps.Points(domain=60, boundary=12, initial=12, sampler="random", resample_every=5))
    full = ps.solve(Heat(), **kw)
    stop = Interrupt(at)
    with pytest.raises(KeyboardInterrupt):
        ps.solve(Heat(), callbacks=[stop], **kw)
    resumed = ps.solve(Heat(), resume=stop.saved, **kw)
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["windows"] == full.history["windows"]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="windows="):
        ps.solve(Heat(), **{**kw, "windows": None}, resume=stop.saved)


def test_interrupted_marched_run_file_resumes_from_the_command_line(tmp_path):
    from pinnsketch.cli import main

    path = tmp_path / "heat.h5"
    kw = dict(SMALL, windows=ps.TimeWindows(2))
    full = ps.solve(Heat(), **kw)
    with pytest.raises(KeyboardInterrupt):
        ps.solve(Heat(), callbacks=[RunWriter(path, checkpoint_every=10), Interrupt(23)], **kw)
    assert load_checkpoint(path)["history"]["windows"]["index"] == [0, 1]  # the checkpoint of step 20
    assert main(["solve", "--resume", str(path), "--no-progress"]) == 0
    run = ps.load(path)
    assert run.completed and run.steps == 32 and run.config["windows"]["windows"] == 2
    assert run.l2_relative_error == pytest.approx(full.l2_relative_error, rel=1e-6)


def test_hard_initial_condition_gets_an_initial_term_from_window_1():
    r = ps.solve(HardDecay(), windows=ps.TimeWindows(2), loss_weights={"initial_u": 2.0}, **SMALL)
    assert r.config["terms"] == ["pde", "initial_u"]
    h = r.history
    first = h["window"].index(1)
    assert all(math.isnan(v) for v in h["terms"]["initial_u"][:first])
    assert h["terms"]["initial_u"][first] < 1e-12 and all(math.isfinite(v) for v in h["terms"]["initial_u"][first:])
    with pytest.raises(ValueError, match="unknown terms"):
        ps.solve(HardDecay(), windows=ps.TimeWindows(2), loss_weights={"initial_v": 1.0}, **SMALL)


def test_causal_weights_within_each_window():
    r = ps.solve(Heat(), windows=ps.TimeWindows(2), causal=ps.Causal(chunks=4), **SMALL)
    assert len(r.history["causal"]["min_weight"]) == len(r.history["step"])
    assert all(0 < v <= 1 for v in r.history["causal"]["min_weight"])


# --- refusals -------------------------------------------------------------------------------------
def test_windows_refusals():
    w = ps.TimeWindows(2)
    with pytest.raises(ValueError, match="needs a time-dependent problem"):
        ps.solve(Steady(), windows=w, **SMALL)
    with pytest.raises(ValueError, match="Parameter"):
        ps.solve(Inverse(), windows=w, **SMALL)
    with pytest.raises(ValueError, match="PointData"):
        ps.solve(Observed(), windows=w, **SMALL)
    with pytest.raises(ValueError, match="compile=True"):
        ps.solve(Heat(), windows=w, compile=True, **SMALL)
    with pytest.raises(TypeError, match="ps.TimeWindows"):
        ps.solve(Heat(), windows=2, **SMALL)
