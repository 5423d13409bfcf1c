"""Load a script of benchmarks/ as a module (the scripts are not a package), for the benchmark tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a fresh module; benchmarks/ joins sys.path for the scripts' own imports."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, args: list[str], tmp_path: Path, timeout: float = 600):
    """Run benchmarks/<name>.py as its users do (a subprocess, one thread); the completed process."""
    import os
    import subprocess

    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "DDE_BACKEND": "pytorch", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
