"""The compiled loss (solve(compile=True)): agreement with the eager loss, no recompiles, fallback."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pinnsketch as ps
from pinnsketch.nn import MLP, JetSpec, ResidualMLP
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


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
def test_plain_jet_matches_model_jet_float64(cls):
    model = cls(2, 2, width=8, depth=2, activation="tanh", storage="exact", seed=3, dtype=torch.float64)
    with torch.no_grad():  # nonzero biases, so a misplaced bias would show
        for block in model.blocks:
            block.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
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
    with pytest.raises(TypeError, match="MLP and ResidualMLP"):
        plain_jet(torch.nn.Linear(2, 1), torch.zeros(3, 2), JetSpec(2))


def _run(compile_):
    o = _resolve(Burgers(), dict(storage="exact", network=ps.Network(width=8, depth=2),
                                 points=ps.Points(domain=64, boundary=16, initial=16), seed=0, dtype="float32",
                                 device="cpu", adam=ps.Adam(steps=1), lbfgs=ps.LBFGS(steps=0)))
    return _Run(Burgers(), o, "exact", (), False, compile_)


def _loss_and_grads(run, source):
    for p in run.params:
        p.grad = None
    terms = source.terms()
    run.objective.total(terms).backward()
    return terms.detach().clone(), [p.grad.clone() for p in run.params]


def _compiled_run(backend):
    torch._dynamo.reset()
    run = _run(True)
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
