"""Atomic writes: a writer killed with SIGKILL at any moment leaves a readable file at its last checkpoint."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from io_helpers import train_loop
from pinnsketch.io import RunFileError, RunWriter, load, load_checkpoint
from pinnsketch.monitor import GradientMonitor

HERE = Path(__file__).parent

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    from io_helpers import train_loop
    from pinnsketch.io import RunWriter, load_checkpoint
    from pinnsketch.monitor import GradientMonitor
    path, mode = {path!r}, {mode!r}
    start = load_checkpoint(path) if mode == "a" else None
    writer = RunWriter(path, mode=mode, checkpoint_every=1, monitor=GradientMonitor(rank=2, window=64))
    train_loop([writer], steps=100_000, start=start)
""")


def _run_and_kill(path: Path, mode: str, min_step: int) -> int:
    """Start a writer in a subprocess, SIGKILL it once the committed file on disk has a checkpoint
    at or past ``min_step``; returns the writer's exit status.

    Robust under load: the kill waits for that checkpoint to be on disk (however slowly the writer
    starts or trains; only a writer stuck for 10 minutes fails the test) and the file is read back
    only after the writer is dead.
    """
    log = path.with_name(f"stderr-{mode}.txt")
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(here=str(HERE), path=str(path), mode=mode)],
                                stderr=err)
    try:
        deadline = time.monotonic() + 600          # generous: only a hung writer reaches it
        while True:
            assert proc.poll() is None, f"the writer exited early:\n{log.read_text()}"
            try:
                if path.exists() and (load(path).checkpoint_step or 0) >= min_step:
                    break
            except RunFileError as err:          # the committed file must never be unreadable
                pytest.fail(f"committed file unreadable during the run: {err}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint at step >= {min_step} within 10 minutes:\n{log.read_text()}")
            time.sleep(0.05)
        time.sleep(0.013 * (min_step % 7))       # land at varying points of the commit cycle
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    return proc.returncode


def _check_consistent(path: Path) -> int:
    run = load(path)
    step = run.checkpoint_step
    assert step is not None and not run.completed
    assert run.training["step"].tolist() == list(range(1, step + 1))
    assert run.gradient_steps.tolist() == list(range(1, step + 1))
    assert load_checkpoint(path)["step"] == step == run.steps
    return step


def test_sigkill_leaves_last_checkpoint_then_resume(tmp_path):
    path = tmp_path / "killed.h5"
    assert _run_and_kill(path, "w", min_step=8) == -signal.SIGKILL
    first = _check_consistent(path)
    assert first >= 8
    assert _run_and_kill(path, "a", min_step=first + 5) == -signal.SIGKILL
    second = _check_consistent(path)
    assert second >= first + 5
    # Finish in-process: the file then holds the whole run (and the writer removes any commit
    # temporary a killed writer left behind).
    start = load_checkpoint(path)
    train_loop([RunWriter(path, mode="a", checkpoint_every=5, monitor=GradientMonitor(rank=2, window=64))],
               steps=second + 5, start=start)
    run = load(path)
    assert run.completed and run.training["step"].tolist() == list(range(1, second + 6))
    assert not np.isnan(run.training["loss"]).any()
    assert not list(tmp_path.glob("*.tmp"))                      # no temporary files left in a clean finish


def test_writer_killed_mid_commit_leaves_a_temporary_that_the_next_writer_removes(tmp_path):
    path = tmp_path / "run.h5"
    train_loop([RunWriter(path, checkpoint_every=5)], steps=10)
    # What a writer killed between creating its commit temporary and renaming it leaves: a partial copy.
    stale = tmp_path / ".run.h5.k1ll3d.tmp"
    stale.write_bytes(path.read_bytes()[:1000])
    other = tmp_path / ".other.h5.abc.tmp"                 # another run's temporary: not touched
    other.write_bytes(b"x")
    assert load(path).checkpoint_step == 10
    train_loop([RunWriter(path, mode="a", checkpoint_every=5)], steps=15, start=load_checkpoint(path))
    assert not stale.exists() and other.exists()
    assert load(path).completed and load(path).steps == 15


def test_interrupted_in_process_writer_keeps_committed_file(tmp_path):
    path = tmp_path / "stopped.h5"

    class Stop:
        def on_start(self, state):
            pass

        def on_step(self, state):
            if state.step == 9:
                raise RuntimeError("boom")

        def on_end(self, state, result):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        train_loop([RunWriter(path, checkpoint_every=4), Stop()], steps=20)
    run = load(path)
    assert run.checkpoint_step == 8 and run.training["step"].tolist() == list(range(1, 9))
    assert path.with_name(path.name + ".partial").exists()         # the live file of the dead run
