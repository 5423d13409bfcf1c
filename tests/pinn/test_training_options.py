"""Training options: gradient-norm loss balancing, causal weights, warm-up schedule, SOAP."""

from __future__ import annotations

import math

import pytest
import torch

import pinnsketch as ps
from pinnsketch.pinn.causal import CausalWeights, causal_weights
from pinnsketch.pinn.optimizers import SOAPOptimizer
from pinnsketch.pinn.options import Cosine
from pinnsketch.pinn.weighting import balanced_weights, term_gradient_norms

SMALL = dict(points=ps.Points(domain=64, boundary=8, initial=8), lbfgs=ps.LBFGS(steps=0), progress=False,
             eval_every=10_000)


class Multiples(ps.Problem):
    """Two residual terms u and 3 u: L_b = 9 L_a, so ||grad L_b|| = 9 ||grad L_a|| at every parameter."""

    domain = ps.geometry.Interval(0, 1)
    conditions = ()

    def residual(self, x, u):
        return {"a": u - 0, "b": 3 * u}


class Decay(ps.Problem):
    """u_t = -u on [0, 1] x [0, 1], u(x, 0) = 1: time-dependent, for causal weights."""

    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    conditions = [ps.Initial(1.0)]

    def residual(self, x, u):
        return u.t + u


# --- gradient-norm balancing ---------------------------------------------------------------
def test_balanced_weights_closed_form_for_terms_that_are_multiples():
    torch.manual_seed(0)
    w = torch.randn(5, 3, requires_grad=True)
    base = (w.sin() ** 2).sum()
    c = torch.tensor([1.0, 4.0, 0.5])
    norms = term_gradient_norms(base * c, [w])
    assert torch.allclose(norms / norms[0], c.double(), rtol=1e-6)
    # alpha = 0: the target itself, sum_j c_j / c_i; every weighted term then pulls with the same norm
    target = balanced_weights(norms, torch.ones(3), alpha=0.0)
    assert torch.allclose(target, c.sum() / c, rtol=1e-5)
    assert torch.allclose(target * norms.float(), (target * norms.float())[0].expand(3), rtol=1e-5)
    # moving average from the previous weights
    moved = balanced_weights(norms, torch.tensor([2.0, 2.0, 2.0]), alpha=0.9)
    assert torch.allclose(moved, 0.9 * 2 + 0.1 * c.sum() / c, rtol=1e-5)


def test_balanced_weights_keep_a_term_without_gradient():
    out = balanced_weights(torch.tensor([2.0, 0.0, 6.0], dtype=torch.float64), torch.tensor([1.0, 5.0, 1.0]), 0.5)
    assert out.tolist() == pytest.approx([0.5 + 0.5 * 8 / 2, 5.0, 0.5 + 0.5 * 8 / 6])


@pytest.mark.parametrize("storage", ["exact", "lowrank"])
def test_solve_balances_terms_of_known_magnitude(storage):
    """Through the solver and the run's network (storage policies apply): weights 10 and 10/9 in the limit."""
    every = 2
    result = ps.solve(Multiples(), storage=storage, adam=ps.Adam(steps=5),
                      balance=ps.GradNormWeights(every=every, alpha=0.5), **SMALL)
    b = result.history["balance"]
    assert b["step"] == [0, 2, 4]
    norms = torch.tensor(b["gradient_norms"], dtype=torch.float64)
    assert torch.allclose(norms[:, 1] / norms[:, 0], torch.full((3,), 9.0, dtype=torch.float64), rtol=1e-4)
    expected, weights = torch.ones(2, dtype=torch.float64), []
    for _ in b["step"]:
        expected = 0.5 * expected + 0.5 * torch.tensor([10.0, 10 / 9], dtype=torch.float64)
        weights.append(expected.tolist())
    assert torch.allclose(torch.tensor(b["weights"], dtype=torch.float64), torch.tensor(weights, dtype=torch.float64),
                          rtol=1e-4)
    assert result.config["balance"] == {"name": "gradnorm", "every": every, "alpha": 0.5}
    # the weighted total the optimizer saw: 1.75 * L_a + (1 + 0.75/9) L_b after the first update
    h = result.history
    w0 = b["weights"][0]
    assert h["loss"][0] == pytest.approx(w0[0] * h["terms"]["a"][0] + w0[1] * h["terms"]["b"][0], rel=1e-5)


def test_balance_resumes_from_its_weights():
    stop = _StopAt(3)
    kw = dict(adam=ps.Adam(steps=6), balance=ps.GradNormWeights(every=2, alpha=0.5), storage="exact", **SMALL)
    full = ps.solve(Decay(), **kw)
    ps.solve(Decay(), callbacks=[stop], **kw)
    resumed = ps.solve(Decay(), resume=stop.saved, **kw)
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["balance"] == full.history["balance"]


class _StopAt(ps.Callback):
    def __init__(self, step):
        self.at, self.saved = step, None

    def on_step(self, state):
        if state.step == self.at:
            self.saved = state.state_dict()
            state.stop_training = True


