"""benchmarks/gpu_check.sh --dry-run (the GPU check's pipeline on the CPU) and the pieces it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    return load_benchmark(name)


def test_dry_run_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MPLCONFIGDIR": str(tmp_path / "mpl")}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == {"gpu_check_cpu.json", "gpu_profile_cpu.json", "gpu_step_cpu.json", "vs_deepxde_cpu.json",
                            "solve_burgers_cpu.json", "gpu_step_chunked_cpu.json",
                            "compiled_lowrank_probe_cpu.json"}

    check = results["gpu_check_cpu.json"]
    assert check["dry_run"] and [s["name"] for s in check["steps"]] == [
        "cuda_tests", "gpu_profile", "gpu_step", "vs_deepxde", "solve_burgers", "gpu_step_chunked",
        "compiled_lowrank_probe"]
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in check["steps"])

    step = results["gpu_step_cpu.json"]
    assert step["cpu_model"] and step["commit"]
    combos = {(r["network"], r["storage"]) for r in step["records"]}
    assert combos == {(n, s) for n in ("mlp", "residual") for s in ("nested", "exact", "checkpoint", "lowrank")}
    for r in step["records"]:
        assert r["status"] == "ok" and r["step_ms"] > 0 and r["saved_peak_bytes"] > 0 and r["peak_bytes"] >= 0
        # --interleave 2: the same size's systems timed in turn, ratios per round
        assert r["rounds"] == 2 and len(r["round_ms"]) == 2 and r["sequential_step_ms"] > 0
        assert set(r["ratio_to"]) == {"nested", "exact", "checkpoint", "lowrank"} - {r["storage"]}

    chunked = results["gpu_step_chunked_cpu.json"]
    assert {r["storage"] for r in chunked["records"]} == {"exact", "lowrank"}
    assert all(r["status"] == "ok" and r["chunk_bytes"] == 4096 for r in chunked["records"])

    vs = results["vs_deepxde_cpu.json"]
    assert vs["cpu_model"] and vs["rounds"] == 2 and vs["timing"].startswith("interleaved")
    for key in ("speedup", "speedup_lowrank", "deepxde_l2", "pinnsketch_l2", "threads", "torch", "commit"):
        assert vs[key] is not None, key
    assert set(vs["pinnsketch"]) == {"exact", "lowrank"}

    solve = results["solve_burgers_cpu.json"]
    assert [r["storage"] for r in solve["records"]] == ["exact", "lowrank"]
    for r in solve["records"]:
        assert r["status"] == "ok" and 0 < r["l2_relative_error"] < 10 and r["run_device"] == "cpu"

    probe = results["compiled_lowrank_probe_cpu.json"]
    assert probe["backend"] == "aot_eager" and set(probe["variants"]) == {"exact", "lowrank"}
    assert probe["variants"]["lowrank"]["first_grad_rel_error"] < 5e-2


def test_gpu_step_measures_one_configuration_in_a_fresh_process():
    bench = load("gpu_step")
    config = {"network": "residual", "storage": "lowrank", "points": 128, "width": 8, "depth": 2,
              "residual_depth": 2, "steps": 1, "warmup": 1}
    record = bench.measure_in_subprocess(config, timeout=300)
    assert record["status"] == "ok", record
    assert record["points"] == 128 and record["step_ms"] > 0 and record["saved_peak_bytes"] > 0


def test_interleaved_ratios_are_medians_of_round_ratios(tmp_path, capsys):
    bench = load("gpu_step")
    out = tmp_path / "g.json"
    assert bench.main(["--device", "cpu", "--dry-run", "--networks", "mlp", "--storages", "nested", "exact",
                       "--interleave", "3", "--out", str(out)]) == 0
    nested, exact = json.loads(out.read_text())["records"]
    assert json.loads(out.read_text())["interleave_rounds"] == 3
    for r in (nested, exact):
        assert len(r["round_ms"]) == 3 and len(r["step_ms_all"]) == 3 * r["steps"]
        assert r["step_ms"] == pytest.approx(float(np.median(r["step_ms_all"])))
    expected = float(np.median(np.array(exact["round_ms"]) / np.array(nested["round_ms"])))
    assert exact["ratio_to"]["nested"] == pytest.approx(expected)
    assert nested["ratio_to"]["exact"] == pytest.approx(float(np.median(np.array(nested["round_ms"]) /
                                                                         np.array(exact["round_ms"]))))
    assert "interleaved /nested" in capsys.readouterr().err
    with pytest.raises(SystemExit):     # the CPU measures each configuration in its own process by default
        bench.main(["--device", "cpu", "--points", "64", "--interleave", "2", "--out", str(tmp_path / "x.json")])


def test_nested_and_jet_residuals_agree():
    # The baseline and pinnsketch compute the same loss on the same weights (float64).
    import torch

    from pinnsketch.nn import MLP, JetSpec

    bench = load("gpu_step")
    model = MLP(2, 1, width=8, depth=3, seed=0, dtype=torch.float64)
    net = bench.nested_network("mlp", 8, 3, device="cpu", dtype=torch.float64, seed=0)
    with torch.no_grad():
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for lin, block in zip(linears, model.blocks):
            lin.weight.copy_(block.weight)
            lin.bias.copy_(block.bias)
    x = bench.collocation(64, torch.device("cpu")).double()
    spec = JetSpec.from_names(["x", "t", "xx"], ["x", "t"])
    torch.testing.assert_close(bench.nested_loss(net, x), bench.jet_loss(model, x, spec), rtol=1e-10, atol=0)


def test_variants_solve_lacks_are_reported_absent():
    import inspect

    import pinnsketch as ps

    bench = load("vs_deepxde")
    ok, absent = bench.available_variants(list(bench.VARIANTS))
    has_compile = "compile" in inspect.signature(ps.solve).parameters
    assert {"exact", "lowrank"} <= set(ok)
    assert ("compiled" in ok) == has_compile and ("compiled" in absent) == (not has_compile)
    assert all("compile" in why for why in absent.values())
    assert set(bench.SPEEDUP_KEYS) == set(bench.VARIANTS)


def test_baton_gives_turns_in_order():
    bench = load("vs_deepxde")
    names = ["a", "b", "c"]
    baton, log = bench.Baton(names), []

    def worker(name, turns):
        baton.wait(name)
        for k in range(turns):
            log.append(name)
            if k + 1 < turns:
                baton.pass_on(name)
                baton.wait(name)
        baton.leave(name)

    threads = [threading.Thread(target=worker, args=(n, t)) for n, t in zip(names, (3, 1, 2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert log == ["a", "b", "c", "a", "c", "a"]


def test_reference_file_and_its_errors(tmp_path):
    bench = load("vs_deepxde")
    x, t = np.linspace(-1, 1, 5)[:, None], np.linspace(0, 0.99, 3)[:, None]
    usol = np.arange(15.0).reshape(5, 3)
    np.savez(tmp_path / "ref.npz", x=x, t=t, usol=usol)
    pts, u = bench.reference(str(tmp_path / "ref.npz"))
    assert pts.shape == (15, 2) and u.shape == (15, 1)
    assert tuple(pts[4]) == (x[1, 0], t[1, 0]) and u[4, 0] == usol[1, 1]
    np.savez(tmp_path / "bad.npz", x=x, usol=usol)
    with pytest.raises(ValueError, match="lacks the arrays \\['t'\\]"):
        bench.reference(str(tmp_path / "bad.npz"))


def test_profile_counts_operators_per_system(tmp_path):
    out = tmp_path / "p.json"
    assert load("gpu_profile").main(["--device", "cpu", "--points", "64", "--width", "16", "--depth", "2",
                                     "--storages", "nested", "exact", "--out", str(out)]) == 0
    records = {r["storage"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {"nested", "exact"}
    for r in records.values():
        # The CPU has no kernel launches or device syncs; the operator count and the top list are real.
        assert r["aten_ops"] > 50 and r["launches"] == 0 and r["wall_ms"] > 0
        assert r["top"] and all(row["name"].startswith("aten::") for row in r["top"])


def test_step_compiled_loss_matches_the_eager_exact_one():
    """gpu_step's `compiled` system: the exact network's loss through torch.compile, equal to eager `exact`
    (traced with aot_eager here: no C++ compiler needed)."""
    bench = load("gpu_step")
    base = {"network": "mlp", "width": 8, "depth": 2, "residual_depth": 2, "compile_backend": "aot_eager"}
    x = bench.collocation(64, torch.device("cpu"))
    grads = []
    for storage in ("exact", "compiled"):
        model, loss_fn = bench.build({**base, "storage": storage}, torch.device("cpu"))
        loss = loss_fn(x)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g1, g2))
