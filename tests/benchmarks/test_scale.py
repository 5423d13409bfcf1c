"""benchmarks/scale.py's accuracy part on a tiny budget: the cap probe, the search, seeds, the records."""

from __future__ import annotations

import json

from bench_helpers import load_benchmark


def load():
    return load_benchmark("scale")


def test_probe_runs_lowrank_in_the_largest_configuration_its_cap_allows():
    scale = load()
    assert scale.probe_spec("exact") == "exact" and scale.probe_spec("lowrank") == "lowrank"
    probe = scale.probe_spec("lowrank:max_ratio=0.3,r_max=16")
    assert probe.endswith(",initial_rank=16,residual=int8,patience=1000000")
    from pinnsketch.data.bench import parse_storage

    policy = parse_storage(probe, defaults={})
    assert (policy.max_ratio, policy.initial_rank, policy.bits) == (0.3, 16, 8)


def test_accuracy_runs_at_given_points_record_seed_error_and_budget(tmp_path):
    scale = load()
    out = tmp_path / "scale.json"
    assert scale.main(["--accuracy-only", "--accuracy-points", "exact=64,lowrank=128", "--accuracy-width", "16",
                       "--accuracy-depth", "2", "--accuracy-adam", "3", "--accuracy-lbfgs", "1",
                       "--accuracy-eval-every", "1", "--accuracy-runs", "exact", "lowrank",
                       "--accuracy-seeds", "0", "1", "--accuracy-budget", "64MiB", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["runs"][-1]["records"]
    assert [(r["storage"], r["seed"], r["max_points"]) for r in records] == [
        ("exact", 0, 64), ("lowrank", 0, 128), ("exact", 1, 64), ("lowrank", 1, 128)]
    for r in records:
        assert r["workload"] == "poisson_peak_sigma0.04_tanh16x2" and 0 < r["l2_relative_error"]
        assert r["within_budget"] == (r["peak_bytes_at_max"] <= 64 * 2**20) and r["lbfgs_stop"]["reason"]
    assert records[0]["l2_relative_error"] != records[2]["l2_relative_error"]   # the seed changes the network
