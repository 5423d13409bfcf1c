"""The compiled loss (solve(compile=True)): agreement with the eager loss, no recompiles, fallback."""

import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import pinnsketch as ps
from pinnsketch.nn import MLP, JetSpec, ModifiedMLP, PirateNet, ResidualMLP
from pinnsketch.nn.functional import plain_jet
from pinnsketch.pinn.compiled import CompiledLoss
from pinnsketch.pinn.solver import _resolve, _Run


class Burgers(ps.Problem):
    name = "burgers-small"
    domain = ps.geometry.Interval(-1, 1) * ps.geometry.TimeDomain(0, 1)
    nu = 0.01 / math.pi
    conditions = [ps.Dirichlet(0.0, on="boundary"), ps.Initial(lambda x: -torch.sin(math.pi * x[:, 0:1]))]

    def residual(self, x, u):
        return u.t + u * u.x - self.nu * u.xx


@pytest.mark.parametrize("cls", [MLP, ResidualMLP, ModifiedMLP, PirateNet])
def test_plain_jet_matches_model_jet_float64(cls):
    model = cls(2, 2, width=8, depth=2, activation="tanh", storage="exact", seed=3, dtype=torch.float64)
    with torch.no_grad():  # nonzero biases (and PirateNet's skip weights), so a misplaced term would show
        for block in model.blocks:
            block.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        if cls is PirateNet:
            model.alpha.fill_(0.4)
    x = torch.rand(17, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = JetSpec(2, [(0, 0, 0), (0, 1), (1, 1)])
    want = model.jet(x, spec).streams
    got = plain_jet(model, x, spec).streams
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the derivative streams are the input derivatives: check u_x by autograd
    xr = x.clone().requires_grad_(True)
    u = plain_jet(model, xr, JetSpec(2)).value
    (ux,) = torch.autograd.grad(u[:, 0].sum(), xr)
    torch.testing.assert_close(got[spec.index((0,)), :, 0], ux[:, 0], rtol=1e-12, atol=1e-12)


def test_plain_jet_rejects_other_networks():
    with pytest.raises(TypeError, match="MLP, ResidualMLP, ModifiedMLP and PirateNet"):
        plain_jet(torch.nn.Linear(2, 1), torch.zeros(3, 2), JetSpec(2))


def _run(compile_, dtype="float32", network=None):
    o = _resolve(Burgers(), dict(storage="exact", network=network or ps.Network(width=8, depth=2),
                                 points=ps.Points(domain=64, boundary=16, initial=16), seed=0, dtype=dtype,
                                 device="cpu", adam=ps.Adam(steps=1), lbfgs=ps.LBFGS(steps=0)))
    return _Run(Burgers(), o, "exact", (), False, compile_)


def _loss_and_grads(run, source):
    for p in run.params:
        p.grad = None
    terms = source.terms()
    run.objective.total(terms).backward()
    return terms.detach().clone(), [p.grad.clone() for p in run.params]


def _compiled_run(backend, dtype="float32", network=None):
    torch._dynamo.reset()
    run = _run(True, dtype, network)
    assert isinstance(run.loss_source, CompiledLoss)
    run.loss_source = CompiledLoss(run.objective, run.params, run.device, backend=backend)
    run.loss_source.prepare()
    assert run.loss_source.active, "compilation failed on this machine"
    assert run.loss_source.compile_s > 0
    return run


def _check_agreement(run):
    terms_c, grads_c = _loss_and_grads(run, run.loss_source)
    terms_e, grads_e = _loss_and_grads(run, run.objective)
    torch.testing.assert_close(terms_c, terms_e, rtol=1e-5, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5 * float(ge.abs().max()))


# inductor (code generation, what solve(compile=True) uses) takes most of a minute to compile
# on a busy 2-core machine; aot_eager checks the traced graph, its backward and the dynamic
# point counts in seconds
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_matches_eager_and_survives_new_point_counts(backend):
    from torch._dynamo.utils import counters

    run = _compiled_run(backend)
    _check_agreement(run)
    frames = counters["stats"]["unique_graphs"]
    # refinement: more interior points, a new point count
    run.points.add_anchors(run.points.domain[:10] * 0.5)
    _check_agreement(run)
    assert len(run.objective.x_all) == 64 + 10 + 32
    assert counters["stats"]["unique_graphs"] == frames, "a new point count recompiled"


def test_compiled_gated_network_matches_eager():
    """PirateNet (the allen_cahn defaults' architecture) with Fourier features, a periodic axis and
    factorized weights compiles too: its gates are plain ops in `plain_jet`."""
    network = ps.Network(width=8, depth=1, architecture="pirate", fourier=ps.Fourier(features=4),
                         periodic={"x": 2.0}, factorized=True)
    run = _compiled_run("aot_eager", network=network)
    with torch.no_grad():
        run.network.alpha.fill_(0.5)     # the gated blocks join in (alpha = 0 at initialization)
    _check_agreement(run)


def test_every_run_of_a_process_gets_its_own_compiled_code():
    """torch.compile keeps 8 variants per code object and then runs that code eagerly through its
    guards; a tenth compiled run in one process must still compile (here: ten network widths)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    for width in range(2, 12):
        run = _run(True, network=ps.Network(width=width, depth=1))
        run.loss_source = CompiledLoss(run.objective, run.params, run.device, backend="aot_eager")
        before = counters["stats"]["unique_graphs"]
        run.loss_source.prepare()
        assert run.loss_source.active
        assert counters["stats"]["unique_graphs"] > before, f"run {width - 1} did not compile"


def test_compile_falls_back_eagerly_without_a_compiler(tmp_path):
    script = textwrap.dedent("""
        import math, warnings, torch, pinnsketch as ps
        torch.set_num_threads(1)
        class B(ps.Problem):
            name = "b"
            domain = ps.geometry.Interval(-1, 1) * ps.geometry.TimeDomain(0, 1)
            conditions = [ps.Dirichlet(0.0, on="boundary")]
            def residual(self, x, u):
                return u.t + u * u.x - 0.01 * u.xx
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = ps.solve(B(), storage="exact", network=ps.Network(width=4, depth=1), compile=True,
                         points=ps.Points(domain=16, boundary=4, initial=4), adam=ps.Adam(steps=2),
                         lbfgs=ps.LBFGS(steps=0), progress=False, device="cpu")
        msgs = [str(x.message) for x in w if "solve(compile=True)" in str(x.message)]
        print(len(msgs)); print(msgs[0] if msgs else "-"); print(r.timing["adam_steps"])
    """)
    env = dict(os.environ, CXX="/nonexistent/c++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, message, steps = out.stdout.strip().splitlines()[-3:]
    assert count == "1"
    assert "torch.compile failed" in message and "continues eagerly" in message, message
    assert steps == "2"


def test_compile_with_sketched_storage_warns_and_runs_eagerly():
    o = _resolve(Burgers(), dict(storage="lowrank", network=ps.Network(width=8, depth=2),
                                 points=ps.Points(domain=32, boundary=8, initial=8), device="cpu"))
    with pytest.warns(RuntimeWarning, match="runs eagerly.*LowRankStorage"):
        run = _Run(Burgers(), o, "lowrank", (), False, True)
    assert run.loss_source is run.objective


def test_cli_compile_flag_reaches_solve():
    """`pinnsketch solve ... --compile` through the real command in a subprocess: with a sketched policy
    the flag reaches solve(), which says once that it runs eagerly, and the run completes."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", DDE_BACKEND="pytorch")
    proc = subprocess.run([sys.executable, "-m", "pinnsketch.cli", "solve", "heat", "--storage", "lowrank",
                           "--compile", "--steps", "3", "--lbfgs-steps", "0", "--points", "32", "--width", "8",
                           "--depth", "1", "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("runs eagerly") == 1
    assert "relative L2 error" in proc.stdout


def _copy_params(src, dst):
    with torch.no_grad():
        for a, b in zip(src.params, dst.params):
            b.copy_(a)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_adam_iteration_matches_eager_adam(backend):
    """One compiled call (loss, gradient, torch's Adam update) against the eager loss and torch's fused
    Adam, in float64: the same terms and parameters to 1e-9 over several steps with a changing lr, also
    after the point count changes, and the optimizer's state is torch's (its step count)."""
    from pinnsketch.pinn.compiled import CompiledAdam
    from pinnsketch.training import fused_step, train_step

    torch._dynamo.reset()
    run = _compiled_run(backend, "float64")
    fused = CompiledAdam(run.loss_source, (0.9, 0.999), backend=backend)
    ref = _run(False, "float64")
    _copy_params(run, ref)
    opt_c = ps.Adam().build(run.params)
    opt_e = ps.Adam().build(ref.params)
    assert fused.usable(opt_c)
    fused.prepare()
    assert fused.active, "compilation failed on this machine"

    def both(lr):
        for opt in (opt_c, opt_e):
            opt.param_groups[0]["lr"] = lr
        got = fused_step(run.network, lambda: fused.step(opt_c))
        want = train_step(ref.network, opt_e, lambda: (ref.objective.total(t := ref.objective.terms()), t))
        torch.testing.assert_close(torch.tensor(got.values), torch.tensor(want.values), rtol=1e-9, atol=0)
        for a, b in zip(run.params, ref.params):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    for lr in (1e-2, 5e-3, 2e-3):
        both(lr)
    for r in (run, ref):  # refinement: a new interior point count
        r.points.add_anchors(r.points.domain[:10] * 0.5)
    both(1e-3)
    assert int(opt_c.state[run.params[0]]["step"]) == 4
    assert fused.compile_s > 0


def test_compiled_adam_skips_a_non_finite_update_and_raises():
    from pinnsketch.pinn.compiled import CompiledAdam
    from pinnsketch.training import TrainingDivergedError, fused_step

    torch._dynamo.reset()
    run = _compiled_run("aot_eager")
    fused = CompiledAdam(run.loss_source, (0.9, 0.999), backend="aot_eager")
    opt = ps.Adam().build(run.params)
    fused_step(run.network, lambda: fused.step(opt))  # one good step: state exists
    before = [p.detach().clone() for p in run.params]
    state = [opt.state[p]["exp_avg"].clone() for p in run.params]
    run.objective.weights = run.objective.weights * float("nan")
    with pytest.raises(TrainingDivergedError, match="became nan"):
        fused_step(run.network, lambda: fused.step(opt), names=["loss", *run.objective.term_names])
    for p, b, m in zip(run.params, before, state):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["exp_avg"], m)
    assert int(opt.state[run.params[0]]["step"]) == 1


def test_compiled_adam_applies_only_to_plain_adam_over_the_network():
    from pinnsketch.pinn.compiled import CompiledAdam

    run = _run(True)
    fused = CompiledAdam(run.loss_source, (0.9, 0.999), backend="aot_eager")
    assert fused.usable(torch.optim.Adam(run.params))
    assert not fused.usable(torch.optim.Adam(run.params, amsgrad=True))
    assert not fused.usable(torch.optim.AdamW(run.params))
    assert not fused.usable(torch.optim.Adam(run.params[:-1]))
    assert not fused.usable(torch.optim.Adam([{"params": run.params[:2]}, {"params": run.params[2:]}]))


def test_solve_compiled_uses_the_one_call_adam_step_on_cpu():
    """solve(compile=True) on the CPU runs its unmetered Adam steps as one compiled call and reports
    both compilations in compile_s (aot_eager: the wiring, not inductor's code)."""
    r, calls, _ = _solve_through_aot_eager(adam=ps.Adam(steps=6), lbfgs=ps.LBFGS(steps=2), eval_every=3)
    assert r.timing["adam_steps"] == 6
    assert calls == 3  # steps 1, 3, 4: step 0 and the steps that end at an evaluation (2, 5) are metered
    assert r.timing["compile_s"] > 0
    losses = r.history["loss"]
    assert len(losses) > 6 and all(math.isfinite(v) for v in losses)  # 6 Adam steps, then L-BFGS
    assert losses[5] < losses[0]  # the fused steps train


def test_no_one_call_adam_step_without_a_torch_adam_phase():
    """SOAP or an empty Adam phase: nothing is compiled for the Adam iteration."""
    for adam in (ps.SOAP(steps=2), ps.Adam(steps=0)):
        o = _resolve(Burgers(), dict(storage="exact", network=ps.Network(width=8, depth=2), adam=adam,
                                     points=ps.Points(domain=32, boundary=8, initial=8), device="cpu"))
        run = _Run(Burgers(), o, "exact", (), False, True)
        assert isinstance(run.loss_source, CompiledLoss) and run.adam_step is None
    run = _run(True)
    assert run.adam_step is not None


@pytest.mark.slow  # inductor compiles two graphs: most of a minute on a 2-core machine
def test_cli_compile_with_exact_storage_runs_compiled(tmp_path):
    """`pinnsketch solve heat --storage exact --compile` through the real command: no eager notice and
    no compiler failure, and the run completes and is saved."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DDE_BACKEND="pytorch")
    out = tmp_path / "heat.h5"
    proc = subprocess.run([sys.executable, "-m", "pinnsketch.cli", "solve", "heat", "--storage", "exact",
                           "--compile", "--steps", "5", "--lbfgs-steps", "0", "--points", "64", "--width", "8",
                           "--depth", "2", "--device", "cpu", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "runs eagerly" not in proc.stderr and "torch.compile failed" not in proc.stderr
    assert "relative L2 error" in proc.stdout
    from pinnsketch import load

    run = load(out)
    assert run.completed and run.steps == 5 and run.storage == "exact"


def test_compile_choice_alternates_blocks_then_keeps_the_faster():
    from pinnsketch.pinn.compiled import CompileChoice

    choice = CompileChoice(rounds=2, block=2, margin=0.05)
    modes = []
    for _ in range(8):
        mode = choice.mode()
        modes.append(mode)
        choice.record(mode, 0.010 if mode == "compiled" else 0.004)
    assert modes == ["compiled", "compiled", "eager", "eager"] * 2
    assert choice.chosen == "eager" and choice.mode() == "eager"
    assert choice.timing() == pytest.approx({"compiled_ms_per_step_measured": 10.0, "eager_ms_per_step_measured": 4.0})
    close = CompileChoice(rounds=1, block=1, margin=0.05)
    close.record("compiled", 0.010)
    close.record("eager", 0.0097)        # within the margin: the compiled step stays
    assert close.chosen == "compiled"


def _solve_through_aot_eager(delay: float = 0.0, **kwargs):
    """solve(compile=True) of the small Burgers problem with aot_eager in place of inductor, each
    one-call Adam iteration `delay` seconds slower; (result, compiled Adam calls, "continues eagerly"
    warnings)."""
    import time as _time

    import pinnsketch.pinn.compiled as compiled

    calls = []

    class Counting(compiled.CompiledAdam):
        def __init__(self, loss, betas, backend="inductor"):
            super().__init__(loss, betas, backend="aot_eager")

        def step(self, optimizer):
            calls.append(1)
            _time.sleep(delay)
            return super().step(optimizer)

    class AotLoss(compiled.CompiledLoss):
        def __init__(self, objective, params, device, backend="inductor"):
            super().__init__(objective, params, device, backend="aot_eager")

    torch._dynamo.reset()
    mp = pytest.MonkeyPatch()
    mp.setattr(compiled, "CompiledAdam", Counting)
    mp.setattr(compiled, "CompiledLoss", AotLoss)
    options = dict(storage="exact", network=ps.Network(width=8, depth=2), progress=False, device="cpu", seed=0,
                   points=ps.Points(domain=64, boundary=16, initial=16))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = ps.solve(Burgers(), compile=True, **{**options, **kwargs})
    finally:
        mp.undo()
    return r, len(calls), [str(w.message) for w in caught if "continues eagerly" in str(w.message)]


def test_solve_keeps_eager_steps_when_the_compiled_ones_are_slower_here():
    r, calls, notes = _solve_through_aot_eager(0.05, adam=ps.Adam(steps=40), lbfgs=ps.LBFGS(steps=0),
                                               eval_every=10**6)
    assert calls == 12                                   # three compiled blocks of four while measuring
    assert r.timing["compiled_ms_per_step_measured"] > r.timing["eager_ms_per_step_measured"] + 40
    assert len(notes) == 1 and "eager step took" in notes[0]
    # compiled and eager steps share the optimizer's state: the run trains as an eager one
    eager = ps.solve(Burgers(), storage="exact", network=ps.Network(width=8, depth=2),
                     points=ps.Points(domain=64, boundary=16, initial=16), adam=ps.Adam(steps=40),
                     lbfgs=ps.LBFGS(steps=0), progress=False, device="cpu", eval_every=10**6, seed=0)
    np.testing.assert_allclose(r.history["loss"], eager.history["loss"], rtol=2e-4)

