"""benchmarks/time_windows.py --quick: rows with and without windows train the same total steps."""

from __future__ import annotations

import json

import pytest

from bench_helpers import load_benchmark


def load():
    return load_benchmark("time_windows")


def test_quick_rows_train_equal_total_steps(tmp_path):
    bench = load()
    out = tmp_path / "tw.json"
    assert bench.main(["--problem", "burgers", "--rows", "one_network", "windows4", "--quick", "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    one, marched = rows["one_network"], rows["windows4"]
    assert (one["adam_steps"], one["lbfgs_steps"]) == (marched["adam_steps"], marched["lbfgs_steps"]) == (8, 4)
    assert marched["adam_steps_per_window"] == 2 and marched["windows"] == 4 and one["windows"] is None
    assert marched["per_window"]["t0"] == [0.0, 0.25, 0.5, 0.75] and len(marched["per_window"]["l2_relative_error"]) == 4
    assert 0 < one["l2_relative_error"] and 0 < marched["l2_relative_error"]
    with pytest.raises(SystemExit, match="multiples"):
        bench.main(["--problem", "burgers", "--rows", "windows4", "--adam", "10", "--out", str(out)])
