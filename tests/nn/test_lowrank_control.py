"""The `lowrank` rank controller on its own: numbers in, rank / bits / fallback out."""

import json

import pytest
import torch

from pinnsketch.nn import MLP, JetSpec
from pinnsketch.nn.lowrank import LowRankStorage
from pinnsketch.nn.lowrank_control import INT8_GAIN, LowRankController


def controller(**kw):
    options = dict(rank=8, bits=4, r_min=2, r_max=64, patience=2, path_gain=16.0, noise_fraction=None)
    options.update(kw)
    c = LowRankController(1e-2, **options)
    c.start(256)
    return c


def step(c, calls=(), audits=(), tails=None):
    """One step: calls [(class, recon, path)], audits [(class, grad_error, recon, amplification)]."""
    for cls, recon, path in calls:
        c.observe_call(cls, recon, path)
    for cls, tail in (tails or {}).items():
        c.observe_tails(cls, tail)
    for cls, grad_error, recon, amp in audits:
        c.observe_audit(cls, grad_error, recon, amp, None)
    c.decide()
    c.step += 1


def test_classes_are_judged_apart():
    """A value-only class whose reconstruction is poor but whose weight-gradient error is small does
    not meet the derivative-path target of the jet class; mixing them would have grown the rank."""
    c = controller()
    calls = [(1, 4e-2, False), (4, 1e-4, True)]
    step(c, calls, audits=[(1, 4e-3, 4e-2, 0.1), (4, 1e-4, 1e-4, 0.5)])
    # class 1: kappa 0.1, ratio 0.1 x 4e-2 / 1e-2 = 0.4; class 4: path target 1e-2 / (16 x 0.5) = 1.25e-3
    assert c.class_ratios() == pytest.approx({1: 0.4, 4: 1e-4 / 1.25e-3})
    assert c.path_target() == pytest.approx(1.25e-3) and c.path_target(1) is None
    assert c.rank == 8 and not c.events


def test_path_error_above_target_doubles_the_rank_when_the_tail_says_it_helps():
    c = controller()
    step(c, [(4, 5e-3, True)], audits=[(4, 1e-3, 5e-3, 0.5)], tails={4: {"up": 0.1, "down": 3.0}})
    assert c.rank == 16 and c.events[-1]["event"] == "grow"
    assert c.events[-1]["old_rank"] == 8 and c.events[-1]["new_rank"] == 16


def test_int8_when_a_larger_rank_would_not_reduce_the_error():
    c = controller()
    step(c, [(4, 5e-3, True)], audits=[(4, 1e-3, 5e-3, 0.5)], tails={4: {"up": 1.0, "down": 1.0}})
    assert c.bits == 8 and c.rank == 8 and c.events[-1]["event"] == "bits_up"
    assert c.recon[4] == pytest.approx(5e-3 / INT8_GAIN)


def test_saturated_controller_falls_back_to_exact_after_patience_then_resumes():
    c = controller(rank=64, bits=8)
    for _ in range(2):
        step(c, [(1, 1.0, False)], audits=[(1, 1.0, 1.0, 0.1)])
    assert c.exact and c.events[-1]["event"] == "fallback_exact"
    step(c, [(1, 1e-4, False)], audits=[(1, 1e-4, 1e-4, 0.1)])
    assert not c.exact and c.events[-1]["event"] == "resume_compression"


def test_calm_controller_shrinks_after_patience_only_when_predicted_safe():
    c = controller()
    for _ in range(2):
        step(c, [(1, 1e-4, False)], audits=[(1, 1e-4, 1e-4, 0.1)], tails={1: {"up": 0.5, "down": 2.0}})
    assert c.rank == 4 and c.events[-1]["event"] == "shrink"
    c = controller()
    for _ in range(2):                      # halving the rank would multiply the error by 1e3: unsafe
        step(c, [(1, 1e-3, False)], audits=[(1, 1e-3, 1e-3, 0.1)], tails={1: {"up": 0.5, "down": 1e3}})
    assert c.rank == 8 and not c.events


def test_first_measurement_of_a_step_replaces_the_last_steps():
    c = controller()
    c.observe_call(1, 3e-3, False)
    c.observe_call(1, 1e-3, False)
    assert c.recon[1] == 3e-3               # the worst call of the step
    c.end_step()
    c.observe_call(1, 1e-3, False)
    assert c.recon[1] == 1e-3


def test_state_dict_is_plain_json_and_round_trips():
    c = controller()
    step(c, [(1, 4e-2, False), (4, 5e-3, True)], audits=[(1, 4e-3, 4e-2, 0.1), (4, 1e-3, 5e-3, 0.5)],
         tails={4: {"up": 0.1}})
    state = json.loads(json.dumps(c.state_dict()))
    other = controller()
    other.load_state_dict(state)
    assert other.state_dict() == c.state_dict()
    assert other.class_ratios() == c.class_ratios() and other.rank == c.rank


