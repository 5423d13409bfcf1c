"""Time to accuracy: pinnsketch against DeepXDE's own Burgers and Allen-Cahn examples.

Question: starting from scratch, how much CPU time (and how many optimizer
iterations) does each system need until the relative L2 error against the
reference first reaches each target (default 1e-2 and 5e-3)?

Systems, each (problem, system) in a fresh subprocess (no shared caches, allocator or
thread state):

- `deepxde`: DeepXDE's documented example with its own settings, through its own API
  (`Model.compile` / `train`, a `dde.callbacks.Callback` evaluating the error).
  Burgers (examples/pinn_forward/Burgers.py): x in [-1, 1], t in [0, 0.99],
  2540 domain / 80 boundary / 160 initial points, [2] + [20]*3 + [1] tanh, Glorot
  normal, Adam lr 1e-3 for 15000 iterations, then L-BFGS (DeepXDE's defaults,
  maxiter 15000). Allen-Cahn (examples/pinn_forward/Allen_Cahn.py): u_t = d u_xx +
  5 (u - u^3), d = 0.001, hard constraint u = x^2 cos(pi x) + t (1 - x^2) N,
  8000 domain / 400 boundary / 800 initial points (all residual points: the example
  has no loss conditions), the same network, Adam 40000, then L-BFGS. DeepXDE runs
  L-BFGS in chunks of `iter_per_step` iterations (1000 by default) with its state kept
  across chunks; it is set to `--check-every` so that the error is checked as often
  as under Adam (a chunk boundary does not change the iterates).
- `pinnsketch_exact`, `pinnsketch_lowrank`: the problem at pinnsketch's defaults
  (`ps.solve(problem, storage=...)`; Burgers: 32 x 4 tanh, 6000 + 200 + 200 points
  with residual-based refinement, 5000 Adam + 5000 L-BFGS iterations).
- `pinnsketch_fast`: the setting recommended for speed to these targets (`FAST`,
  chosen from measurements recorded in benchmarks/README.md).

Burgers for pinnsketch is the library's `pinnsketch.problems.burgers.Burgers`. Allen-Cahn
is DeepXDE's example PDE written through pinnsketch's public API (`AllenCahnDeepXDE`).

Reference solutions (computed before the clock starts, never read from files):
Burgers: the Cole-Hopf solution on DeepXDE's 256 x 100 grid (x in [-1, 1], t = 0,
0.01, ..., 0.99), the same grid and values as DeepXDE's Burgers.npz. Allen-Cahn:
DeepXDE's Allen_Cahn.mat is not available here, so the reference is computed by
`allen_cahn_etdrk4(x, t, eps=0.001)` on a 512 x 201 grid (x in [-1, 1], t = 0, 0.005,
..., 1, the size of Allen_Cahn.mat). That solver is periodic; the initial value
x^2 cos(pi x) is even, so the periodic solution is the Neumann one, and u = -1 is a
fixed point of the reaction, so its value at x = +-1 stays close to the example's
Dirichlet u(+-1, t) = -1 (the periodic extension has a kink there that diffusion
lifts inside a boundary layer of width ~sqrt(d t); `boundary_gap` in the JSON is the
largest |u(+-1, t) + 1| of the reference).

Measurement: every `--check-every` iterations (Adam steps + L-BFGS iterations) both
systems evaluate the relative L2 error ||u_pred - u_ref|| / ||u_ref|| on the
reference grid; the first check at or below a target records the process CPU time
(`seconds`, time.process_time, one torch thread: the figure to compare on a shared
machine), the wall time (`wall_seconds`) and the iterations since the start of
training (the clock starts before the collocation points and the network are built;
the evaluations are inside it for both systems). A run stops at the last target,
at the end of its own iteration budget, or after `--max-seconds` CPU seconds;
the end of training counts as a check too; targets not reached then have seconds =
null (`stopped_by`: targets, budget, max_seconds, or interrupted: a worker killed from
outside keeps the checks it saved). `ratio` = DeepXDE seconds / pinnsketch seconds per
target (CPU; `wall_ratio` the same for wall time).

    python benchmarks/time_to_accuracy.py --problems burgers                 # all systems
    python benchmarks/time_to_accuracy.py --problems burgers --quick          # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "time_to_accuracy.json"
PROBLEMS = ("burgers", "allen_cahn")
SYSTEMS = ("deepxde", "pinnsketch_exact", "pinnsketch_lowrank", "pinnsketch_fast")

BURGERS_NU = 0.01 / math.pi
ALLEN_CAHN_D = 0.001

# DeepXDE's example settings: points, Adam iterations (then L-BFGS at DeepXDE's defaults).
DEEPXDE = {
    "burgers": {"domain": 2540, "boundary": 80, "initial": 160, "adam": 15000, "lr": 1e-3, "t_end": 0.99},
    "allen_cahn": {"domain": 8000, "boundary": 400, "initial": 800, "adam": 40000, "lr": 1e-3, "t_end": 1.0},
}

# The recommended fast setting per problem (keyword arguments of ps.solve besides the
# problem and callbacks; ("Name", kwargs) builds ps.Name(**kwargs)), chosen from short
# measurements on Burgers (benchmarks/README.md, "Time to accuracy"): exact storage and
# a short Adam phase (2000 steps, the cosine schedule compressed accordingly) before
# L-BFGS, keeping the default network, points and refinement. DeepXDE's smaller network
# and point set with a short Adam phase stalled in L-BFGS at 4e-2 to 0.2.
FAST = {
    "burgers": dict(storage="exact", adam=("Adam", dict(steps=2000))),
    "allen_cahn": dict(storage="exact", adam=("Adam", dict(steps=2000))),
}

# --quick: tiny budgets for the smoke test (schema, both code paths), not a measurement.
QUICK = {"adam": 60, "lbfgs": 20, "check_every": 20}


# --- references --------------------------------------------------------------------------
def burgers_reference() -> tuple[np.ndarray, np.ndarray]:
    """DeepXDE's Burgers grid: x (25600, 2) rows (x_i, t_j) at i * 100 + j, u (25600, 1)."""
    from pinnsketch.problems.burgers import Burgers

    return Burgers().reference()


