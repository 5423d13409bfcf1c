"""The training loop: accuracy on a small problem, determinism, resume, divergence, refinement."""

import math

import numpy as np
import pytest
import torch

import pinnsketch
import pinnsketch.pinn as pp
from pinnsketch.pinn import geometry as G

from pinn_helpers import Interrupt, PlainMLP


class Poisson1D(pp.Problem):
    """-u'' = pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0; u = sin(pi x)."""

    name = "poisson1d"
    domain = G.Interval(0, 1)
    conditions = [pp.Dirichlet(0.0)]

    def residual(self, x, u):
        return u.xx + math.pi**2 * torch.sin(math.pi * x[:, 0])

    def exact(self, x):
        return torch.sin(math.pi * x)


class Heat(pp.Problem):
    domain = G.Interval(0, 1) * G.TimeDomain(0, 0.5)
    conditions = [pp.Dirichlet(0.0), pp.Initial(lambda x: torch.sin(math.pi * x[:, 0]))]

    def residual(self, x, u):
        return u.t - u.xx / math.pi**2

    def exact(self, x):
        return torch.sin(math.pi * x[:, 0:1]) * torch.exp(-x[:, 1:2])


SMALL = dict(network=pp.Network(width=16, depth=2), storage="exact", progress=False, eval_points=200)


def test_poisson_1d_reaches_tolerance():
    r = pp.solve(Poisson1D(), adam=pp.Adam(steps=300, lr=1e-2), lbfgs=pp.LBFGS(steps=100),
                 points=pp.Points(domain=64, boundary=2), eval_every=100, **SMALL)
    assert r.l2_relative_error < 1e-3          # measured: 2.7e-5
    assert r.history["eval"]["l2_relative_error"][0] > 10 * r.l2_relative_error
    assert r.timing["adam_steps"] == 300 and 0 < r.timing["lbfgs_steps"] <= 100
    assert r.history["step"][-1] == r.config["steps_done"] == 300 + r.timing["lbfgs_steps"]
    assert len(r.history["loss"]) < r.config["steps_done"]  # one record per L-BFGS step of up to 20 iterations
    assert r.saved_bytes_peak and r.saved_bytes_peak > 0
    x = np.linspace(0, 1, 1001)[:, None]
    u = r.predict(x, batch_size=100)
    assert u.shape == (1001, 1) and isinstance(u, np.ndarray)
    assert np.abs(u[:, 0] - np.sin(np.pi * x[:, 0])).max() < 1e-2
    assert torch.is_tensor(r.predict(torch.tensor(x)))


def losses(**kw):
    opts = dict(SMALL, adam=pp.Adam(steps=12), lbfgs=pp.LBFGS(steps=4), points=pp.Points(domain=40, boundary=8, initial=8,
                sampler="random", resample_every=5), eval_every=4)
    opts.update(kw)
    return pp.solve(Heat(), **opts)


def test_same_seed_same_history_on_cpu():
    a, b, c = losses(seed=3), losses(seed=3), losses(seed=4)
    assert a.history["loss"] == b.history["loss"] and a.history["terms"] == b.history["terms"]
    assert a.history["loss"] != c.history["loss"]
    assert a.config["terms"] == ["pde", "dirichlet_u", "initial_u"]


@pytest.mark.parametrize("at, storage", [(7, "exact"), (14, "exact"), (14, "lowrank")])  # Adam, L-BFGS
def test_resume_ends_where_the_uninterrupted_run_ends(at, storage):
    kw = dict(seed=1, storage=storage, lbfgs=pp.LBFGS(steps=8, max_iter=2), points=pp.Points(domain=40, boundary=8, initial=8, sampler="random", resample_every=5,
                                      refine=pp.RAR(every=6, candidates=200, add=5)))
    full = losses(**kw)
    stop = Interrupt(at)
    with pytest.raises(KeyboardInterrupt):
        losses(callbacks=[stop], **kw)
    resumed = losses(resume=stop.saved, **kw)
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["refine"] == full.history["refine"]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
    assert resumed.l2_relative_error == full.l2_relative_error
    assert stop.saved["phase"] == ("adam" if at < 12 else "lbfgs")


