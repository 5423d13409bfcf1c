"""`pinnsketch solve` as users run it: checkpoints into --out, SIGKILL and --resume, concurrent writers,
bad --out, divergence, --from reruns, L-BFGS stop reasons, plots of a --monitor-rank run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from io_helpers import Parabola1D, solve_options
from pinnsketch import pinn as ps
from pinnsketch.cli import main
from pinnsketch.io import RunWriter, load, load_checkpoint

# A small CLI run (exact storage, one hidden layer of 8): ~10 ms per step on a loaded 2-core CPU.
TINY = ["--points", "32", "--width", "8", "--depth", "1", "--device", "cpu", "--no-progress", "--eval-every", "10000"]


def _env():
    # One thread, like the test process (conftest): the same thread count gives the same bits.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DDE_BACKEND": "pytorch"}


def _cli(*argv):
    return [sys.executable, "-m", "pinnsketch.cli", *argv]


def _same_run(a, b):
    """Two run files hold the same training to the bit: weights, loss history, final error."""
    ra, rb = load(a), load(b)
    assert ra.completed and rb.completed
    for key, value in rb.model_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ra.model_state[key], value), key
    np.testing.assert_array_equal(ra.training["step"], rb.training["step"])
    np.testing.assert_array_equal(ra.training["loss"], rb.training["loss"])
    assert ra.l2_relative_error == rb.l2_relative_error


def test_sigkill_after_the_first_checkpoint_then_resume_from_the_cli(tmp_path):
    args = ["solve", "heat", *TINY, "--storage", "exact", "--steps", "200", "--lbfgs-steps", "10",
            "--checkpoint-every", "5"]
    killed = tmp_path / "killed.h5"
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(_cli(*args, "--out", str(killed)), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600
        while not (killed.exists() and (load(killed).checkpoint_step or 0) >= 5):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    run = load(killed)                                   # a valid file at its last checkpoint
    assert not run.completed and 5 <= run.checkpoint_step < 210
    assert run.training["step"][-1] == run.checkpoint_step == run.steps

    resumed = subprocess.run(_cli("solve", "--resume", str(killed), "--no-progress"), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[-1] == f"saved to {killed}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5", "stderr.txt"]   # no .partial/.tmp/.lock

    full = tmp_path / "full.h5"                            # uninterrupted, same options
    assert main([*args, "--out", str(full)]) == 0
    _same_run(killed, full)


def test_two_concurrent_writers_one_clear_error_and_the_file_holds_the_successful_run(tmp_path, capsys):
    out = tmp_path / "same.h5"
    first = subprocess.Popen(_cli("solve", "heat", *TINY, "--storage", "exact", "--steps", "300",
                                  "--lbfgs-steps", "0", "--seed", "1", "--out", str(out)),
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not out.exists():                                # its first commit: it holds the lock now
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = main(["solve", "heat", *TINY, "--storage", "exact", "--steps", "5", "--lbfgs-steps", "0",
                   "--seed", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert first.poll() is None, "the first writer ended before the second one tried"
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"pinnsketch: error: {out} is being written by another process")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert stdout.splitlines()[-1] == f"saved to {out}"
    run = load(out)
    assert run.completed and run.seed == 1 and run.steps == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.h5"]


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_bad_out_is_rejected_before_training(tmp_path, capsys, where):
    folder = tmp_path / "runs"
    folder.mkdir()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = folder if where == "directory" else tmp_path / "notes.txt" / "run.h5"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    t0 = time.perf_counter()
    status = main(["solve", "heat", *TINY, "--steps", "100000", "--out", str(out)])   # would train for minutes
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert status == (2 if where == "directory" else 1) and err.count("\n") == 1
    assert ("is a directory; give a file name" if where == "directory" else "cannot create the folder") in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before      # nothing left behind


def test_unwritable_folder_is_rejected_before_training(tmp_path, capsys):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes anywhere; the under-a-file case covers an unwritable place")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert main(["solve", "heat", *TINY, "--steps", "100000", "--out", str(folder / "run.h5")]) == 1
        assert "is not writable" in capsys.readouterr().err and not list(folder.iterdir())
    finally:
        folder.chmod(0o700)


class Diverging(Parabola1D):
    """Parabola1D whose residual becomes NaN from its 14th evaluation on (a blow-up mid-Adam)."""

    def __init__(self):
        self.calls = 0

    def residual(self, x, u):
        self.calls += 1
        r = u.xx + 2.0
        return r * float("nan") if self.calls >= 14 else r


def test_diverging_residual_records_cause_step_phase_and_keeps_the_history(tmp_path):
    path = tmp_path / "diverged.h5"
    with pytest.raises(ps.TrainingDivergedError):
        ps.solve(Diverging(), **solve_options(eval_every=1000), callbacks=[RunWriter(path, checkpoint_every=5)])
    run = load(path)
    assert not run.completed and run.attrs["status"] == "diverged"
    step = run.attrs["stop_step"]                      # steps completed before the NaN step
    assert 10 < step < 14 and run.attrs["stop_phase"] == "adam"
    assert run.attrs["stop_cause"].startswith(f"TrainingDivergedError: loss term 'pde' became nan at step {step}")
    assert run.training["step"].tolist() == list(range(1, step + 1))     # history up to the failure
    assert np.isfinite(run.training["loss"]).all()
    assert run.checkpoint_step == 10 and load_checkpoint(path)["step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.h5"]
    summary = run.summary()
    assert summary["status"] == "diverged" and summary["stop_step"] == step
    from pinnsketch.io import format_summary

    assert f"diverged at step {step} (adam)" in format_summary(summary)


@pytest.mark.parametrize("storage", ["exact", "lowrank:target=0.002,r_max=6,residual=int8,audit_size=4"])
def test_from_reruns_the_recorded_run_to_the_bit(tmp_path, storage, capsys):
    first, again = tmp_path / "first.h5", tmp_path / "again.h5"
    assert main(["solve", "heat", *TINY, "--storage", storage, "--steps", "30", "--lbfgs-steps", "6",
                 "--lr", "0.003", "--seed", "4", "--out", str(first)]) == 0
    config = json.loads(load(first).attrs["config"])
    assert config["storage"] == storage and load(first).storage == storage
    assert config["network"] == {"width": 8, "depth": 1, "activation": "tanh"} and config["seed"] == 4
    assert config["adam"]["lr"] == 0.003 and config["points"]["domain"] == 32
    assert main(["solve", "--from", str(first), "--no-progress", "--out", str(again)]) == 0
    _same_run(again, first)
    assert load(again).training["loss"][-1] == load(first).training["loss"][-1]
    assert json.loads(load(again).attrs["config"]) == config
    capsys.readouterr()


def test_storage_spec_is_parsed_once_for_solve_and_bench():
    from pinnsketch.data.bench import parse_storage

    policy = parse_storage("lowrank:target=1e-3,r_max=16", defaults={})
    assert (policy.target, policy.r_max, policy.noise_fraction) == (1e-3, 16, None)
    assert parse_storage("lowrank:target=1e-3").noise_fraction == 0.25      # bench: mini-batch default
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_storage("lowrank:target", defaults={})


def test_resume_refuses_training_options_and_completed_runs(tmp_path, capsys):
    out = tmp_path / "done.h5"
    assert main(["solve", "heat", *TINY, "--storage", "exact", "--steps", "3", "--lbfgs-steps", "0",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["solve", "--resume", str(out), "--steps", "10"]) == 2
    assert "leave out --steps" in capsys.readouterr().err
    assert main(["solve", "--resume", str(out)]) == 2
    assert "holds a completed run" in capsys.readouterr().err


def test_lbfgs_stop_reason_in_history_file_and_inspect(tmp_path, capsys):
    path = tmp_path / "lbfgs.h5"
    options = solve_options(lbfgs=ps.LBFGS(steps=200, max_iter=5, tolerance_change=1e-3), dtype="float32")
    result = ps.solve(Parabola1D(), **options, callbacks=[RunWriter(path)])
    stop = result.history["lbfgs_stop"]
    assert stop["reason"] in ("loss change tolerance", "step tolerance", "directional derivative tolerance")
    assert stop["step"] < 24 + 200 and "tolerance_change=0.001" in stop["detail"]
    assert stop["step"] == result.history["step"][-1]
    run = load(path)
    assert run.attrs["lbfgs_stop_reason"] == stop["reason"] and run.attrs["lbfgs_stop_step"] == stop["step"]
    # float32 stopped early, so L-BFGS went on in float64 (and met the tolerance there too)
    switched = result.history["precision"]["step"][0]
    assert result.history["precision"]["dtype"] == ["float64", "float32"]
    assert list(run.attrs["lbfgs_float64_from"]) == [switched] == run.summary()["lbfgs_float64_from"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"L-BFGS stop  {stop['reason']} at step {stop['step']}" in out
    assert f"L-BFGS continued in float64 from step {switched}" in out


def test_plot_draws_ranks_and_gradient_history_of_a_cli_monitor_run(tmp_path, capsys):
    out = tmp_path / "monitored.h5"
    assert main(["solve", "heat", *TINY, "--storage", "lowrank", "--width", "16", "--steps", "25",
                 "--lbfgs-steps", "4", "--monitor-rank", "2", "--out", str(out)]) == 0
    run = load(out)
    assert len(run.gradient_steps) > 20 and len(run.sketch["step"]) > 5
    assert main(["plot", str(out), "--out", str(tmp_path / "figs")]) == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"ranks.png", "gradient_norms.png"} <= names
    import matplotlib.image

    for name in ("ranks.png", "gradient_norms.png"):
        image = matplotlib.image.imread(tmp_path / "figs" / name)
        assert image[..., :3].std() > 0.05                     # drawn, not blank
    capsys.readouterr()


def test_checkpoint_every_zero_writes_only_the_final_state(tmp_path, capsys):
    out = tmp_path / "final.h5"
    assert main(["solve", "heat", *TINY, "--storage", "exact", "--steps", "12", "--lbfgs-steps", "0",
                 "--checkpoint-every", "0", "--out", str(out)]) == 0
    run = load(out)
    assert run.checkpoint_step == 12 and run.completed and run.training["step"].tolist() == list(range(1, 13))
    capsys.readouterr()


def test_a_checkpoint_is_written_when_the_adam_phase_ends(tmp_path):
    class StopInLBFGS(ps.Callback):
        def on_step(self, state):
            if state.phase == "lbfgs":
                raise KeyboardInterrupt

    path = tmp_path / "phase.h5"
    with pytest.raises(KeyboardInterrupt):
        ps.solve(Parabola1D(), **solve_options(), callbacks=[RunWriter(path, checkpoint_every=1000), StopInLBFGS()])
    run = load(path)
    assert run.checkpoint_step == 24 and run.attrs["stop_phase"] == "lbfgs"      # Adam's 24 steps are kept


def test_option_flags_through_the_installed_command(tmp_path):
    """`pinnsketch solve` as a user runs it (a subprocess): option flags land in the run file; a bad
    flag value is one line on stderr and exit status 2."""
    out = tmp_path / "marched.h5"
    ok = subprocess.run(_cli("solve", "heat", *TINY, "--storage", "exact", "--steps", "4", "--lbfgs-steps", "2",
                             "--windows", "2", "--fourier", "features=8,scale=1", "--chunk-bytes", "4KiB",
                             "--out", str(out)),
                        env=_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    config = json.loads(load(out).attrs["config"])
    assert config["windows"]["windows"] == 2 and config["network"]["fourier"]["features"] == 8
    assert config["network"]["chunk_bytes"] == 4096
    bad = subprocess.run(_cli("solve", "heat", *TINY, "--causal", "chunks=1"), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "chunks=1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run(_cli("solve", "heat", *TINY, "--chunk-bytes", "lots"), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--chunk-bytes 'lots'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
