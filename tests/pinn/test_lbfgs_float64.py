"""L-BFGS' float64 continuation: a float32 run whose L-BFGS meets the float32 noise floor goes on in float64."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pinnsketch as ps
from pinnsketch.sketch import SubspaceRequest, track_many

from pinn_helpers import Interrupt


class Decay(ps.Problem):
    """u_t = -u on [0, 1] x [0, 1], u(x, 0) = 1; u = exp(-t)."""

    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    conditions = [ps.Initial(1.0)]

    def residual(self, x, u):
        return u.t + u

    def exact(self, x):
        return torch.exp(-x[:, 1:2])


def solve(storage="exact", fallback=True, steps=400, lbfgs_progress=0.01, **kw):
    # measured on this problem: float32 L-BFGS stops at step 175 (exact) / 219 (lowrank), t = 0
    return ps.solve(Decay(), storage=storage, network=ps.Network(width=16, depth=2),
                    points=ps.Points(domain=128, boundary=8, initial=16), adam=ps.Adam(steps=100),
                    lbfgs=ps.LBFGS(steps=steps, float64_fallback=fallback, float64_progress=lbfgs_progress),
                    progress=False, eval_every=10_000, seed=0, **kw)


@pytest.mark.parametrize("storage", ["exact", "lowrank"])
def test_float32_stall_continues_in_float64_to_a_lower_loss(storage):
    stopped, continued = solve(storage, fallback=False), solve(storage)
    stop = stopped.history["lbfgs_stop"]
    assert stop["reason"] != "gradient tolerance" and stop["step"] < 500 and "precision" not in stopped.history
    h = continued.history
    assert h["precision"]["dtype"] == ["float64", "float32"]
    switched, back = h["precision"]["step"]
    assert switched == stop["step"]            # the same run up to the float32 stop
    assert h["loss"][:h["step"].index(switched) + 1] == stopped.history["loss"]
    assert back == h["step"][-1] > switched    # float64 to the end of the phase, then the run's dtype again
    assert h["loss"][-1] < h["loss"][h["step"].index(switched)]
    if storage == "exact":                     # exact stalls far above what float64 reaches
        assert h["loss"][-1] < 0.1 * stop_loss(stopped) and continued.l2_relative_error < stopped.l2_relative_error
    assert all(p.dtype == torch.float32 for p in continued.model.parameters())
    assert continued.config["dtype"] == "float32"


def stop_loss(result) -> float:
    return result.history["loss"][-1]


def test_float64_runs_and_exhausted_fallbacks_stop_as_before():
    r = solve(dtype="float64", steps=60)
    assert "precision" not in r.history
    # a tolerance float64 also meets: one switch, then the stop names it
    r = ps.solve(Decay(), storage="exact", network=ps.Network(width=8, depth=2), points=ps.Points(domain=64, initial=8),
                 adam=ps.Adam(steps=20), lbfgs=ps.LBFGS(steps=200, tolerance_change=1e-6), progress=False, seed=0)
    switched = r.history["precision"]["step"][0]
    assert r.history["precision"]["dtype"] == ["float64", "float32"]
    assert f"(in float64 from step {switched})" in r.history["lbfgs_stop"]["detail"]


def test_resume_during_the_float64_continuation_ends_where_the_uninterrupted_run_ends():
    full = solve(steps=200)
    switched = full.history["precision"]["step"][0]
    stop = Interrupt(switched + 30)
    with pytest.raises(KeyboardInterrupt):
        solve(steps=200, callbacks=[stop])
    assert stop.saved["history"]["precision"]["dtype"] == ["float64"]
    assert stop.saved["model"]["blocks.0.weight"].dtype == torch.float64
    resumed = solve(steps=200, resume=stop.saved)
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["precision"] == full.history["precision"]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def test_lbfgs_history_follows_the_parameters_dtype_through_torchs_loader():
    # what `_set_dtype` relies on: Optimizer.load_state_dict casts floating state, lists included
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.LBFGS([x], max_iter=3)
    opt.step(lambda: (opt.zero_grad(), (x ** 4).sum().backward(), (x ** 4).sum())[2])
    assert opt.state[x]["old_dirs"] and opt.state[x]["d"].dtype == torch.float32
    n_iter = opt.state[x]["n_iter"]
    x.data = x.data.double()
    opt.load_state_dict(opt.state_dict())
    state = opt.state[x]
    assert state["d"].dtype == state["old_dirs"][0].dtype == state["old_stps"][0].dtype == torch.float64
    assert state["n_iter"] == n_iter


def test_tracked_basis_follows_the_activations_dtype():
    g32 = torch.randn(1, 6, 6)
    g32 = g32 @ g32.mT
    (basis,) = track_many([SubspaceRequest(None, g32, 2)])
    assert basis.q.dtype == torch.float32
    (warm,) = track_many([SubspaceRequest(basis, g32.double(), 2)])   # a warm start across a float64 switch
    assert warm.q.dtype == torch.float64


def test_lbfgs_option_is_checked_and_reaches_the_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="float64_fallback='no' must be True or False"):
        ps.LBFGS(float64_fallback="no")
    with pytest.raises(ValueError, match=r"float64_progress=1.5 must be a fraction in \[0, 1\)"):
        ps.LBFGS(float64_progress=1.5)
    out = tmp_path / "d.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1", DDE_BACKEND="pytorch")

    def pinnsketch(*args):   # the installed command, as a user runs it
        return subprocess.run([sys.executable, "-m", "pinnsketch", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    done = pinnsketch("solve", "heat", "--steps", "2", "--lbfgs", "steps=2,float64_fallback=false", "--no-progress",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert ps.load(out).config["lbfgs"]["float64_fallback"] is False
    bad = pinnsketch("solve", "heat", "--steps", "2", "--lbfgs", "float64_progress=2", "--no-progress")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "float64_progress=2" in bad.stderr and "fraction in [0, 1)" in bad.stderr


def test_no_float64_continuation_without_the_memory_for_it(monkeypatch):
    import pinnsketch.pinn.solver as solver

    monkeypatch.setattr(solver, "available_bytes", lambda device: 1024)
    r = solve(steps=400)
    assert r.step_peak_bytes and "precision" not in r.history
    detail = r.history["lbfgs_stop"]["detail"]
    assert "no float64 continuation: it needs about" in detail and "MiB are available on cpu" in detail


def test_available_bytes_reads_this_machine():
    from pinnsketch.nn.memory import available_bytes

    free = available_bytes(torch.device("cpu"))
    assert free is None or 0 < free < 1 << 50
    assert available_bytes(torch.device("meta")) is None


def test_float64_continuation_ends_when_an_interval_gains_too_little():
    every = ps.LBFGS.FLOAT64_INTERVAL
    full = solve(steps=800, lbfgs_progress=0.0)
    assert full.history["lbfgs_stop"]["reason"] == "step budget"
    demanding = solve(steps=800, lbfgs_progress=0.9)       # the first interval gains 98 %, the second less
    h = demanding.history
    start, stop = h["precision"]["step"][0], h["lbfgs_stop"]["step"]
    assert h["lbfgs_stop"]["reason"] == "float64 progress" and stop < full.history["step"][-1]
    assert (stop - start) % every < 20 and stop - start >= every       # at the end of an interval
    assert "less than float64_progress=0.9" in h["lbfgs_stop"]["detail"]
    assert h["loss"] == full.history["loss"][:len(h["loss"])]


def test_each_time_window_may_go_on_in_float64_and_the_next_starts_in_float32():
    r = ps.solve(Decay(), storage="lowrank", network=ps.Network(width=16, depth=2),
                 points=ps.Points(domain=128, boundary=8, initial=16), adam=ps.Adam(steps=100),
                 lbfgs=ps.LBFGS(steps=300), progress=False, eval_every=10_000, seed=0,
                 windows=ps.TimeWindows(windows=2))
    p = r.history["precision"]
    assert p["dtype"] == ["float64", "float32"] * 2          # measured: float64 from steps 221 and 629
    first_window_end = r.history["windows"]["last_step"][0]
    assert p["step"][0] < p["step"][1] == first_window_end < p["step"][2] < p["step"][3]
    assert r.l2_relative_error < 1e-3                     # measured: 2.1e-4


def test_a_run_recorded_before_the_continuation_reruns_without_it():
    from pinnsketch.cli import solve_options_from_config

    config = solve().config
    assert solve_options_from_config(config)["lbfgs"].float64_fallback is True
    old = dict(config, lbfgs={k: v for k, v in config["lbfgs"].items() if not k.startswith("float64")})
    assert solve_options_from_config(old)["lbfgs"] == ps.LBFGS(steps=400, float64_fallback=False)


def test_a_float64_step_out_of_device_memory_ends_the_phase_with_the_parameters_before_it(monkeypatch):
    from pinnsketch.pinn.objective import Objective

    terms, calls = Objective.terms, []

    def tight_memory(self):          # the float64 continuation's third evaluation does not fit
        if self.dtype == torch.float64:
            calls.append(1)
            if len(calls) == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return terms(self)

    class Last(ps.Callback):
        def on_step(self, state):
            self.params = [p.detach().clone() for p in state.model.parameters()]

    monkeypatch.setattr(Objective, "terms", tight_memory)
    last = Last()
    r = solve(steps=400, callbacks=[last])
    stop = r.history["lbfgs_stop"]
    assert stop["reason"] == "float64 memory" and "Tried to allocate 2.00 GiB" in stop["detail"]
    assert r.history["precision"]["dtype"] == ["float64", "float32"]
    for p, q in zip(r.model.parameters(), last.params):   # the last completed step's, rounded to float32
        assert p.dtype == torch.float32 and torch.equal(p, q.to(torch.float32))
