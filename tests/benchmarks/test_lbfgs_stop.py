"""benchmarks/lbfgs_stop.py on a short run file: float32 against float64 at its checkpoint."""

from __future__ import annotations

import json

import pytest

import pinnsketch as ps
from bench_helpers import load_benchmark
from pinnsketch import problems


@pytest.fixture(scope="module")
def stop():
    return load_benchmark("lbfgs_stop")


def test_measures_a_lowrank_run_at_its_checkpoint(stop, tmp_path):
    result = ps.solve(problems.get("heat"), storage="lowrank", network=ps.Network(width=16, depth=3),
                      adam=ps.Adam(steps=3), lbfgs=ps.LBFGS(steps=2), points=ps.Points(domain=128, boundary=16,
                      initial=16, refine=None), device="cpu", progress=False, seed=1)
    path = ps.save(result, tmp_path / "run.h5")
    out = tmp_path / "stop.json"
    assert stop.main([str(path), "--continue", "2", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["storage"] == "lowrank" and m["phase"] == "lbfgs" and m["step"] == 5
    assert m["lbfgs_stop"]["reason"] == "step budget"
    assert m["loss_float32"] == pytest.approx(m["loss_float64"], rel=1e-4)
    # far from convergence float32 is accurate: the exact float32 gradient matches float64 closely
    assert m["gradient_float32_exact"]["relative_error"] < 1e-3 and m["gradient_float32_exact"]["cosine"] > 0.999
    assert 0 < m["gradient_float32_run_storage"]["relative_error"] < 0.5
    d = m["direction"]
    assert d["history"] >= 1 and d["slope_run_gradient"] < 0 and d["slope_float64"] < 0
    assert set(d["loss_change_float32"]) == {str(t) for t in stop.STEPS} and d["loss_change_float64"]["0.0001"] < 0
    for dtype in ("float32", "float64"):
        c = m["continued"][dtype]
        assert c["iterations"] == 2 and not c["stopped_early"] and c["loss"] < m["loss_float64"]
        assert c["l2_relative_error"] > 0


def test_bad_arguments(stop, tmp_path):
    with pytest.raises(SystemExit):
        stop.main([str(tmp_path / "run.h5"), "--continue", "-1"])
    with pytest.raises(FileNotFoundError, match="no such run file"):
        stop.main([str(tmp_path / "missing.h5")])
