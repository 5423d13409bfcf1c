"""Helpers of the io tests: a tiny PDE problem, solver options and a hand-written training loop."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from pinnsketch.training import TrainingState

def _fixture_module():
    # The fixture script defines the small problem; load it by path (tests/ is not a package).
    path = Path(__file__).parents[1] / "fixtures" / "make_fixture.py"
    spec = importlib.util.spec_from_file_location("pinnsketch_tests_make_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

make_fixture = _fixture_module()
Parabola1D = make_fixture.Parabola1D
FIXTURE = make_fixture.FIXTURE
OLD_FIXTURES = make_fixture.OLD_FIXTURES
solve_options = make_fixture.solve_options
make_monitor = make_fixture.make_monitor
write_fixture = make_fixture.write_fixture

def train_loop(callbacks, *, steps: int = 30, seed: int = 0, start: dict | None = None, sleep: float = 0.0):
    """Fit a 3-16-2 MLP to a fixed regression target with Adam; callbacks see the solver's TrainingState."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(64, 3, generator=gen)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = TrainingState(problem=None, model=model, optimizer=opt, phase="fit",
                          config={"seed": seed, "problem": "regression"})
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        state.step = start["step"]
    t0 = time.perf_counter()
    for cb in callbacks:
        cb.on_start(state)
    while state.step < steps:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        state.step += 1
        state.loss = float(loss.detach())
        state.losses = {"mse": state.loss}
        state.lr = 1e-2
        state.wall_time_s = time.perf_counter() - t0
        state.saved_bytes_peak = 1000 + state.step
        state.l2_relative_error = 0.5 / state.step if state.step % 10 == 0 else None
        state.storage_report = [{"layer": 0, "storage": "exact", "rank": None, "error_estimate": None},
                                {"layer": 1, "storage": "lowrank", "rank": 2 + state.step // 10,
                                 "error_estimate": 1.0 / state.step}]
        for cb in callbacks:
            cb.on_step(state)
        if sleep:
            time.sleep(sleep)
    for cb in callbacks:
        cb.on_end(state, None)
    return model, state
