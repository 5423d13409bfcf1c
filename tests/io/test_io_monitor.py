"""The gradient monitor's state in /gradients: round trip with and without a step sketch, resume, and
files written before the step sketch existed."""

import json

import h5py
import numpy as np
import pytest
import torch

from io_helpers import FIXTURE, train_loop
from pinnsketch.io import RunWriter, load, load_checkpoint
from pinnsketch.monitor import GradientMonitor

# Layers of train_loop's 3-16-2 MLP: "0" (64 parameters) and "2" (34): with m = 40 the first is
# sketched, the second kept exactly. Three windows of 16 steps over 40 steps.
OPTIONS = dict(rank=2, window=16, method="isvd", step_sketch=40, error_size=0, seed=2)


def _same_monitor(a: GradientMonitor, b: GradientMonitor) -> None:
    assert a.config == b.config and a.layers == b.layers and a.steps.tolist() == b.steps.tolist()
    assert a.nbytes == b.nbytes
    torch.testing.assert_close(a.norms(), b.norms(), rtol=0, atol=0)
    for layer in a.layers:
        torch.testing.assert_close(a.step_sketch(layer), b.step_sketch(layer), rtol=0, atol=0)
        torch.testing.assert_close(a.gradients(layer).value, b.gradients(layer).value)
        torch.testing.assert_close(a.gradients(layer).error, b.gradients(layer).error)
        torch.testing.assert_close(a.cosines(layer).value, b.cosines(layer).value, equal_nan=True)


def test_step_sketch_round_trips_through_the_run_file(tmp_path):
    path = tmp_path / "run.h5"
    monitor = GradientMonitor(**OPTIONS)
    train_loop([RunWriter(path, checkpoint_every=8, monitor=monitor)], steps=40)
    run = load(path)
    with h5py.File(path, "r") as f:
        layer = f["gradients/sketches/window_00002/0"]
        assert set(layer) == {"V", "S", "U", "W", "filled", "count", "step_sketch"}
        assert layer["step_sketch"].shape == (16, 40)
        assert f["gradients/sketches/window_00000/2/step_sketch"].shape == (16, 34)
    back = run.monitor()
    _same_monitor(back, monitor)
    assert back.config["step_sketch"] == 40
    assert run.gradient_memory["monitor_bytes"] == monitor.nbytes
    # Layer "2" (34 <= 40 parameters) is kept exactly: its sketched norms are the exact ones.
    torch.testing.assert_close(back.sketched_norms("2").value, back.norms("2"), rtol=1e-5, atol=0)


def test_resumed_run_has_the_step_sketch_of_the_uninterrupted_one(tmp_path):
    full = GradientMonitor(**OPTIONS)
    train_loop([RunWriter(tmp_path / "full.h5", checkpoint_every=8, monitor=full)], steps=40)

    class Stop:
        def on_start(self, state):
            pass

        def on_step(self, state):
            if state.step == 21:
                raise KeyboardInterrupt

        def on_end(self, state, result):
            pass

    path = tmp_path / "part.h5"
    with pytest.raises(KeyboardInterrupt):
        train_loop([RunWriter(path, checkpoint_every=8, monitor=GradientMonitor(**OPTIONS)), Stop()], steps=40)
    writer, start = RunWriter.resume(path, checkpoint_every=8)       # monitor rebuilt from the file's config
    assert start["step"] == 16 and writer.monitor.config["step_sketch"] == 40
    train_loop([writer], steps=40, start=start)
    _same_monitor(load(path).monitor(), load(tmp_path / "full.h5").monitor())
    _same_monitor(load(path).monitor(), full)


def test_files_without_a_step_sketch_still_load(tmp_path):
    # The frozen schema-1 fixture was written before the step sketch existed.
    monitor = load(FIXTURE).monitor()
    assert monitor.config["step_sketch"] == 0 and monitor.memory_report()["step_sketch_bytes"] == 0
    assert monitor.estimated_norms(0).value.shape == (27,)
    assert torch.isfinite(monitor.cosines(0).value).all()                  # from the reconstruction
    with pytest.raises(ValueError, match="no step sketch"):
        monitor.step_sketch(0)
    # A file whose monitor configuration predates the newer options entirely (no key at all).
    path = tmp_path / "old.h5"
    train_loop([RunWriter(path, checkpoint_every=5, monitor=GradientMonitor(rank=2, window=10))], steps=10)
    with h5py.File(path, "r+") as f:
        config = json.loads(f["gradients"].attrs["config"])
        for key in ("method", "k", "s", "step_sketch", "step_operator"):
            del config[key]
        f["gradients"].attrs["config"] = json.dumps(config)
    back = load(path).monitor()
    assert back.config["step_sketch"] == 0 and back.config["method"] == "three_sketch"
    writer, start = RunWriter.resume(path)
    assert writer.monitor.config == back.config and start["step"] == 10
    np.testing.assert_array_equal(back.steps.numpy(), np.arange(1, 11))
    assert load_checkpoint(path)["step"] == 10