def allen_cahn_reference() -> tuple[np.ndarray, np.ndarray, float]:
    """x (102912, 2) on 512 x 201 (rows (x_i, t_j) at i * 201 + j), u (102912, 1), boundary gap."""
    from pinnsketch.problems._grid import tensor_grid
    from pinnsketch.problems.allen_cahn import allen_cahn_etdrk4

    x, t = np.linspace(-1.0, 1.0, 512), np.linspace(0.0, 1.0, 201)
    u = allen_cahn_etdrk4(x, t, eps=ALLEN_CAHN_D)
    gap = float(np.abs(u[[0, -1], :] + 1.0).max())
    return tensor_grid(x, t), u.reshape(-1, 1), gap


def reference(problem: str) -> tuple[np.ndarray, np.ndarray, dict]:
    if problem == "burgers":
        x, u = burgers_reference()
        return x, u, {"grid": [256, 100]}
    x, u, gap = allen_cahn_reference()
    return x, u, {"grid": [512, 201], "boundary_gap": gap}


# --- the tracker both systems report to ---------------------------------------------------
class Tracker:
    """First CPU/wall time and iteration at which the error reaches each target.

    `check(iteration, l2)` records targets newly reached and returns True when the run
    should stop (all targets reached, or the CPU budget spent).
    """

    def __init__(self, targets, max_seconds: float, on_check=None):
        self.on_check = on_check  # called after every check (the worker saves partial results)
        self.targets = sorted(targets, reverse=True)
        self.max_seconds = max_seconds
        self.hits: dict[float, dict] = {}
        self.checks: list[tuple[int, float, float]] = []  # (iteration, cpu s, l2)
        self.cpu0 = self.wall0 = None
        self.budget_spent = False

    def start(self) -> None:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def over_budget(self) -> bool:
        self.budget_spent = self.budget_spent or self.cpu() > self.max_seconds
        return self.budget_spent

    def done(self) -> bool:
        return len(self.hits) == len(self.targets)

    def check(self, iteration: int, l2: float) -> bool:
        cpu, wall = self.cpu(), time.perf_counter() - self.wall0
        self.checks.append((iteration, cpu, l2))
        for target in self.targets:
            if target not in self.hits and l2 <= target:
                self.hits[target] = {"seconds": cpu, "wall_seconds": wall, "iterations": iteration, "l2": l2}
        if self.on_check is not None:
            self.on_check()
        return self.done() or self.over_budget()

    def records(self, final_l2: float, iterations: int, interrupted: bool = False) -> list[dict]:
        """One record per target; `interrupted`: the run was cut off after its last check."""
        stopped_by = "targets" if self.done() else (
            "max_seconds" if self.budget_spent else ("interrupted" if interrupted else "budget"))
        out = []
        for target in self.targets:
            hit = self.hits.get(target)
            out.append({
                "target": target,
                "seconds": hit["seconds"] if hit else None,
                "wall_seconds": hit["wall_seconds"] if hit else None,
                "iterations": hit["iterations"] if hit else None,
                "l2_at_target": hit["l2"] if hit else None,
                "final_l2": final_l2,
                "iterations_run": iterations,
                "cpu_seconds_run": self.cpu(),
                "stopped_by": stopped_by,
            })
        return out