def test_resume_rejects_foreign_state():
    with pytest.raises(ValueError, match="state_dict"):
        losses(resume={"step": 3})


class Singular(pp.Problem):
    domain = G.Interval(0, 1)

    def residual(self, x, u):
        return u.xx + torch.log(x[:, 0] - 2)  # log of a negative number


def test_nan_stops_training_with_the_term_and_step():
    with pytest.raises(pp.TrainingDivergedError, match=r"'pde' became nan at step 0 \(adam\).*lr.*1e-06"):
        pp.solve(Singular(), adam=pp.Adam(steps=5, lr=1e-6), lbfgs=pp.LBFGS(steps=0), points=pp.Points(domain=8), **SMALL)


def test_divergence_names_the_later_step():
    class Explode(pp.Callback):
        def on_step(self, state):
            if state.step == 3:
                with torch.no_grad():
                    next(state.model.parameters()).fill_(float("inf"))

    with pytest.raises(FloatingPointError, match="step 3"):
        losses(callbacks=[Explode()])


def test_rar_adds_points_where_the_residual_is_largest():
    pts = pp.Points(domain=30, boundary=4, initial=4, refine=pp.RAR(every=5, candidates=500, add=7, max_points=14))
    r = losses(points=pts, adam=pp.Adam(steps=16), lbfgs=pp.LBFGS(steps=0))
    assert r.history["refine"]["step"] == [5, 10]           # max_points reached after two rounds
    assert r.history["refine"]["domain_points"] == [37, 44]
    anchors = r.state.points.anchors
    assert anchors.shape == (14, 2) and Heat.domain.inside(anchors).all()


def test_early_stopping_ends_the_phase_and_target_ends_the_run():
    r = losses(adam=pp.Adam(steps=50, lr=1e-12), lbfgs=pp.LBFGS(steps=0),
               callbacks=[pp.EarlyStopping(patience=3, min_delta=0.5)])
    assert r.timing["adam_steps"] == 4
    r = losses(callbacks=[pp.EarlyStopping(target=1e9)])
    assert r.config["steps_done"] == 1


def test_inverse_problem_trains_its_parameter():
    xs = np.linspace(0, 1, 21)[:, None]

    class Inverse(pp.Problem):
        domain = G.Interval(0, 1)
        k = pp.Parameter(0.5)   # true value 1: -k u'' = pi^2 sin(pi x) with u = sin(pi x)
        conditions = [pp.Dirichlet(0.0), pp.PointData(xs, np.sin(np.pi * xs))]

        def residual(self, x, u):
            return self.k * u.xx + math.pi**2 * torch.sin(math.pi * x[:, 0])

    problem = Inverse()
    assert float(problem.k) == 0.5
    r = pp.solve(problem, adam=pp.Adam(steps=400, lr=1e-2), lbfgs=pp.LBFGS(steps=100),
                 points=pp.Points(domain=64, boundary=2), **SMALL)
    assert abs(r.parameters["k"] - 1.0) < 0.05        # measured: |k - 1| = 2.6e-5
    trace = r.history["parameters"]["k"]
    assert len(trace) == len(r.history["step"]) and trace[-1] == r.parameters["k"]
    assert isinstance(problem.k, torch.nn.Parameter)
    with pytest.raises(AttributeError, match="Parameter"):
        problem.k = 2.0


def test_callbacks_see_the_documented_state():
    seen = []

    class Spy(pp.Callback):
        def on_start(self, state):
            seen.append(("start", state.step, state.max_steps))

        def on_step(self, state):
            assert set(state.losses) == {"pde", "dirichlet_u", "initial_u"} and state.lr > 0
            assert state.optimizer is not None and state.config["problem"] == "heat"
            seen.append((state.phase, state.step, state.l2_relative_error))

        def on_end(self, state, result):
            seen.append(("end", result.l2_relative_error))

    r = losses(callbacks=[Spy()])
    assert seen[0] == ("start", 0, 16)
    assert [s[0] for s in seen[1:13]] == ["adam"] * 12 and seen[13][0] == "lbfgs"
    assert seen[4][2] is not None and seen[3][2] is None       # evaluated every 4 steps
    assert seen[-1] == ("end", r.l2_relative_error)


