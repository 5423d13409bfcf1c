"""`inspect` and `plot` subcommands on a recorded run."""

import argparse
import json

import numpy as np
import pytest

from pinnsketch.io import format_summary, load, plot_run
from pinnsketch.io.commands import add_inspect_parser, add_plot_parser
from pinnsketch.io.summary import SUMMARY_KEYS


def _parse(argv):
    parser = argparse.ArgumentParser(prog="pinnsketch")
    sub = parser.add_subparsers(dest="command", required=True)
    add_inspect_parser(sub)
    add_plot_parser(sub)
    return parser.parse_args(argv)


def test_inspect_json_has_the_required_keys(recorded_run, capsys):
    path, result, monitor = recorded_run
    args = _parse(["inspect", "--json", str(path)])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("problem", "storage", "steps", "l2_relative_error", "saved_bytes_peak", "wall_time_s"):
        assert key in summary
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["problem"] == "parabola1d" and summary["storage"] == "exact" and summary["steps"] == 30
    assert summary["l2_relative_error"] == pytest.approx(result.l2_relative_error)
    assert summary["saved_bytes_peak"] == result.saved_bytes_peak
    assert summary["final_loss"] == pytest.approx(result.history["loss"][-1])
    assert summary["gradient_monitor"]["monitor_bytes"] == monitor.nbytes


def test_inspect_text(recorded_run, capsys):
    args = _parse(["inspect", str(recorded_run[0])])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "parabola1d" in text and "completed" in text and "rel. L2 err" in text and "gradients" in text
    assert format_summary(load(recorded_run[0]).summary()) in text


def test_plot_writes_readable_pngs(recorded_run, tmp_path, capsys):
    out = tmp_path / "figs"
    args = _parse(["plot", str(recorded_run[0]), "--out", str(out)])
    assert args.func(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gradient_norms.png", "solution.png", "training.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in
                                               ["solution.png", "training.png", "gradient_norms.png"]]
    import matplotlib.image

    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05          # not a blank canvas


def test_plot_2d_fields_and_rank_history(tmp_path):
    # A hand-made run with a 2-D solution on scattered points and a rank history.
    import h5py

    from io_helpers import train_loop
    from pinnsketch.io import RunWriter

    path = tmp_path / "two_d.h5"
    train_loop([RunWriter(path, checkpoint_every=10)], steps=20)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (400, 2))
    ref = np.sin(np.pi * x[:, :1]) * np.cos(np.pi * x[:, 1:])
    with h5py.File(path, "r+") as f:
        g = f.create_group("solution")
        g["x"], g["prediction"], g["reference"] = x, ref + 0.01, ref
        g["error"] = np.full_like(ref, 0.01)
        g.attrs["input_names"], g.attrs["output_names"] = '["x", "y"]', '["u"]'
    written = plot_run(path, tmp_path / "figs")
    assert sorted(p.name for p in written) == ["ranks.png", "solution.png", "training.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_inspect_into_a_closed_pipe_is_quiet(recorded_run):
    """`pinnsketch inspect run.h5 --json | head -1`: the reader has gone; no error line, status 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)                       # every write to the pipe now fails with EPIPE
    proc = subprocess.run([sys.executable, "-c", "import sys; from pinnsketch.cli import main; sys.exit(main())",
                           "inspect", "--json", str(recorded_run[0])],
                          stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    os.close(write_end)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "error" not in stderr.lower() and "Traceback" not in stderr