def l2_error(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(pred - ref) / np.linalg.norm(ref))


# --- DeepXDE -------------------------------------------------------------------------------
def run_deepxde(problem: str, opts, x_ref, u_ref, tracker: Tracker) -> tuple[dict, float, int]:
    os.environ["DDE_BACKEND"] = "pytorch"
    import deepxde as dde
    import torch

    setup = dict(DEEPXDE[problem])
    adam_iters = QUICK["adam"] if opts.quick else setup["adam"]
    dde.config.set_random_seed(opts.seed)

    class Check(dde.callbacks.Callback):
        """Evaluates the error when the iteration count crosses a multiple of --check-every."""

        def __init__(self):
            super().__init__()
            self.last = 0

        def on_batch_end(self):
            it = self.model.train_state.iteration
            if it // opts.check_every > self.last // opts.check_every:
                self.last = it
                if tracker.check(it, l2_error(self.model.predict(x_ref), u_ref)):
                    self.model.stop_training = True
            elif tracker.over_budget():
                self.model.stop_training = True

    tracker.start()
    geom = dde.geometry.GeometryXTime(dde.geometry.Interval(-1, 1), dde.geometry.TimeDomain(0, setup["t_end"]))
    net = dde.nn.FNN([2] + [20] * 3 + [1], "tanh", "Glorot normal")
    if problem == "burgers":
        def pde(x, y):
            dy_x = dde.grad.jacobian(y, x, i=0, j=0)
            dy_t = dde.grad.jacobian(y, x, i=0, j=1)
            dy_xx = dde.grad.hessian(y, x, i=0, j=0)
            return dy_t + y * dy_x - BURGERS_NU * dy_xx

        bc = dde.icbc.DirichletBC(geom, lambda x: 0, lambda _, on_boundary: on_boundary)
        ic = dde.icbc.IC(geom, lambda x: -np.sin(np.pi * x[:, 0:1]), lambda _, on_initial: on_initial)
        conditions = [bc, ic]
    else:
        def pde(x, y):
            dy_t = dde.grad.jacobian(y, x, i=0, j=1)
            dy_xx = dde.grad.hessian(y, x, i=0, j=0)
            return dy_t - ALLEN_CAHN_D * dy_xx - 5 * (y - y**3)

        def output_transform(x, y):
            return x[:, 0:1] ** 2 * torch.cos(np.pi * x[:, 0:1]) + x[:, 1:2] * (1 - x[:, 0:1] ** 2) * y

        net.apply_output_transform(output_transform)
        conditions = []
    data = dde.data.TimePDE(geom, pde, conditions, num_domain=setup["domain"], num_boundary=setup["boundary"],
                            num_initial=setup["initial"])
    model = dde.Model(data, net)
    check = Check()
    model.compile("adam", lr=setup["lr"])
    model.train(iterations=adam_iters, callbacks=[check], verbose=0)
    lbfgs = dde.optimizers.config.LBFGS_options
    if opts.quick:
        dde.optimizers.set_LBFGS_options(maxiter=QUICK["lbfgs"])
    # check as often as under Adam; L-BFGS keeps its state across these chunks
    lbfgs["iter_per_step"] = min(opts.check_every, lbfgs["maxiter"])
    lbfgs["fun_per_step"] = lbfgs["maxfun"] * lbfgs["iter_per_step"] // lbfgs["maxiter"]
    if not (tracker.done() or tracker.over_budget()):
        model.compile("L-BFGS")
        model.train(callbacks=[check], verbose=0)
    iterations = model.train_state.iteration
    final = tracker.checks[-1][2] if tracker.checks and tracker.checks[-1][0] == iterations else \
        l2_error(model.predict(x_ref), u_ref)
    settings = {"points": {k: setup[k] for k in ("domain", "boundary", "initial")}, "layers": [2, 20, 20, 20, 1],
                "activation": "tanh", "initializer": "Glorot normal", "adam": {"steps": adam_iters, "lr": setup["lr"]},
                "lbfgs": {k: lbfgs[k] for k in ("maxiter", "maxcor", "ftol", "gtol", "maxls", "iter_per_step")},
                "deepxde": dde.__version__}
    return settings, final, iterations


