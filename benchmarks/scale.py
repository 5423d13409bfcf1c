"""The largest full-batch PINN training step that fits a memory budget, per system; accuracy at the budget.

Question: at a fixed memory budget, how many collocation points can each system train on, and does
`lowrank`'s extra room buy a better solution?

Part 1, capacity. For a budget (default 2 GiB) and each workload and system, the largest number of
collocation points N whose full-batch training step fits, by doubling then bisection (to 5 %).
A step is what a run does: two Adam steps and one L-BFGS iteration on a Burgers residual
(jet streams u, u_x, u_t, u_xx) over N random points. Each attempt runs in a fresh subprocess and
fits when its peak memory is within the budget:
  * `--meter rss` (default on the CPU): the peak resident memory of the process above its level
    just before the first step (`pinnsketch.nn.ResidentPeak`): what the operating system sees;
  * `--meter allocator`: the peak of live tensor bytes above the start of each step
    (`MemoryMeter(step_peak=True)`: CUDA's counters, or the CPU allocator's events).
Workloads: `mlp` (tanh 2-256x6-1) and `resmlp` (tanh residual network, 256 wide, 12 residual
blocks). Systems: `deepxde` (its own API: nested autograd through `dde.nn.FNN`; for `resmlp` an FNN
of the same depth, as DeepXDE's pytorch backend has no residual network), and pinnsketch's
`exact`, `checkpoint` and `lowrank` storage.

Part 2, accuracy at the budget (`--accuracy`). A problem where more collocation points give a better
solution: by default (`--accuracy-problem peak`) Poisson on the unit square whose exact solution is
a Gaussian peak of width sigma = 0.04 (`--accuracy-sigma`) at (0.4, 0.6), tanh network 128x4
(`--accuracy-width`, `--accuracy-depth`): the
error is made where the peak is, and only the points that land there (about 2 % of them) resolve
it; or the library's Helmholtz (`--accuracy-problem helmholtz`, sin 64x4). For a budget of the
step's live tensor bytes (`--accuracy-budget`, default 32 MiB, allocator meter, in process; it must
be large against the CPU's 2 MiB row chunks, whose transients every policy pays), the largest N
under `exact` and under `lowrank` (bisection as above; an attempt is a short run with every step
metered, so the controller's first decisions count), then a full-batch run at each maximum (Adam,
then L-BFGS), its relative L2 error against the exact solution and the largest step peak metered
during the run (`within_budget`). `lowrank` runs with a byte cap (`--accuracy-lowrank`, default
`lowrank:max_ratio=0.3`), probed in the largest configuration that cap allows (`probe_spec`), so
that later rank growth cannot leave the budget. `--accuracy-seeds` repeats the runs over network
initializations (the points are fixed). A third run, `exact`
at `lowrank`'s N (over the budget), separates the points' effect from the compression's.

    python benchmarks/scale.py                                   # 2 GiB, both workloads, all systems
    python benchmarks/scale.py --budget 512MiB --workloads mlp   # a quicker look
    python benchmarks/scale.py --accuracy-only --accuracy-adam 1000 --accuracy-lbfgs 300   # 32 MiB, the peak
    python benchmarks/scale.py --at 32768 --workloads mlp        # every system at one size, no search

Writes results/scale.json (records: workload, storage, budget_bytes, max_points,
peak_bytes_at_max, ratio_to_exact, step_time_s; accuracy records add l2_relative_error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NU = 0.01 / math.pi
SYSTEMS = ("deepxde", "exact", "checkpoint", "lowrank")
WORKLOADS = ("mlp", "resmlp")


def _system_points(text: str) -> dict[str, int]:
    """"exact=3840,lowrank=10752" -> {"exact": 3840, "lowrank": 10752}."""
    try:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SYSTEM=N,...; e.g. exact=3840,lowrank=10752") from None


def parse_bytes(text: str) -> int:
    """--budget SIZE: pinnsketch.data.bench.parse_bytes as an argparse type."""
    from pinnsketch.data.bench import parse_bytes as parse

    try:
        return parse(text, "budget")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# -- one attempt (runs in a subprocess) ----------------------------------------------------------
def _points(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 2, generator=g) * torch.tensor([2.0, 1.0]) - torch.tensor([1.0, 0.0])


def _pinnsketch_step_fn(workload: str, storage: str, n: int, device: str):
    from pinnsketch.nn import MLP, JetSpec, ResidualMLP

    spec = JetSpec.from_names(["x", "t", "xx"], ["x", "t"])
    cls, depth = (MLP, 6) if workload == "mlp" else (ResidualMLP, 12)
    model = cls(2, 1, width=256, depth=depth, activation="tanh", storage=storage, seed=0, device=device)
    x = _points(n).to(device)

    def loss_fn():
        u, ux, ut, uxx = model.jet(x, spec).streams
        return (ut + u * ux - NU * uxx).square().mean()

    return model, loss_fn


def _deepxde_step_fn(workload: str, n: int, device: str):
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    import deepxde as dde

    depth = 6 if workload == "mlp" else 13          # resmlp: 12 residual blocks + the input map
    net = dde.nn.FNN([2] + [256] * depth + [1], "tanh", "Glorot normal").to(device)
    x = _points(n).to(device).requires_grad_(True)

    def loss_fn():
        y = net(x)
        dy_x = dde.grad.jacobian(y, x, i=0, j=0)
        dy_t = dde.grad.jacobian(y, x, i=0, j=1)
        dy_xx = dde.grad.hessian(y, x, i=0, j=0)
        dde.grad.clear()
        return (dy_t + y * dy_x - NU * dy_xx).square().mean()

    return net, loss_fn


def attempt(workload: str, system: str, n: int, meter: str, device: str) -> dict:
    """Peak memory and step time of 2 Adam steps + 1 L-BFGS iteration at N = n (this process)."""
    from pinnsketch.nn import MemoryMeter, ResidentPeak

    if system == "deepxde":
        model, loss_fn = _deepxde_step_fn(workload, n, device)
    else:
        model, loss_fn = _pinnsketch_step_fn(workload, system, n, device)
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=1e-3)
    lbfgs = torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=50)
    advance = getattr(model, "advance", lambda: None)

    def adam_step():
        adam.zero_grad(set_to_none=True)
        loss_fn().backward()
        adam.step()
        advance()

    def closure():
        lbfgs.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    def lbfgs_step():
        lbfgs.step(closure)
        advance()

    def synced(fn):
        def run():
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    steps = [synced(adam_step), synced(adam_step), synced(lbfgs_step)]
    times, peak = [], 0
    if meter == "rss":
        with ResidentPeak() as rss:
            for step in steps:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        peak = rss.peak_bytes
    else:
        for step in steps:
            with MemoryMeter(step_peak=True) as m:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            peak = max(peak, m.step_peak_bytes or 0)
    return {"peak_bytes": int(peak), "step_time_s": min(times[:2])}


def run_attempt(workload: str, system: str, n: int, meter: str, device: str, threads: int) -> dict:
    """`attempt` in a fresh subprocess (an out-of-memory failure there is a "does not fit")."""
    cmd = [sys.executable, __file__, "--attempt", workload, system, str(n), "--meter", meter,
           "--device", device, "--threads", str(threads)]
    env = dict(os.environ, DDE_BACKEND="pytorch")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"peak_bytes": None, "step_time_s": None, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def largest_fit(fits, start: int = 4096, limit: int = 1 << 24, tol: float = 0.05):
    """The largest n with fits(n) -> (bool, record), by doubling from `start`, then bisection to `tol`."""
    lo, lo_rec, hi = None, None, None
    n = start
    while n <= limit:
        ok, rec = fits(n)
        if not ok:
            hi = n
            break
        lo, lo_rec, n = n, rec, 2 * n
    if lo is None:
        while n > 64:                               # not even `start`: halve down
            n //= 2
            ok, rec = fits(n)
            if ok:
                lo, lo_rec, hi = n, rec, 2 * n
                break
        if lo is None:
            return 0, None
    while hi is not None and hi / lo > 1 + tol:
        mid = (lo + hi) // 2
        ok, rec = fits(mid)
        if ok:
            lo, lo_rec = mid, rec
        else:
            hi = mid
    return lo, lo_rec


def capacity(args, save=lambda records: None) -> list[dict]:
    records = []
    for workload in args.workloads:
        found = {}
        for system in args.systems:
            tried = []

            def fits(n, system=system, workload=workload, tried=tried):
                rec = run_attempt(workload, system, n, args.meter, args.device, args.threads)
                tried.append({"points": n, **rec})
                ok = rec.get("peak_bytes") is not None and rec["peak_bytes"] <= args.budget
                print(f"  {workload:7s} {system:10s} N={n:8d}  peak "
                      f"{'-' if rec.get('peak_bytes') is None else rec['peak_bytes'] / 2**20:>8} MiB  "
                      f"{'fits' if ok else 'no'}", flush=True)
                return ok, rec
            n, rec = largest_fit(fits, start=args.start)
            found[system] = n
            records.append({"workload": workload, "storage": system, "budget_bytes": args.budget,
                            "meter": args.meter, "max_points": n,
                            "peak_bytes_at_max": None if rec is None else rec["peak_bytes"],
                            "step_time_s": None if rec is None else rec["step_time_s"],
                            "attempts": sorted(tried, key=lambda a: a["points"])})
        for r in records:
            if r["workload"] == workload:
                r["ratio_to_exact"] = (r["max_points"] / found["exact"]) if found.get("exact") else None
        save(records)
    return records


def at_points(args, save=lambda records: None) -> list[dict]:
    """Peak memory and step time of every system at fixed point counts (`--at N ...`), one subprocess each."""
    records = []
    for workload in args.workloads:
        for n in args.at:
            row = {s: run_attempt(workload, s, n, args.meter, args.device, args.threads) for s in args.systems}
            for system, rec in row.items():
                ref = row.get("exact", {}).get("peak_bytes")
                records.append({"workload": workload, "storage": system, "points": n, "meter": args.meter,
                                "peak_bytes": rec.get("peak_bytes"), "step_time_s": rec.get("step_time_s"),
                                "peak_ratio_to_exact": None if not ref or rec.get("peak_bytes") is None
                                else rec["peak_bytes"] / ref, **({"error": rec["error"]} if "error" in rec else {})})
                print(f"  {workload:7s} {system:10s} N={n:8d}  peak {rec.get('peak_bytes')}", flush=True)
            save(records)
    return records


# -- accuracy at a fixed budget ----------------------------------------------------------------
def accuracy_problem(args):
    """The accuracy part's problem: "peak" (a sharp Gaussian source, where the points that land in the
    peak decide the error) or "helmholtz" (the library's, `--accuracy-periods` periods per direction)."""
    import pinnsketch as ps
    from pinnsketch.problems.helmholtz import Helmholtz

    if args.accuracy_problem == "helmholtz":
        class PeriodsHelmholtz(Helmholtz):
            """The library's Helmholtz with `--accuracy-periods` periods per direction (k = 2 pi periods)."""

            name = f"helmholtz_{args.accuracy_periods}periods"
            k = 2 * math.pi * args.accuracy_periods

        return PeriodsHelmholtz(), ps.Network(width=args.accuracy_width, depth=args.accuracy_depth, activation="sin")

    sigma, center = args.accuracy_sigma, (0.4, 0.6)

    class SharpPeak(ps.Problem):
        """-(u_xx + u_yy) = f on [0, 1]^2, u = 0 on the walls (hard constraint), with the exact solution
        u = exp(-r^2 / (2 sigma^2)), r the distance to (0.4, 0.6): f = u (2 / sigma^2 - r^2 / sigma^4).
        The residual is scaled by sigma^2 / 2, so that it is O(1). u on the walls is below 1e-30."""

        name = f"poisson_peak_sigma{sigma:g}"
        domain = ps.geometry.Rectangle((0, 0), (1, 1))
        conditions = ()

        def _u(self, x):
            r2 = (x[:, 0] - center[0]) ** 2 + (x[:, 1] - center[1]) ** 2
            return torch.exp(-r2 / (2 * sigma**2)), r2

        def residual(self, x, u):
            exact, r2 = self._u(x)
            source = exact * (2 / sigma**2 - r2 / sigma**4)
            return (sigma**2 / 2) * (-u.xx - u.yy - source)

        def output_transform(self, x, u):
            a, b = x[:, 0:1], x[:, 1:2]
            return 16 * a * (1 - a) * b * (1 - b) * u

        def exact(self, x):
            return self._u(x)[0][:, None]

    return SharpPeak(), ps.Network(width=args.accuracy_width, depth=args.accuracy_depth, activation="tanh")


def probe_spec(spec: str) -> str:
    """The storage spec a budget probe runs: `lowrank` with a byte cap in the largest configuration
    the run can reach under that cap (starting at its r_max with int8 residual codes and no
    shrinking during the probe; its start halves the rank until the cap holds); others as given."""
    from pinnsketch.data.bench import parse_storage

    if not spec.startswith("lowrank:") or "max_ratio" not in spec:
        return spec
    r_max = parse_storage(spec, defaults={}).r_max
    return spec + f",initial_rank={r_max},residual=int8,patience=1000000"


def accuracy(args, save=lambda records: None) -> list[dict]:
    import pinnsketch as ps
    from pinnsketch.data.bench import parse_storage
    from pinnsketch.nn import make_storage

    problem, network = accuracy_problem(args)
    policies = {"exact": "exact", "lowrank": args.accuracy_lowrank}

    def storage(spec: str):
        return make_storage(spec) if ":" not in spec else parse_storage(spec, defaults={})

    def solve(spec: str, n: int, adam: int, lbfgs: int, eval_every: int, seed: int = 0):
        return ps.solve(problem, storage=storage(spec), network=network,
                        points=ps.Points(domain=n, boundary=0, initial=0), adam=ps.Adam(steps=adam),
                        lbfgs=ps.LBFGS(steps=lbfgs), seed=seed, device="cpu", progress=False, eval_every=eval_every)

    def peak_at(system: str, n: int) -> int:
        """The largest step peak solve() meters over a short run at n points (every step metered).
        `lowrank` is probed in the largest configuration its cap allows (`probe_spec`), so that rank
        growth later in the run cannot leave the budget."""
        return solve(probe_spec(policies[system]), n, args.accuracy_probe_steps, 2, eval_every=1).step_peak_bytes

    found = dict(args.accuracy_points or {})
    for system in ("exact", "lowrank"):
        if system not in found:
            found[system], _ = largest_fit(
                lambda n: ((p := peak_at(system, n)) <= args.accuracy_budget, {"peak_bytes": p}), start=256, tol=0.05)
        print(f"  accuracy {system:8s} largest N within the budget: {found[system]}", flush=True)
    # exact at lowrank's N, over the budget: whether the extra points (not the compression) make the difference
    runs = {"exact": ("exact", found["exact"], True), "lowrank": ("lowrank", found["lowrank"], True),
            "control": ("exact", found["lowrank"], False)}
    records = []
    for seed, (system, n, at_max) in ((seed, runs[name]) for seed in args.accuracy_seeds
                                      for name in args.accuracy_runs):
        t0 = time.perf_counter()
        result = solve(policies[system], n, args.accuracy_adam, args.accuracy_lbfgs,
                       eval_every=args.accuracy_eval_every, seed=seed)
        records.append({"workload": f"{problem.name}_{network.activation}{network.width}x{network.depth}",
                        "storage": system, "storage_spec": policies[system], "seed": seed,
                        "budget_bytes": args.accuracy_budget, "meter": "allocator", "max_points": n,
                        "at_own_maximum": at_max, "peak_bytes_at_max": result.step_peak_bytes,
                        "within_budget": result.step_peak_bytes <= args.accuracy_budget,
                        "l2_relative_error": result.l2_relative_error,
                        "adam_steps": args.accuracy_adam, "lbfgs_steps": args.accuracy_lbfgs,
                        "lbfgs_iterations": result.timing.get("lbfgs_steps"),
                        "lbfgs_stop": result.history.get("lbfgs_stop"),
                        "train_seconds": time.perf_counter() - t0,
                        "step_time_s": result.timing.get("adam_ms_per_step", math.nan) / 1e3})
        records[-1]["ratio_to_exact"] = n / found["exact"]
        print(f"  accuracy {system:8s} seed {seed} N={n:6d}  L2 {result.l2_relative_error:.3e}  "
              f"peak {result.step_peak_bytes / 2**20:.1f} MiB", flush=True)
        save(records)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=parse_bytes, default=parse_bytes("2GiB"), help="e.g. 2GiB, 512MiB")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--meter", choices=("rss", "allocator"), default=None,
                   help="rss (CPU default) or allocator (CUDA default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--start", type=int, default=4096, help="first point count tried")
    p.add_argument("--at", type=int, nargs="+", default=None, metavar="N",
                   help="no search: measure every system at these point counts")
    p.add_argument("--accuracy", action="store_true", help="also run the accuracy-at-budget part")
    p.add_argument("--accuracy-only", action="store_true")
    p.add_argument("--accuracy-budget", type=parse_bytes, default=parse_bytes("32MiB"))
    p.add_argument("--accuracy-problem", choices=("peak", "helmholtz"), default="peak")
    p.add_argument("--accuracy-sigma", type=float, default=0.04, help="width of the peak problem's Gaussian")
    p.add_argument("--accuracy-periods", type=int, default=2, help="Helmholtz periods per direction")
    p.add_argument("--accuracy-width", type=int, default=128, help="the accuracy network's width")
    p.add_argument("--accuracy-depth", type=int, default=4, help="the accuracy network's hidden layers")
    p.add_argument("--accuracy-adam", type=int, default=2000)
    p.add_argument("--accuracy-lbfgs", type=int, default=500)
    p.add_argument("--accuracy-lowrank", default="lowrank:max_ratio=0.3",
                   help="the lowrank policy of the accuracy part (a cap keeps it within the budget)")
    p.add_argument("--accuracy-points", type=_system_points, default=None, metavar="exact=N,lowrank=M",
                   help="skip the search: the largest point counts found by an earlier run")
    p.add_argument("--accuracy-runs", nargs="+", default=["exact", "lowrank", "control"],
                   choices=("exact", "lowrank", "control"),
                   help="which runs (control: exact at lowrank's N); separate processes may split them")
    p.add_argument("--accuracy-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the accuracy runs (network initialization; the points are fixed)")
    p.add_argument("--accuracy-probe-steps", type=int, default=20,
                   help="Adam steps (each metered) of a bisection attempt")
    p.add_argument("--accuracy-eval-every", type=int, default=100,
                   help="steps between evaluations (and metered steps) of the accuracy runs")
    p.add_argument("--json", type=Path, default=HERE / "results" / "scale.json")
    p.add_argument("--attempt", nargs=3, metavar=("WORKLOAD", "SYSTEM", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.meter is None:
        args.meter = "allocator" if args.device.startswith("cuda") else "rss"
    if args.attempt:
        workload, system, n = args.attempt
        print(json.dumps(attempt(workload, system, int(n), args.meter, args.device)))
        return 0
    from pinnsketch.data.bench import cpu_model, git_commit

    device_name = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else cpu_model())
    out = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": git_commit(), "torch": torch.__version__, "device": args.device, "device_name": device_name,
           "threads": args.threads, "python": platform.python_version(), "records": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    runs = previous.get("runs", []) if isinstance(previous, dict) else []
    runs.append(out)

    def save(records):                         # after every workload: a long run keeps what it found
        out["records"] = records
        args.json.write_text(json.dumps({"runs": runs}, indent=2) + "\n")

    if args.at:
        records = at_points(args, save)
    else:
        records = [] if args.accuracy_only else capacity(args, save)
    if args.accuracy or args.accuracy_only:
        records += accuracy(args, lambda acc: save(records + acc))
    save(records)
    print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