def test_grad_norm_weights_validate():
    with pytest.raises(ValueError, match="every=0"):
        ps.GradNormWeights(every=0)
    with pytest.raises(ValueError, match="alpha=1"):
        ps.GradNormWeights(alpha=1)
    with pytest.raises(TypeError, match="balance="):
        ps.solve(Decay(), balance={"every": 10}, **SMALL)


# --- causal weights -------------------------------------------------------------------------
def test_causal_weights_of_known_chunk_losses():
    losses = torch.tensor([1.0, 2.0, 0.5, 3.0])
    w = causal_weights(losses, tol=0.5)
    assert torch.allclose(w, torch.exp(-0.5 * torch.tensor([0.0, 1.0, 3.0, 3.5])))


def test_causal_reduce_on_points_with_known_residuals():
    """Chunk k of 4 on t in [0, 2] holds residuals k + 1: chunk losses (k + 1)^2."""
    cw = CausalWeights(ps.Causal(chunks=4, tol=0.1), t0=0.0, t1=2.0, time_axis=1)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9, 1.2, 1.4, 1.6, 2.0], dtype=torch.float64)
    x = torch.stack([torch.zeros_like(t), t], 1)
    r = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0], dtype=torch.float64, requires_grad=True)
    (loss,) = cw.reduce(x, [r])
    chunk = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    w = torch.exp(-0.1 * torch.tensor([0.0, 1.0, 5.0, 14.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(float((w * chunk).mean()))
    assert cw.min_weight() == pytest.approx(math.exp(-1.4))
    # no gradient through the weights: d loss / d r_i = w_k * 2 r_i / (count_k * M)
    loss.backward()
    assert torch.allclose(r.grad, w.repeat_interleave(2) * 2 * r.detach() / (2 * 4))
    # two residual terms share one set of weights, from their summed chunk losses
    a, b = cw.reduce(x, [r.detach(), 2 * r.detach()])
    w2 = torch.exp(-0.1 * 5 * torch.tensor([0.0, 1.0, 5.0, 14.0], dtype=torch.float64))
    assert a.item() == pytest.approx(float((w2 * chunk).mean()))
    assert b.item() == pytest.approx(4 * a.item())


def test_causal_empty_chunks_do_not_count():
    cw = CausalWeights(ps.Causal(chunks=4, tol=1.0), t0=0.0, t1=1.0, time_axis=0)
    x = torch.tensor([[0.1], [0.8]])
    (loss,) = cw.reduce(x, [torch.tensor([1.0, 1.0])])
    assert loss.item() == pytest.approx((1 + math.exp(-1)) / 2)
    assert torch.isnan(cw.weights[1]) and torch.isnan(cw.weights[2])
    assert cw.min_weight() == pytest.approx(math.exp(-1))


def test_causal_weights_all_one_is_the_plain_mean_square():
    cw = CausalWeights(ps.Causal(chunks=2, tol=1e-12), t0=0.0, t1=1.0, time_axis=0)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (loss,) = cw.reduce(torch.tensor([[0.1], [0.2], [0.7], [0.9]]), [r])
    assert loss.item() == pytest.approx(float(r.square().mean()))


@pytest.mark.parametrize("storage", ["exact", "lowrank"])
def test_solve_with_causal_records_min_weight(storage):
    result = ps.solve(Decay(), storage=storage, adam=ps.Adam(steps=4), causal=ps.Causal(chunks=4, tol=50.0), **SMALL)
    mw = result.history["causal"]["min_weight"]
    assert len(mw) == 4 and all(0 < w < 0.9 for w in mw)
    assert result.config["causal"] == {"name": "causal", "chunks": 4, "tol": 50.0}
    # the residual term is the causally weighted one: from the same initial network, below the plain mean square
    plain = ps.solve(Decay(), storage=storage, adam=ps.Adam(steps=1), **SMALL)
    assert result.history["terms"]["pde"][0] < 0.9 * plain.history["terms"]["pde"][0]
    assert result.history["terms"]["initial_u"][0] == plain.history["terms"]["initial_u"][0]


def test_causal_weights_held_during_an_lbfgs_step():
    cw = CausalWeights(ps.Causal(chunks=2, tol=1.0), t0=0.0, t1=1.0, time_axis=0)
    x = torch.tensor([[0.25], [0.75]])
    cw.hold()
    cw.reduce(x, [torch.tensor([1.0, 1.0])])
    (loss,) = cw.reduce(x, [torch.tensor([2.0, 1.0])])  # held: still exp(-1) for chunk 1, not exp(-4)
    assert loss.item() == pytest.approx((4 + math.exp(-1)) / 2)
    cw.release()
    (loss,) = cw.reduce(x, [torch.tensor([2.0, 1.0])])
    assert loss.item() == pytest.approx((4 + math.exp(-4)) / 2)
    result = ps.solve(Decay(), adam=ps.Adam(steps=2), causal=ps.Causal(chunks=4, tol=5.0),
                      **{**SMALL, "lbfgs": ps.LBFGS(steps=10, max_iter=5)})
    assert result.history["lbfgs_stop"]["reason"] == "step budget"
    assert len(result.history["causal"]["min_weight"]) == len(result.history["step"])


def test_causal_needs_time_and_validates():
    with pytest.raises(ValueError, match="time-dependent"):
        ps.solve(Multiples(), causal=ps.Causal(), **SMALL)
    with pytest.raises(ValueError, match="chunks=1"):
        ps.Causal(chunks=1)
    with pytest.raises(ValueError, match="tol=0"):
        ps.Causal(tol=0)


# --- schedule ---------------------------------------------------------------------------------
def test_warmup_exponential_values():
    s = ps.WarmupExponential(warmup=10, decay_rate=0.5, decay_steps=20)
    assert s(0, 100) == pytest.approx(0.1)
    assert s(9, 100) == pytest.approx(1.0)
    assert s(10, 100) == pytest.approx(1.0)
    assert s(30, 100) == pytest.approx(0.5)
    assert s(50, 100) == pytest.approx(0.25)
    assert ps.WarmupExponential(warmup=0, decay_rate=0.5, decay_steps=1)(0, 1) == 1.0
    assert s.config() == {"name": "warmupexponential", "warmup": 10, "decay_rate": 0.5, "decay_steps": 20}
    with pytest.raises(ValueError, match="decay_rate=0"):
        ps.WarmupExponential(decay_rate=0)
    with pytest.raises(ValueError, match="decay_steps=0"):
        ps.WarmupExponential(decay_steps=0)


def test_solve_follows_the_warmup_schedule():
    result = ps.solve(Decay(), adam=ps.Adam(steps=4, lr=1e-2, schedule=ps.WarmupExponential(warmup=2, decay_steps=1,
                                                                                             decay_rate=0.5)),
                      **SMALL)
    assert result.history["lr"] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])


# --- SOAP ---------------------------------------------------------------------------------------
def test_soap_on_vectors_is_adam():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(7))
    p2 = torch.nn.Parameter(p1.detach().clone())
    soap = SOAPOptimizer([p1], lr=1e-2, betas=(0.9, 0.99), eps=1e-12)
    adam = torch.optim.Adam([p2], lr=1e-2, betas=(0.9, 0.99), eps=1e-12)
    for _ in range(20):
        for p, opt in ((p1, soap), (p2, adam)):
            opt.zero_grad()
            (p.sin() * torch.arange(7.0)).sum().backward()
            opt.step()
    assert torch.allclose(p1, p2, atol=1e-6)


