"""`pinnsketch.training.train_step`: one advance() per step, the finiteness check before the update,
metering on request; the classifier trainer steps through it (the solver's side is in
tests/pinn/test_solver.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pinnsketch.data import load_digits
from pinnsketch.data.classify import train_classifier
from pinnsketch.training import TrainingDivergedError, crossed, train_step


class Counting(torch.nn.Module):
    """A linear model that logs `advance()` and forward calls in order."""

    def __init__(self, n_in: int = 3, n_out: int = 2):
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out, dtype=torch.float64)
        self.events: list[str] = []

    def advance(self):
        self.events.append("advance")

    def forward(self, x):
        self.events.append("forward")
        return self.lin(x)


def _least_squares(model, x, y):
    def loss_fn():
        r = model(x) - y
        terms = (r ** 2).mean(dim=0)          # (n_out,)
        return terms.sum(), terms
    return loss_fn


def test_a_step_advances_once_before_the_forward_and_updates():
    torch.manual_seed(0)
    model, x, y = Counting(), torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    before = model.lin.weight.detach().clone()
    record = train_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), _least_squares(model, x, y))
    assert model.events == ["advance", "forward"]
    assert not torch.equal(before, model.lin.weight)
    assert len(record.values) == 3 and record.values[0] == pytest.approx(sum(record.values[1:]))
    assert record.seconds > 0 and record.meter is None


def test_lbfgs_evaluates_several_times_under_one_advance():
    torch.manual_seed(0)
    model, x, y = Counting(), torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with torch.no_grad():
        initial = _least_squares(model, x, y)()[0].item()
    model.events.clear()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4, line_search_fn="strong_wolfe")
    record = train_step(model, opt, _least_squares(model, x, y))
    assert model.events[0] == "advance" and model.events.count("advance") == 1
    assert model.events.count("forward") > 1
    assert record.values[0] == initial                     # the first evaluation's values
    assert _least_squares(model, x, y)()[0].item() < initial


def test_a_non_finite_term_stops_before_the_update_and_names_the_term():
    model, x = Counting(), torch.randn(4, 3, dtype=torch.float64)
    before = model.lin.weight.detach().clone()

    def loss_fn():
        out = model(x)
        terms = torch.stack([out.pow(2).mean(), out.mean() * math.inf])
        return terms.sum(), terms

    with pytest.raises(TrainingDivergedError, match=r"'bc' became inf at step 3 \(adam\).*non-finite terms: \['bc'\]"
                                                    r".*Lower it\."):
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, names=["loss", "pde", "bc"],
                   where="step 3 (adam)", hint="Lower it.")
    assert torch.equal(before, model.lin.weight) and model.lin.weight.grad is None


def test_check_off_reads_nothing_back_and_metering_is_on_request():
    model, x, y = Counting(), torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = train_step(model, opt, _least_squares(model, x, y), check=False, meter=True, step_peak=False)
    assert record.values is None and record.loss.ndim == 0
    assert record.meter.peak_bytes > 0 and record.meter.step_peak_bytes is None


def test_a_metered_lbfgs_step_meters_its_first_evaluation_only():
    # Profiling every evaluation of an L-BFGS step (up to max_iter x (1 + max_line_search)) took
    # gigabytes on the CPU; the first evaluation has the activations of them all.
    torch.manual_seed(0)
    model, x, y = Counting(), torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    base = _least_squares(model, x, y)
    calls = []

    def loss_fn():
        calls.append(1)
        loss, terms = base()
        if len(calls) > 1:          # 8 MiB alive during every later evaluation's backward
            big = torch.ones(1 << 20, dtype=torch.float64, requires_grad=True)
            loss = loss + 0.0 * big.sum()
        return loss, terms

    opt = torch.optim.LBFGS(model.parameters(), max_iter=4, line_search_fn="strong_wolfe")
    record = train_step(model, opt, loss_fn, meter=True)
    assert len(calls) > 1
    assert 0 < record.meter.peak_bytes < 1 << 20                     # saved tensors of the first evaluation
    assert record.meter.step_peak_bytes is not None and record.meter.step_peak_bytes < 1 << 22


def test_crossed():
    assert crossed(7, 8, 4) and crossed(5, 9, 4) and not crossed(8, 11, 4) and not crossed(3, 3, 4)


def test_classifier_advances_once_per_step_before_its_forward():
    digits = load_digits()
    model = Counting(digits.num_features, digits.num_classes)
    out = train_classifier(model, digits, epochs=1, batch_size=512, lr=1e-3, progress=False)
    assert out.steps == len(digits.train_labels) // 512
    assert model.events[:2] == ["advance", "forward"]
    assert model.events.count("advance") == out.steps