# --- pinnsketch ----------------------------------------------------------------------------
def allen_cahn_problem(x_ref, u_ref):
    """DeepXDE's Allen-Cahn example (d = 0.001, Dirichlet-like hard constraint) as a ps.Problem."""
    import pinnsketch as ps

    class AllenCahnDeepXDE(ps.Problem):
        """u_t = d u_xx + 5 (u - u^3), d = 0.001, u = x^2 cos(pi x) + t (1 - x^2) N (see the module docstring)."""

        name = "allen_cahn_deepxde"
        domain = ps.geometry.Interval(-1, 1) * ps.geometry.TimeDomain(0, 1)
        conditions = ()
        d = ALLEN_CAHN_D

        def residual(self, x, u):
            return u.t - self.d * u.xx - 5 * (u - u**3)

        def output_transform(self, x, u):
            xs, t = x[:, 0:1], x[:, 1:2]
            return xs**2 * (math.pi * xs).cos() + t * (1 - xs**2) * u

        def reference(self):
            return x_ref.copy(), u_ref.copy()

    return AllenCahnDeepXDE()


def pinnsketch_options(problem: str, system: str, quick: bool) -> dict:
    """Keyword arguments of ps.solve for `system` (None entries: pinnsketch's defaults)."""
    import pinnsketch as ps

    if system == "pinnsketch_fast":
        opts = {k: (getattr(ps, v[0])(**v[1]) if isinstance(v, tuple) else v) for k, v in FAST[problem].items()}
    else:
        opts = {"storage": system.removeprefix("pinnsketch_")}
    if quick:
        opts["adam"] = ps.Adam(steps=QUICK["adam"], lr=opts["adam"].lr if "adam" in opts else 1e-3)
        opts["lbfgs"] = ps.LBFGS(steps=QUICK["lbfgs"])
        opts.setdefault("points", ps.Points(domain=500, boundary=50, initial=50))
    return opts


