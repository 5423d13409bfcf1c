"""benchmarks/compiled_step.py runs end to end on a tiny budget (it drives the solver's own step)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_interleaved_run_writes_its_ratios(tmp_path):
    out = tmp_path / "compiled_step.json"
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "DDE_BACKEND": "pytorch", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compiled_step.py"), "--rounds", "1", "--chunk", "2",
                          "--warmup", "1", "--l2-steps", "3", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"eager_exact", "compiled_exact", "eager_lowrank", "matmul_floor"} <= set(result["cpu_ms_per_iter"])
    assert all(math.isfinite(v) and v > 0 for v in result["cpu_ms_per_iter"].values())
    assert result["speedup_compiled_vs_eager_exact"] > 0
    assert all(0 < v < 10 for v in result["l2"].values())