def test_equal_shaped_calls_of_one_evaluation_get_their_own_bases():
    """Two value-only calls with equal point counts on different lines of the plane (a PINN's
    boundary and initial points): each call's basis is its own, so both reconstruct as well as
    one call alone; an L-BFGS-style second evaluation in the same step reuses them."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(256, 1, generator=g, dtype=torch.float64)
    boundary = torch.cat([torch.ones_like(t), t], 1)
    initial = torch.cat([2 * t - 1, torch.zeros_like(t)], 1)
    model = MLP(2, 1, width=32, depth=3, dtype=torch.float64, seed=1,
                storage=LowRankStorage(rank=2, adaptive=False, residual=None, value_residual=None))
    for _ in range(2):                       # two evaluations, one step
        (model(boundary).square().sum() + model(initial).square().sum()).backward()
        assert sorted(k[3] for k in model.storages[2]._bases) == [0, 1]
    model.storages[2]._resolve_pending()
    alone = []
    for points in (boundary, initial):
        single = MLP(2, 1, width=32, depth=3, dtype=torch.float64, seed=1,
                     storage=LowRankStorage(rank=2, adaptive=False, residual=None, value_residual=None))
        single(points).square().sum().backward()
        single.storages[2]._resolve_pending()
        alone.append(single.storages[2].recon_error)
    assert model.storages[2].recon_error == pytest.approx(max(alone), rel=1e-6)


def test_jet_call_is_on_the_path_and_value_call_is_not():
    model = MLP(2, 1, width=16, depth=3, dtype=torch.float64, seed=2, storage=LowRankStorage(audit_every=1))
    x = torch.rand(300, 2, dtype=torch.float64)
    spec = JetSpec.from_names(["x", "xx"], ("x", "t"))
    for _ in range(4):
        loss = model.jet(x, spec).d(spec.indices[-1]).square().sum() + model(x).square().sum()
        loss.backward()
        model.advance()
    control = model.storages[1].control
    assert control.path == {3} and set(control.recon) == {1, 3}


def test_byte_cap_filters_changes_and_replaces_fallback():
    """With max_ratio, no change may cross the cap; a saturated block stays compressed and says so once."""
    cost = lambda rank, bits: rank / 64 + (0.25 if bits == 8 else 0.125)      # noqa: E731
    c = controller(rank=8, max_ratio=0.3, cost=cost)
    for _ in range(4):
        step(c, [(1, 1.0, False)], audits=[(1, 1.0, 1.0, 0.1)], tails={1: {"up": 0.5}})
    # 8 -> 16 costs 0.375 > 0.3 and int8 at rank 8 costs 0.375: nothing fits
    assert c.rank == 8 and c.bits == 4 and not c.exact
    assert [e["event"] for e in c.events] == ["at_cap"]
    c = controller(rank=4, max_ratio=0.3, cost=cost)
    step(c, [(1, 1.0, False)], audits=[(1, 1.0, 1.0, 0.1)], tails={1: {"up": 0.5}})
    assert c.rank == 8                       # 0.25 fits


def test_capped_policy_never_stores_more_than_its_cap():
    from pinnsketch.nn import MemoryMeter

    x = torch.rand(400, 2, dtype=torch.float64)
    spec = JetSpec.from_names(["x", "xx"], ("x", "t"))
    capped = MLP(2, 1, width=32, depth=3, dtype=torch.float64, seed=3,
                 storage=LowRankStorage(target=1e-12, initial_rank=16, r_max=32, max_ratio=0.5))
    exact = MLP(2, 1, width=32, depth=3, dtype=torch.float64, seed=3)

    def saved(model):
        with MemoryMeter() as meter:
            model.jet(x, spec).d(spec.indices[-1]).square().sum().backward()
        model.advance()
        return meter.peak_bytes

    reference = saved(exact)
    peaks = [saved(capped) for _ in range(10)]
    hidden = capped.storages[1:]
    assert not any(s.exact for s in hidden)
    # the first hidden block's input is affine in x (rank 3): it meets any target; the others hit the cap
    assert all(any(e["event"] == "at_cap" for e in s.events) for s in hidden[1:])
    assert all(s._cost(s.rank, s.bits) <= 0.5 for s in hidden)
    assert max(peaks) < 0.6 * reference     # the narrow input block (exact) adds a little
    with pytest.raises(ValueError, match="max_ratio=1.5"):
        LowRankStorage(max_ratio=1.5)


def test_agree_takes_the_worst_figures_of_all_processes():
    """Multi-process agreement: a reduce that sees another process's figures (its max, min for noise)."""
    mine = controller()
    step_figures = [(1, 2e-4, False), (4, 1e-3, True)]
    for cls, recon, path in step_figures:
        mine.observe_call(cls, recon, path)
    mine.observe_audit(4, 1e-4, 1e-3, 0.5, 0.2)
    other = {1: (5e-4, None, None), 4: (2e-3, 0.3, 0.4)}     # the other process: recon, kappa, amplification

    def reduce(values, lowest=()):
        if len(values) == 1:
            return [max(values[0], 4.0)]
        out = list(values)
        for i, c in enumerate(range(1, 5)):
            for j, theirs in enumerate(other.get(c, (None, None, None))):
                v = out[6 * i + j]
                out[6 * i + j] = theirs if v is None else (v if theirs is None else max(v, theirs))
        out[-1] = min(out[-1], 0.1)
        return out

    mine.agree(reduce)
    assert mine.recon == {1: 5e-4, 4: 2e-3}
    assert mine.kappa[4] == pytest.approx(0.3) and mine.amplification[4] == 0.5 and mine.noise == 0.1
    assert mine.path == {4}
    single = controller()                  # one process: agree(nn.collective.agree) changes nothing
    for cls, recon, path in step_figures:
        single.observe_call(cls, recon, path)
    before = single.state_dict()
    from pinnsketch.nn.collective import agree

    single.agree(agree)
    assert single.state_dict() == before
