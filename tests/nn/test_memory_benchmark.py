"""benchmarks/memory.py: the record schema on a tiny workload (the real run takes minutes)."""

import importlib.util
from pathlib import Path

import torch

from pinnsketch.nn import MLP

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_records_have_the_issue_keys():
    bench = load_benchmark()
    pts = bench.burgers_points(96, seed=0)

    def make(storage):
        return MLP(2, 1, width=16, depth=2, storage=storage, seed=0)

    init = bench.weights_of(make("exact"))
    records = bench.workload_records("pinn_mlp", make, lambda m: bench.burgers_loss(m, pts), {"init": init},
                                     ["exact", "lowrank", "checkpoint"], warmup={"lowrank": 4}, lr=1e-4,
                                     repeats=1, log=lambda s: None)
    assert [r["storage"] for r in records] == ["exact", "lowrank", "checkpoint"]
    for r in records:
        for key in ("workload", "storage", "saved_bytes_peak", "ratio_to_exact", "step_time_ratio_to_exact",
                    "weight_grad_rel_error", "ranks"):
            assert key in r
    exact, lowrank, ckpt = records
    assert exact["ratio_to_exact"] == 1.0 and exact["weight_grad_rel_error"] == 0.0
    assert ckpt["weight_grad_rel_error"] < 1e-6 and ckpt["ratio_to_exact"] < 1.0
    assert 0 < lowrank["weight_grad_rel_error"] < 0.5 and len(lowrank["ranks"]) == 3
    assert torch.isfinite(torch.tensor(lowrank["step_time_ratio_to_exact"]))
