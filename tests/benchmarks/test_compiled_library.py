"""benchmarks/compiled_library.py runs end to end on one problem with a tiny budget."""

from __future__ import annotations

import json
import math

from bench_helpers import run_benchmark


def test_one_problem_interleaved_writes_speedup_and_agreement(tmp_path):
    out = tmp_path / "compiled_library.json"
    run = run_benchmark("compiled_library", ["--problems", "heat", "--rounds", "2", "--chunk", "1", "--warmup", "1",
                                             "--out", str(out)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (record,) = json.loads(out.read_text())["records"]
    assert record["problem"] == "heat" and record["architecture"] == "mlp" and record["iterations"] == 3
    assert all(math.isfinite(record[k]) and record[k] > 0 for k in ("eager_cpu_ms", "compiled_cpu_ms", "speedup"))
    assert record["compile_s"] > 0
    # same seed, same iterations: the compiled run trains the eager one's network up to float32 rounding
    assert record["param_max_diff"] <= 1e-4 * record["param_max_abs"]
    assert record["loss_rel_diff"] < 1e-4