def test_loss_weights_and_schedule():
    r = losses(loss_weights={"initial_u": 10.0}, adam=pp.Adam(steps=10, lr=1e-2, schedule=pp.Exponential(0.5, 5)))
    t = r.history["terms"]
    assert r.history["loss"][0] == pytest.approx(t["pde"][0] + t["dirichlet_u"][0] + 10 * t["initial_u"][0])
    assert r.history["lr"][:10] == pytest.approx([1e-2 * 0.5 ** (s / 5) for s in range(10)])
    with pytest.raises(ValueError, match=r"unknown terms \['ic'\]; the terms are"):
        losses(loss_weights={"ic": 1.0})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="float16"), ValueError, "float32"),
    (dict(device="gpu"), ValueError, "device"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(derivatives="fd"), ValueError, "autograd"),
    (dict(adam=dict(steps=3)), TypeError, "ps.Adam"),
    (dict(network=PlainMLP(2, 1), storage="lowrank"), ValueError, "storage"),
    (dict(callbacks=[object()]), TypeError, "on_step"),
])
def test_option_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        losses(**{**SMALL, **kwargs})


def test_option_objects_validate():
    with pytest.raises(ValueError, match="hammersley"):
        pp.Points(sampler="grid")
    with pytest.raises(ValueError, match="cosine"):
        pp.Adam(schedule="linear")
    with pytest.raises(ValueError, match="tanh"):
        pp.Network(activation="swish")
    with pytest.raises(ValueError, match="Initial need"):
        losses(points=pp.Points(domain=10, initial=0))


def test_autograd_fallback_matches_jets_on_the_same_weights():
    hist = {}
    for derivatives in ("jet", "autograd"):
        hist[derivatives] = pp.solve(Heat(), network=PlainMLP(2, 1), derivatives=derivatives, dtype="float64",
                                     adam=pp.Adam(steps=5), lbfgs=pp.LBFGS(steps=2), seed=0,
                                     points=pp.Points(domain=30, boundary=6, initial=6), progress=False).history
    np.testing.assert_allclose(hist["jet"]["loss"], hist["autograd"]["loss"], rtol=1e-10)


@pytest.mark.parametrize("architecture", ["mlp", "pirate"])
def test_autograd_on_a_built_network_trains_like_exact_jets(architecture):
    """derivatives="autograd" with the network the solver builds: its plain forward under nested
    autograd, storage "exact" (what it keeps), and the same training as exact jets."""
    runs = {}
    for derivatives in ("jet", "autograd"):
        runs[derivatives] = pp.solve(Heat(), network=pp.Network(width=8, depth=2, architecture=architecture),
                                     storage="exact" if derivatives == "jet" else None, derivatives=derivatives,
                                     dtype="float64", adam=pp.Adam(steps=4), lbfgs=pp.LBFGS(steps=2), seed=0,
                                     points=pp.Points(domain=30, boundary=6, initial=6), progress=False)
    assert runs["autograd"].config["storage"] == "exact"
    assert runs["autograd"].config["derivatives"] == "autograd"
    np.testing.assert_allclose(runs["autograd"].history["loss"], runs["jet"].history["loss"], rtol=1e-9)


def test_autograd_refuses_a_storage_policy_it_would_not_use():
    with pytest.raises(ValueError, match="storage='lowrank' applies to jets.*derivatives='jet'"):
        losses(**{**SMALL, "derivatives": "autograd", "storage": "lowrank"})


def test_save_writes_a_file(tmp_path):
    r = losses()
    path = pinnsketch.save(r, tmp_path / "run.h5")
    assert path.exists() and path.stat().st_size > 0