def test_soap_eigenbasis_diagonalizes_the_factors_and_solves_least_squares():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=gen) @ torch.diag(torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1, 0.05]))
    target = torch.randn(6, 4, generator=gen)
    b = a @ target
    w = torch.nn.Parameter(torch.zeros(6, 4))
    opt = SOAPOptimizer([w], lr=3e-2, precondition_every=5)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = (a @ w - b).square().mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 1e-3 * first
    st = opt.state[w]
    for q, f in ((st["QL"], st["L"]), (st["QR"], st["R"])):
        assert torch.allclose(q.T @ q, torch.eye(len(q)), atol=1e-5)
        rotated = q.T @ f @ q
        assert (rotated - torch.diag(rotated.diagonal())).abs().max() <= 1e-2 * rotated.abs().max()


@pytest.mark.parametrize("storage", ["exact", "lowrank"])
def test_solve_with_soap(storage):
    soap = ps.SOAP(steps=30, lr=3e-3, schedule=Cosine(final=0.1), precondition_every=5)
    result = ps.solve(Decay(), storage=storage, adam=soap, **SMALL)
    loss = result.history["loss"]
    assert loss[-1] < 0.5 * loss[0]
    assert result.config["adam"]["optimizer"] == "soap" and result.config["adam"]["precondition_every"] == 5
    with pytest.raises(ValueError, match="precondition_every=0"):
        ps.SOAP(precondition_every=0)


def test_options_travel_through_the_run_file(tmp_path):
    from pinnsketch.cli import solve_options_from_config

    result = ps.solve(Decay(), adam=ps.SOAP(steps=3, schedule=ps.WarmupExponential(warmup=1)),
                      balance=ps.GradNormWeights(every=2), causal=ps.Causal(chunks=4), **SMALL)
    ps.save(result, tmp_path / "run.h5")
    config = ps.load(tmp_path / "run.h5").config
    assert config["balance"] == result.config["balance"] and config["causal"] == result.config["causal"]
    options = solve_options_from_config({**config, "storage": "exact"})
    assert options["balance"] == ps.GradNormWeights(every=2) and options["causal"] == ps.Causal(chunks=4)
    assert options["adam"] == ps.SOAP(steps=3, schedule=ps.WarmupExponential(warmup=1))
