"""benchmarks/time_to_accuracy.py --quick: the whole path (subprocesses, both libraries, JSON) on tiny budgets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench_helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "time_to_accuracy.py"
RECORD_KEYS = {"target", "seconds", "wall_seconds", "iterations", "final_l2"}


def load_time_to_accuracy():
    return load_benchmark("time_to_accuracy")


def test_tracker_records_the_first_check_below_each_target():
    bench = load_time_to_accuracy()
    tracker = bench.Tracker([5e-3, 1e-2], max_seconds=1e9)
    tracker.start()
    assert not tracker.check(250, 0.5)
    assert not tracker.check(500, 8e-3)  # first below 1e-2
    assert not tracker.check(750, 9e-3)  # back above: the first hit stays
    assert tracker.check(1000, 4e-3)  # the last target: stop
    records = {r["target"]: r for r in tracker.records(final_l2=4e-3, iterations=1000)}
    assert records[1e-2]["iterations"] == 500 and records[1e-2]["l2_at_target"] == 8e-3
    assert records[5e-3]["iterations"] == 1000
    assert records[1e-2]["seconds"] <= records[5e-3]["seconds"]
    assert all(r["stopped_by"] == "targets" for r in records.values())


def test_tracker_stops_on_the_cpu_budget_and_leaves_unreached_targets_null():
    bench = load_time_to_accuracy()
    tracker = bench.Tracker([1e-2], max_seconds=1e-9)
    tracker.start()
    sum(i * i for i in range(100_000))  # spend a little CPU time
    assert tracker.check(250, 0.3)
    (record,) = tracker.records(final_l2=0.3, iterations=250)
    assert record["seconds"] is None and record["iterations"] is None and record["stopped_by"] == "max_seconds"


def test_ratios_use_an_earlier_deepxde_run_when_this_one_has_none():
    bench = load_time_to_accuracy()

    def run(system, seconds):
        return {"problem": "burgers", "system": system,
                "records": [{"target": 1e-2, "seconds": seconds, "wall_seconds": 2 * seconds}]}

    earlier = [{"quick": False, "check_every": 250, "finished_utc": "T0", "runs": [run("deepxde", 30.0)]}]
    (ratio,) = bench.ratios([run("pinnsketch_fast", 10.0)], earlier, check_every=250)
    assert ratio["ratio"] == pytest.approx(3.0) and ratio["deepxde_from"] == "T0"
    assert bench.ratios([run("pinnsketch_fast", 10.0)], earlier, check_every=100) == []


def test_bad_arguments_name_the_value(capsys):
    bench = load_time_to_accuracy()
    with pytest.raises(SystemExit):
        bench.main(["--check-every", "0"])
    assert "--check-every 0" in capsys.readouterr().err


def test_quick_run_writes_the_schema(tmp_path):
    out = tmp_path / "tta.json"
    # loose targets so that the tiny budgets reach one of them; the timeout only guards against a
    # hang (about 25 s on an idle 2-core CPU, minutes on a loaded one)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--problems", "burgers", "--systems", "deepxde",
                           "pinnsketch_exact", "--targets", "0.9", "1e-4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["quick"] and entry["torch"] and entry["cpu"] and entry["command"].startswith("python benchmarks/")
    assert [r["system"] for r in entry["runs"]] == ["deepxde", "pinnsketch_exact"]
    for run in entry["runs"]:
        assert run["problem"] == "burgers" and run["device"] == "cpu" and run["complete"]
        loose, tight = run["records"]
        assert RECORD_KEYS <= set(loose) and loose["target"] == 0.9 and tight["target"] == 1e-4
        assert loose["seconds"] > 0 and loose["iterations"] > 0 and loose["final_l2"] < 1.0
        assert tight["seconds"] is None  # not reachable in a few dozen iterations
        iterations = [c["iteration"] for c in run["checks"]]
        assert iterations and iterations == sorted(set(iterations)) and iterations[0] >= 20
    (ratio,) = [r for r in entry["ratios"] if r["target"] == 0.9]
    assert ratio["system"] == "pinnsketch_exact" and ratio["ratio"] > 0
