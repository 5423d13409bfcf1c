"""benchmarks/pinn_suite.py on a few steps: what each record holds, the ratios, the command line."""

from __future__ import annotations

import json

import pytest

from bench_helpers import load_benchmark

from pinnsketch import load


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("pinn_suite")


def test_records_options_results_and_ratios(suite, tmp_path, capsys):
    out = tmp_path / "suite.json"
    argv = ["--problems", "heat,", "--steps", "2", "--lbfgs-steps", "1", "--device", "cpu", "--seed", "3",
            "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert suite.main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["command"] == "python benchmarks/pinn_suite.py " + " ".join(argv)
    assert payload["torch"] and payload["cpu"] and payload["threads"] >= 1
    assert [(r["problem"], r["storage"]) for r in payload["records"]] == [("heat", "exact"), ("heat", "lowrank")]
    for r in payload["records"]:
        assert "error" not in r, r.get("error")
        assert r["adam_steps"] == 2 and r["lbfgs_steps"] <= 1 and r["wall_s"] > 0
        assert r["options"]["network"] == {"width": 32, "depth": 4, "activation": "tanh"}
        assert r["options"]["adam"]["steps"] == 2 and r["options"]["lbfgs"]["steps"] == 1
        assert r["options"]["points"]["domain"] > 0 and r["config"]["storage"] == r["storage"]
        assert r["l2_relative_error"] > 0 and r["passed"] == (r["l2_relative_error"] <= r["tolerance"])
        assert r["saved_bytes_peak"] > 0 and r["step_peak_bytes"] > 0
        assert r["options"]["seed"] == 3 and r["lbfgs_stop"]["reason"] == "step budget"
        run = load(r["run_file"])
        assert run.storage == r["storage"] and run.seed == 3 and run.steps == 3
        assert run.l2_relative_error == pytest.approx(r["l2_relative_error"])
    e, lr = payload["records"]
    assert lr["l2_ratio_to_exact"] == pytest.approx(lr["l2_relative_error"] / e["l2_relative_error"])
    assert lr["saved_ratio_to_exact"] == pytest.approx(lr["saved_bytes_peak"] / e["saved_bytes_peak"])
    assert lr["step_peak_ratio_to_exact"] == pytest.approx(lr["step_peak_bytes"] / e["step_peak_bytes"])
    assert "l2_ratio_to_exact" not in e
    table = capsys.readouterr().out
    assert "| heat | " in table and "32x4 tanh" in table and "| 2+1 |" in table

    # the same records from the run files (a suite split over processes)
    again = tmp_path / "again.json"
    assert suite.main(["--from-runs", *(r["run_file"] for r in payload["records"]), "--out", str(again)]) == 0
    copied = json.loads(again.read_text())["records"]
    for r, c in zip(payload["records"], copied):
        for key in ("problem", "storage", "tolerance", "passed", "adam_steps", "lbfgs_steps", "saved_bytes_peak",
                    "step_peak_bytes", "options"):
            assert c[key] == r[key], key
        assert c["l2_relative_error"] == pytest.approx(r["l2_relative_error"])
        assert c["lbfgs_stop"]["reason"] == "step budget" and c["adam_ms_per_step"] > 0
        assert c["at_defaults"] is False          # 2 + 1 steps are not heat's defaults
    assert copied[1]["l2_ratio_to_exact"] == pytest.approx(lr["l2_ratio_to_exact"])


def test_from_runs_refuses_an_unfinished_run(suite, tmp_path):
    import h5py

    run = tmp_path / "run.h5"
    assert suite.main(["--problems", "heat", "--storages", "exact", "--steps", "1", "--lbfgs-steps", "0",
                       "--device", "cpu", "--runs", str(tmp_path), "--out", str(tmp_path / "a.json")]) == 0
    (path,) = tmp_path.glob("heat_exact_*.h5")
    path.rename(run)
    with h5py.File(run, "r+") as f:
        f.attrs["completed"] = False
    with pytest.raises(SystemExit, match="did not finish"):
        suite.main(["--from-runs", str(run), "--out", str(tmp_path / "b.json")])


def test_network_override_is_trained_and_recorded(suite, tmp_path):
    out = tmp_path / "suite.json"
    argv = ["--problems", "heat", "--storages", "exact", "--steps", "1", "--lbfgs-steps", "0", "--width", "8",
            "--depth", "2", "--device", "cpu", "--out", str(out)]
    assert suite.main(argv) == 0
    payload = json.loads(out.read_text())
    (r,) = payload["records"]
    assert r["options"]["network"] == {"width": 8, "depth": 2, "activation": "tanh"}
    assert payload["network_override"] == {"width": 8, "depth": 2}


def test_quick_and_bad_arguments(suite, tmp_path):
    with pytest.raises(SystemExit):
        suite.main(["--problems", "heat,navier", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        suite.main(["--problems", "heat", "--steps", "-1", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        suite.main(["--problems", "heat", "--width", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
    assert suite._names(["heat,wave", "burgers"]) == ["heat", "wave", "burgers"]
    assert suite.QUICK_STEPS["adam"] > 0 and suite.QUICK_STEPS["lbfgs"] > 0


def test_seed_summary_takes_runs_at_todays_defaults_and_the_geometric_mean(suite, tmp_path, capsys):
    from pinnsketch import problems
    from pinnsketch.pinn.solver import problem_defaults

    defaults = {k: (v.config() if hasattr(v, "config") else v) for k, v in problem_defaults(problems.get("heat")).items()}

    def record(storage, seed, l2, **change):
        config = {**defaults, "seed": seed, "dtype": "float32", **change}
        return {"problem": "heat", "storage": storage, "l2_relative_error": l2, "config": config}

    records = [record("exact", 0, 1e-3), record("lowrank", 0, 4e-3),                # ratio 4, replaced below
               record("exact", 1, 2e-3), record("lowrank", 1, 1e-3),                # ratio 0.5
               record("lowrank", 0, 2e-3),                                           # a later run of seed 0: 2
               record("lowrank", 2, 0.5),                                            # no exact: no ratio; a miss
               record("exact", 3, 1e-4, network={**defaults["network"], "width": 7}),  # not the defaults
               record("exact", 4, 1e-4, dtype="float64"),
               record("lowrank:residual=int8", 1, 1e-5), {"problem": "heat", "storage": "exact", "error": "x"}]
    (row,) = suite.seed_summary(records)
    assert row["seeds"] == [0, 1, 2] and row["l2"]["lowrank"] == {0: 2e-3, 1: 1e-3, 2: 0.5}
    assert row["ratio"] == pytest.approx({0: 2.0, 1: 0.5}) and row["ratio_geometric_mean"] == pytest.approx(1.0)
    assert row["misses"] == {"exact": [], "lowrank": [2]}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"records": records}))
    assert suite.main(["--seed-summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| heat | 0.01 | 0, 1, 2 |" in out and "| 1.00 | lowrank seed 2 |" in out
    path.write_text("{}")
    with pytest.raises(SystemExit):
        suite.main(["--seed-summary", str(path)])
    assert "not a pinn_suite results file" in capsys.readouterr().err
