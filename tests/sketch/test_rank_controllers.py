"""Rank controllers: growth, hysteresis, bounds, budget, history, validation."""

import math

import pytest

from pinnsketch.sketch import AbstractRankController, AdaptiveRank, FixedRank


def test_fixed_rank():
    ctl = FixedRank(4)
    assert isinstance(ctl, AbstractRankController)
    assert [ctl.propose(e, step) for step, e in enumerate([10.0, 0.0, 1e-9, math.inf])] == [4] * 4
    assert ctl.rank == 4 and ctl.history == [] and not ctl.saturated
    with pytest.raises(ValueError, match=r"rank=0 must be >= 1"):
        FixedRank(0)
    with pytest.raises(ValueError, match=r"error=nan must be finite"):
        ctl.propose(math.nan, 0)


def test_grows_multiplicatively_above_target():
    ctl = AdaptiveRank(0.1, rank=2)
    assert ctl.propose(0.5, step=0) == 4
    assert ctl.propose(0.2, step=1) == 8
    assert ctl.propose(0.1, step=2) == 8             # at target: hold
    assert ctl.history == [
        {"step": 0, "error": 0.5, "old_rank": 2, "new_rank": 4, "reason": "grow"},
        {"step": 1, "error": 0.2, "old_rank": 4, "new_rank": 8, "reason": "grow"},
    ]
    slow = AdaptiveRank(0.1, rank=3, grow=1.1)       # ceil(3.3) = 4: always at least +1
    assert slow.propose(1.0, step=0) == 4


def test_shrinks_only_after_patience_with_hysteresis():
    ctl = AdaptiveRank(0.1, rank=16, shrink_below=0.25, shrink_factor=0.5, patience=3)
    # Below target but above shrink_below * target: hold forever.
    assert [ctl.propose(0.05, step) for step in range(10)] == [16] * 10
    # Far below target twice, then an interruption: the count restarts.
    assert [ctl.propose(0.01, s) for s in (10, 11)] == [16, 16]
    assert ctl.propose(0.05, 12) == 16
    assert [ctl.propose(0.01, s) for s in (13, 14, 15)] == [16, 16, 8]
    assert ctl.history[-1] == {"step": 15, "error": 0.01, "old_rank": 16, "new_rank": 8, "reason": "shrink"}
    assert [ctl.propose(0.0, s) for s in range(16, 22)] == [8, 8, 4, 4, 4, 2]


def test_respects_r_min_and_r_max_and_reports_saturation():
    ctl = AdaptiveRank(0.1, rank=3, r_min=2, r_max=10, patience=1)
    assert ctl.propose(1.0, 0) == 6
    assert ctl.propose(1.0, 1) == 10                 # capped at r_max
    assert ctl.history[-1]["reason"] == "grow (at_r_max)"
    assert not ctl.saturated
    assert ctl.propose(1.0, 2) == 10 and ctl.saturated
    assert ctl.propose(1.0, 3) == 10 and ctl.saturated
    # Saturation is logged once, at its onset.
    assert [h["reason"] for h in ctl.history] == ["grow", "grow (at_r_max)", "at_r_max"]
    assert ctl.propose(0.05, 4) == 10 and not ctl.saturated
    assert [ctl.propose(0.0, s) for s in range(5, 10)] == [5, 2, 2, 2, 2]   # floors at r_min


def test_respects_memory_budget():
    cost = lambda r: 1000 * r                            # noqa: E731
    ctl = AdaptiveRank(0.1, rank=2, budget_bytes=5500, bytes_per_rank=cost)
    assert ctl.propose(1.0, 0) == 4
    assert ctl.propose(1.0, 1) == 5                      # 8 would cost 8000 > 5500
    assert ctl.history[-1]["reason"] == "grow (at_budget)"
    assert ctl.propose(1.0, 2) == 5 and ctl.saturated
    assert ctl.history[-1]["reason"] == "at_budget"


def test_history_entries_have_all_keys():
    ctl = AdaptiveRank(1.0, rank=1)
    ctl.propose(2.0, step=7)
    ctl.set_rank(1, step=8, reason="fallback")
    assert all(set(h) == {"step", "error", "old_rank", "new_rank", "reason"} for h in ctl.history)
    assert ctl.history[-1]["reason"] == "fallback" and ctl.rank == 1
    with pytest.raises(ValueError, match=r"rank=0 must be >= 1"):
        ctl.set_rank(0, step=9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target=0.0), r"target=0.0 must be > 0"),
    (dict(target=-1.0), r"target=-1.0 must be > 0"),
    (dict(target=math.inf), r"target=inf must be finite"),
    (dict(target=0.1, r_min=0), r"r_min=0 must be >= 1"),
    (dict(target=0.1, r_min=5, r_max=3), r"r_max=3 must be >= 5"),
    (dict(target=0.1, rank=20, r_max=10), r"rank=20 must be <= 10"),
    (dict(target=0.1, rank=1, r_min=2), r"rank=1 must be >= 2"),
    (dict(target=0.1, grow=1.0), r"grow=1.0 must be > 1"),
    (dict(target=0.1, shrink_below=1.5), r"shrink_below=1.5 must lie strictly between 0 and 1"),
    (dict(target=0.1, shrink_factor=0.0), r"shrink_factor=0.0 must lie strictly between 0 and 1"),
    (dict(target=0.1, patience=0), r"patience=0 must be >= 1"),
    (dict(target=0.1, budget_bytes=100), r"budget_bytes=100 needs bytes_per_rank"),
    (dict(target=0.1, budget_bytes=100, bytes_per_rank=lambda r: 200 * r), r"budget_bytes=100 is below"),
    (dict(target=0.1, rank=3, budget_bytes=500, bytes_per_rank=lambda r: 200 * r), r"rank=3 costs 600 bytes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveRank(**kwargs)


def test_bad_propose_arguments():
    ctl = AdaptiveRank(0.1)
    with pytest.raises(ValueError, match=r"error=-0.5 must be >= 0"):
        ctl.propose(-0.5, 0)
    with pytest.raises(ValueError, match=r"step=-1 must be >= 0"):
        ctl.propose(0.5, -1)
    with pytest.raises(TypeError, match=r"bytes_per_rank must be a callable"):
        AdaptiveRank(0.1, bytes_per_rank=3)
    with pytest.raises(TypeError, match=r"rank must be an integer, got 2.5"):
        AdaptiveRank(0.1, rank=2.5)
    # An infinite error (e.g. a relative estimate of a zero matrix) is a valid reason to grow.
    assert ctl.propose(math.inf, 0) == 2


def test_state_dict_resumes_exactly():
    errors = [0.5, 0.01, 0.01, 0.3, 0.01, 0.01, 0.01, 0.01, 2.0]
    ref = AdaptiveRank(0.1, rank=2, patience=3)
    ranks = [ref.propose(e, s) for s, e in enumerate(errors)]
    first = AdaptiveRank(0.1, rank=2, patience=3)
    for s, e in enumerate(errors[:5]):
        first.propose(e, s)
    resumed = AdaptiveRank(0.1, rank=2, patience=3)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.propose(e, s) for s, e in enumerate(errors[5:], start=5)] == ranks[5:]
    assert resumed.history == ref.history
    fixed = FixedRank(3)
    fixed.load_state_dict(fixed.state_dict())
    with pytest.raises(ValueError, match=r"saved rank=4 differs from FixedRank\(3\)"):
        fixed.load_state_dict({"rank": 4})