class CountingMLP(torch.nn.Module):
    """A small pinnsketch MLP that counts its `advance()` calls."""

    def __init__(self):
        super().__init__()
        self.mlp = pinnsketch.MLP(1, 1, width=8, depth=2, storage="exact", seed=0, dtype=torch.float64)
        self.advances = 0

    def advance(self):
        self.advances += 1
        self.mlp.advance()

    def forward(self, x):
        return self.mlp(x)

    def jet(self, x, spec):
        return self.mlp.jet(x, spec)


def test_solver_advances_once_per_adam_and_lbfgs_step():
    # Every step goes through pinnsketch.training.train_step: one advance() per step, L-BFGS included.
    net = CountingMLP()
    result = pp.solve(Poisson1D(), network=net, adam=pp.Adam(steps=5), lbfgs=pp.LBFGS(steps=4, max_iter=2),
                      points=pp.Points(domain=16, boundary=2, initial=0), dtype="float64", device="cpu",
                      eval_points=64, progress=False)
    lbfgs_steps = result.history["phase"].count("lbfgs")
    assert net.advances == 5 + lbfgs_steps and lbfgs_steps >= 1


class _MismatchedGradient(torch.autograd.Function):
    """sum(x^2) whose backward reports minus its gradient: no step along L-BFGS' direction lowers it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x**2).sum()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return -2 * x * grad


def test_lbfgs_stop_names_a_line_search_that_found_no_decrease():
    from pinnsketch.pinn.solver import _lbfgs_reason

    x = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    options = pp.LBFGS(steps=20)
    opt = options.build([x])
    pp.LBFGS.limit(opt, 20, options.max_line_search)

    def closure():
        opt.zero_grad()
        loss = _MismatchedGradient.apply(x)
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[x]
    assert state["n_iter"] == 1 and float(state["t"]) == 0.0 and x.tolist() == [1.0, 2.0]
    reason, detail = _lbfgs_reason(opt, options, state["func_evals"])
    assert reason == "step tolerance" and "tolerance_change=1e-15" in detail
    assert "no step that lowers the loss (t = 0)" in detail and "dtype='float64'" in detail


def test_solve_takes_a_storage_spec_with_options_and_records_it():
    result = pp.solve(Heat(), storage="lowrank:residual=int8,target=0.005", network=pp.Network(width=8, depth=2),
                      points=pp.Points(domain=32, boundary=4, initial=4), adam=pp.Adam(steps=2),
                      lbfgs=pp.LBFGS(steps=0), progress=False, eval_points=50)
    assert result.config["storage"] == "lowrank:residual=int8,target=0.005"
    assert [r["target"] for r in result.storage_report] == [0.005] * 3
    with pytest.raises(ValueError, match="bad options for storage 'lowrank'"):
        pp.solve(Heat(), storage="lowrank:bits=8", adam=pp.Adam(steps=1), lbfgs=pp.LBFGS(steps=0), progress=False)


def test_cli_derivatives_autograd_through_the_real_command(tmp_path):
    """`pinnsketch solve ... --derivatives autograd` as a user runs it: trains with storage exact and
    records it; with --storage lowrank it is one line and exit status 2."""
    import os
    import subprocess
    import sys

    import pinnsketch as ps

    env = dict(os.environ, OMP_NUM_THREADS="1", DDE_BACKEND="pytorch", MPLCONFIGDIR=str(tmp_path / "mpl"))
    base = [sys.executable, "-m", "pinnsketch", "solve", "heat", "--derivatives", "autograd", "--steps", "3",
            "--lbfgs-steps", "1", "--points", "32", "--width", "8", "--depth", "1", "--device", "cpu", "--no-progress"]
    out = tmp_path / "ag.h5"
    ok = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "storage=exact" in ok.stdout and "relative L2 error" in ok.stdout
    config = ps.load(out).config
    assert config["derivatives"] == "autograd" and config["storage"] == "exact"
    bad = subprocess.run([*base, "--storage", "lowrank"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "derivatives='jet'" in lines[0]