def run_pinnsketch(problem: str, system: str, opts, x_ref, u_ref, tracker: Tracker) -> tuple[dict, float, int]:
    import pinnsketch as ps

    if problem == "burgers":
        from pinnsketch.problems.burgers import Burgers

        pde = Burgers()
        pde.reference()  # fills the instance's cache before the clock starts
    else:
        pde = allen_cahn_problem(x_ref, u_ref)

    class Check(ps.Callback):
        def on_step(self, state):
            if state.l2_relative_error is not None:
                if tracker.check(state.step, state.l2_relative_error):
                    state.stop_training = True
            elif tracker.over_budget():
                state.stop_training = True

    kwargs = pinnsketch_options(problem, system, opts.quick)
    tracker.start()
    result = ps.solve(pde, **kwargs, seed=opts.seed, device="cpu", eval_every=opts.check_every, progress=False,
                      callbacks=[Check()])
    config = result.config
    settings = {k: config.get(k) for k in ("network", "storage", "adam", "lbfgs", "points", "dtype", "derivatives")}
    return settings, result.l2_relative_error, int(config["steps_done"])


# --- driver --------------------------------------------------------------------------------
def worker(opts) -> int:
    """One (problem, system) run in this process; writes its JSON to --worker-out."""
    import torch

    torch.set_num_threads(1)
    x_ref, u_ref, ref_info = reference(opts.problem)

    def write(settings, final_l2, iterations, complete):
        payload = {"problem": opts.problem, "system": opts.system, "device": "cpu",
                   "threads": torch.get_num_threads(), "settings": settings, "reference": ref_info,
                   "complete": complete, "records": tracker.records(final_l2, iterations, interrupted=not complete),
                   "checks": [{"iteration": i, "seconds": s, "l2": e} for i, s, e in tracker.checks]}
        tmp = Path(opts.worker_out + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(opts.worker_out)

    # after every check: a run cut off (killed, out of time) still reports what it reached
    tracker = Tracker(opts.targets, opts.max_seconds,
                      on_check=lambda: write(None, tracker.checks[-1][2], tracker.checks[-1][0], False))
    if opts.system == "deepxde":
        settings, final_l2, iterations = run_deepxde(opts.problem, opts, x_ref, u_ref, tracker)
    else:
        settings, final_l2, iterations = run_pinnsketch(opts.problem, opts.system, opts, x_ref, u_ref, tracker)
    if final_l2 is not None and (not tracker.checks or tracker.checks[-1][0] != iterations):
        tracker.check(iterations, final_l2)  # the end of training is a check too (off the --check-every grid)
    write(settings, final_l2, iterations, True)
    return 0


def ratios(runs: list[dict], earlier: list[dict], check_every: int) -> list[dict]:
    """DeepXDE seconds / pinnsketch seconds per (problem, pinnsketch system, target).

    The DeepXDE run is this invocation's, else the latest non-quick one in `earlier` (the
    entries already in the output file, latest first) with the same check interval;
    `deepxde_from` names that entry's finishing time.
    """
    out = []
    for problem in dict.fromkeys(r["problem"] for r in runs):
        base, source = next(((r, "this run") for r in runs if r["problem"] == problem and r["system"] == "deepxde"),
                            (None, None))
        for entry in reversed(earlier):
            if base is not None:
                break
            if entry.get("quick") or entry.get("check_every") != check_every:
                continue
            base = next((r for r in entry["runs"] if r["problem"] == problem and r["system"] == "deepxde"), None)
            source = entry.get("finished_utc")
        if base is None:
            continue
        targets = {b["target"]: b for b in base["records"]}
        for other in (r for r in runs if r["problem"] == problem and r["system"] != "deepxde"):
            for o in other["records"]:
                b = targets.get(o["target"])
                if b is None:
                    continue
                both = b["seconds"] is not None and o["seconds"] is not None
                out.append({"problem": problem, "system": other["system"], "target": o["target"],
                            "ratio": b["seconds"] / o["seconds"] if both else None,
                            "wall_ratio": b["wall_seconds"] / o["wall_seconds"] if both else None,
                            "deepxde_from": source})
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--problems", nargs="+", choices=PROBLEMS, default=["burgers"])
    cli.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    cli.add_argument("--targets", nargs="+", type=float, default=[1e-2, 5e-3])
    cli.add_argument("--check-every", type=int, default=250, help="iterations between error checks (default 250)")
    cli.add_argument("--max-seconds", type=float, default=3600.0, help="CPU-second budget per run (default 3600)")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the whole path")
    cli.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file the runs are appended to")
    cli.add_argument("--worker", nargs=2, metavar=("PROBLEM", "SYSTEM"), help=argparse.SUPPRESS)
    cli.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = cli.parse_args(argv)
    if opts.check_every < 1 or opts.max_seconds <= 0 or any(not 0 < t < 1 for t in opts.targets):
        cli.error(f"--check-every {opts.check_every} must be >= 1, --max-seconds {opts.max_seconds} > 0 and "
                  f"--targets {opts.targets} in (0, 1)")
    if opts.quick:
        opts.check_every = min(opts.check_every, QUICK["check_every"])
    if opts.worker:
        opts.problem, opts.system = opts.worker
        return worker(opts)

    import torch

    from pinnsketch.data.bench import cpu_model, git_commit, jsonable

    entry = {
        "benchmark": "time_to_accuracy",
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(argv),
        "commit": git_commit(),  # before the runs: the code they ran
        "torch": torch.__version__,
        "deepxde": __import__("importlib.metadata").metadata.version("deepxde"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "device": "cpu",
        "quick": opts.quick,
        "check_every": opts.check_every,
        "max_seconds": opts.max_seconds,
        "seed": opts.seed,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "id": f"{time.time():.6f}-{os.getpid()}",
        "runs": [],
    }
    child = [a for a in argv if a != "--quick"] + (["--quick"] if opts.quick else [])
    for problem in opts.problems:
        for system in opts.systems:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run.json"
                env = dict(os.environ, DDE_BACKEND="pytorch")
                env.setdefault("MPLCONFIGDIR", str(Path(tmp) / "mpl"))
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child,
                                       "--worker", problem, system, "--worker-out", str(out)], env=env)
                if not out.exists():
                    print(f"{problem} / {system}: worker failed (exit {proc.returncode})", file=sys.stderr)
                    return proc.returncode or 1
                run = json.loads(out.read_text())
                if proc.returncode != 0:  # cut off: keep its checks up to then, marked incomplete
                    print(f"{problem} / {system}: worker ended early (exit {proc.returncode}); "
                          "saving its results up to its last check", file=sys.stderr)
            entry["runs"].append(run)
            for r in run["records"]:
                sec = "not reached" if r["seconds"] is None else f"{r['seconds']:.1f} s cpu, {r['iterations']} it"
                print(f"{problem:10s} {system:19s} target {r['target']:.0e}: {sec} (final L2 {r['final_l2']:.3e})",
                      file=sys.stderr)
            save(Path(opts.out), entry, jsonable)  # after every run: a long invocation keeps what finished
    for r in entry["ratios"]:
        if r["ratio"] is not None:
            print(f"{r['problem']:10s} {r['system']:19s} target {r['target']:.0e}: DeepXDE / pinnsketch CPU "
                  f"{r['ratio']:.2f}x (wall {r['wall_ratio']:.2f}x)", file=sys.stderr)
    return 0


def save(path: Path, entry: dict, jsonable) -> None:
    """Insert or update `entry` (by its id) in the JSON file, with its ratios, under a lock
    (several invocations may share one file)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {"benchmark": "time_to_accuracy", "entries": []}
        others = [e for e in data["entries"] if e.get("id") != entry["id"]]
        entry["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry["ratios"] = ratios(entry["runs"], others, entry["check_every"])
        data["entries"] = [*others, jsonable(entry)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        tmp.replace(path)

if __name__ == "__main__":
    sys.exit(main())
