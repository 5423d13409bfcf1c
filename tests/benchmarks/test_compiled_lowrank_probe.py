"""benchmarks/compiled_lowrank_probe.py: its traced block Functions compute the step (trace-only backend)."""

from __future__ import annotations

import json
import math

from bench_helpers import run_benchmark


def test_traced_variants_run_and_their_gradients_match_exact(tmp_path):
    out = tmp_path / "probe.json"
    run = run_benchmark("compiled_lowrank_probe", ["--rounds", "2", "--chunk", "1", "--points", "300",
                                                   "--backend", "aot_eager", "--out", str(out)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"exact", "lowrank", "lowrank_fixed_basis", "int8"}
    assert variants["exact"]["first_grad_rel_error"] == 0.0
    for name, record in variants.items():
        # the compressed variants' first gradients: int8 / int4 codes on a 20-wide network, well below 5e-2
        assert record["first_grad_rel_error"] < 5e-2, name
        assert math.isfinite(record["ms_per_iteration"]) and record["ms_per_iteration"] > 0
        assert record["ratio_to_exact"] > 0
