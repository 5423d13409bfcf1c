"""Resume: a run interrupted after a checkpoint and continued from the file ends where the
uninterrupted run ends (CPU, fixed seed), with the same file contents."""

import numpy as np
import pytest
import torch

from io_helpers import Parabola1D, make_monitor, solve_options, train_loop
from pinnsketch import pinn as ps
from pinnsketch.io import RunFileError, RunWriter, load, load_checkpoint


class Interrupt(ps.Callback):
    """Raise KeyboardInterrupt after step `at` (like Ctrl-C)."""

    def __init__(self, at):
        self.at = at

    def on_step(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


# checkpoint_every=5: Adam checkpoints at 5, 10, 15, 20; the L-BFGS step 24 -> 26 crosses 25.
@pytest.mark.parametrize("stop, checkpoint", [(17, 15), (28, 26)], ids=["during-adam", "during-lbfgs"])
def test_resumed_solve_equals_uninterrupted(recorded_run, tmp_path, stop, checkpoint):
    full_path, full, full_monitor = recorded_run
    path = tmp_path / "part.h5"
    writer = RunWriter(path, checkpoint_every=5, monitor=make_monitor())
    with pytest.raises(KeyboardInterrupt):
        ps.solve(Parabola1D(), **solve_options(), callbacks=[writer, Interrupt(stop)])
    # (no writer.close(): an abandoned writer must not block the resumed one)
    interrupted = load(path)
    assert not interrupted.completed and interrupted.checkpoint_step == checkpoint
    # the file holds the last checkpoint, and the history up to the interruption with its cause
    assert interrupted.training["step"][-1] == stop and interrupted.attrs["stop_step"] == stop
    assert interrupted.attrs["status"] == "interrupted" and interrupted.attrs["stop_cause"] == "KeyboardInterrupt"
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*"))

    if stop == 17:   # explicit: the checkpoint state and a writer in mode "a" with a fresh monitor
        monitor = make_monitor()
        state, writer = load_checkpoint(path), RunWriter(path, mode="a", checkpoint_every=5, monitor=monitor)
    else:            # RunWriter.resume rebuilds the monitor from the options stored in the file
        writer, state = RunWriter.resume(path, checkpoint_every=5)
        monitor = writer.monitor
        assert monitor.config == make_monitor().config
    resumed = ps.solve(Parabola1D(), **solve_options(), resume=state, callbacks=[writer])

    for key, value in full.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.model.state_dict()[key], value), key
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.l2_relative_error == full.l2_relative_error
    a, b = load(path), load(full_path)
    assert a.completed and a.steps == b.steps == 30
    for column in ("step", "phase", "loss", "lr", "l2_relative_error", "losses/pde"):
        np.testing.assert_array_equal(a.training[column], b.training[column], err_msg=column)
    np.testing.assert_array_equal(a.sketch["step"], b.sketch["step"])
    np.testing.assert_array_equal(a.gradient_steps, b.gradient_steps)
    for name, norms in b.gradient_norms.items():
        np.testing.assert_array_equal(a.gradient_norms[name], norms)
    for layer in full_monitor.layers:       # the sketches continued as if never interrupted
        np.testing.assert_array_equal(monitor.gradients(layer).value, full_monitor.gradients(layer).value)
    np.testing.assert_array_equal(a.solution.prediction, b.solution.prediction)


def test_resume_checks(tmp_path):
    path = tmp_path / "loop.h5"
    train_loop([RunWriter(path, checkpoint_every=4)], steps=10)
    with pytest.raises(ValueError, match="checkpoint at step 10 but training resumes at step 0"):
        train_loop([RunWriter(path, mode="a")], steps=12)
    fresh = tmp_path / "fresh.h5"

    class Stop:
        def on_start(self, state):
            raise KeyboardInterrupt

        def on_step(self, state):
            pass

        def on_end(self, state, result):
            pass

    writer = RunWriter(fresh)
    with pytest.raises(KeyboardInterrupt):
        train_loop([writer, Stop()], steps=3)
    writer.close()
    with pytest.raises(RunFileError, match="no checkpoint"):
        load_checkpoint(fresh)


def test_resumed_custom_loop_equals_uninterrupted(tmp_path):
    full_model, _ = train_loop([RunWriter(tmp_path / "full.h5", checkpoint_every=4)], steps=20)

    class Stop:
        def on_start(self, state):
            pass

        def on_step(self, state):
            if state.step == 10:
                raise KeyboardInterrupt

        def on_end(self, state, result):
            pass

    path = tmp_path / "part.h5"
    with pytest.raises(KeyboardInterrupt):
        train_loop([RunWriter(path, checkpoint_every=4), Stop()], steps=20)
    start = load_checkpoint(path)
    assert start["step"] == 8
    model, _ = train_loop([RunWriter(path, mode="a", checkpoint_every=4)], steps=20, start=start)
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(load(path).training["loss"], load(tmp_path / "full.h5").training["loss"])


def test_command_line_run_file_options(tmp_path):
    import argparse

    from pinnsketch.io.commands import add_run_file_arguments, run_file_callbacks

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    add_run_file_arguments(parser)
    path = tmp_path / "cli.h5"

    class Stop:
        def on_start(self, state):
            pass

        def on_step(self, state):
            if state.step == 13:
                raise KeyboardInterrupt

        def on_end(self, state, result):
            pass

    callbacks, state = run_file_callbacks(
        parser.parse_args(["--out", str(path), "--checkpoint-every", "4", "--monitor-rank", "2",
                           "--monitor-step-sketch", "16"]), total_steps=20)
    assert state is None and callbacks[0].monitor.config["window"] == 20
    assert callbacks[0].monitor.config["step_sketch"] == 16
    with pytest.raises(KeyboardInterrupt):
        train_loop([*callbacks, Stop()], steps=20)
    callbacks, state = run_file_callbacks(parser.parse_args(["--resume", str(path)]), total_steps=20)
    assert state["step"] == 12 and callbacks[0].mode == "a" and callbacks[0].monitor.config["rank"] == 2
    assert callbacks[0].monitor.config["step_sketch"] == 16
    train_loop(callbacks, steps=20, start=state)
    run = load(path)
    assert run.completed and run.gradient_steps.tolist() == list(range(1, 21))
    assert run.monitor().step_sketch(0).shape == (20, 16)
    with pytest.raises(ValueError, match="--out FILE"):
        run_file_callbacks(parser.parse_args(["--monitor-rank", "2"]), total_steps=5)
    with pytest.raises(ValueError, match="leave out --out"):
        run_file_callbacks(parser.parse_args(["--resume", str(path), "--out", "other.h5"]), total_steps=5)
    assert run_file_callbacks(parser.parse_args([]), total_steps=5) == ([], None)
