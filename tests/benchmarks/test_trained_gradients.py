"""benchmarks/trained_gradients.py on a briefly trained heat network: the gradients it compares, the record."""

from __future__ import annotations

import json

import pytest
import torch

from bench_helpers import load_benchmark, run_benchmark

import pinnsketch as ps
from pinnsketch import problems


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("trained_gradients")


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "heat.h5"
    result = ps.solve(problems.get("heat"), storage="lowrank", adam=ps.Adam(steps=40), lbfgs=ps.LBFGS(steps=0),
                      seed=4, progress=False)
    return ps.save(result, path)


def test_every_step_is_taken_at_the_trained_weights(bench, run_file):
    run = ps.load(run_file)
    weights = {k: torch.as_tensor(v) for k, v in run.model_state.items() if "storage" not in k and k != "structure"}
    probe = bench.gradients(problems.get("heat"), "exact", 4, weights, 3)
    first, *rest = probe.steps
    for later in rest:      # exact storage at restored weights: the same gradient every step
        for name in first:
            torch.testing.assert_close(later[name], first[name], rtol=0, atol=0)
    untrained = bench.gradients(problems.get("heat"), "exact", 4,
                                {k: torch.zeros_like(v) for k, v in weights.items()}, 1).steps[0]
    assert any(not torch.equal(untrained[n], first[n]) for n in first)   # the weights were loaded


def test_record_of_a_run_file(bench, run_file, tmp_path):
    out = tmp_path / "tg.json"
    done = run_benchmark("trained_gradients", ["--runs", str(run_file), "--steps", "6", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    payload = json.loads(out.read_text())
    assert payload["steps"] == 6 and payload["command"].endswith(f"--steps 6 --out {out}")
    (r,) = payload["records"]
    assert (r["problem"], r["seed"], r["run_storage"], r["run_steps"]) == ("heat", 4, "lowrank", 40)
    assert len(r["relative_error_per_step"]) == 6 and r["gradient_norm"] > 0
    # lowrank's gradient is close to exact's on this network, but not equal (it is compressed)
    assert 0 < r["relative_error_final"] < 5e-2
    assert set(r["relative_error_per_weight_final"]) == {f"blocks.{i}.weight" for i in range(len(r["blocks_final"]))}
    assert any(b["mode"].startswith("lowrank") for b in r["blocks_final"])
    assert 0 < r["saved_bytes_lowrank"] < r["saved_bytes_exact"]
    assert "| heat | 4 | lowrank |" in done.stdout


def test_missing_run_file_is_one_clear_error(tmp_path):
    done = run_benchmark("trained_gradients", ["--runs", str(tmp_path / "nope.h5")], tmp_path)
    assert done.returncode == 2
    assert "nope.h5 does not exist" in done.stderr and "pinnsketch solve --out" in done.stderr
