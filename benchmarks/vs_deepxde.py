"""pinnsketch against DeepXDE on the same Burgers set-up, interleaved in one process.

Question: is a pinnsketch Adam iteration (forward-mode jets through fused blocks,
first-order backward) faster than DeepXDE's (nested autograd, pytorch backend), and
do both reach the same error after the same number of iterations?

Set-up (DeepXDE's Burgers example): x in [-1, 1], t in [0, 0.99], nu = 0.01/pi,
2540 interior / 80 boundary / 160 initial Hammersley points, a [2] + [20]*3 + [1]
tanh network with Glorot-normal weights, Adam at lr 1e-3, no L-BFGS. The error is
the relative L2 error on DeepXDE's 256 x 100 evaluation grid, from pinnsketch's own
Cole-Hopf reference (`pinnsketch.problems.burgers.Burgers().reference()`) or from
`--reference FILE.npz` (DeepXDE's Burgers.npz layout: x (256, 1), t (100, 1),
usol (256, 100)).

Timing: every system (DeepXDE and each pinnsketch variant) trains in its own
thread, and a baton lets exactly one of them run at a time: after its untimed set-up
and `--warmup` iterations, each runs `--block` iterations per turn, in a fixed order,
round after round, until `--iterations`. A block's wall time (CUDA: synchronized at
both ends) and the thread's CPU time are taken while it holds the baton, so the
systems see the same machine load block by block; the speedup of a variant is the
median over rounds of DeepXDE's block time over the variant's (`speedup*` keys,
each DeepXDE's time per iteration over pinnsketch's). Both libraries run their
whole training loop with their own per-step bookkeeping; the hand-over happens in a
per-step callback of each.

Variants (`VARIANTS`): name -> keyword arguments of `pinnsketch.solve`. A variant
whose arguments this `solve` does not accept (e.g. `compile=True` before the solver
has it) is listed under `variants_absent` and has no speedup key.

    python benchmarks/vs_deepxde.py --iterations 2000                 # CPU, one thread
    python benchmarks/vs_deepxde.py --quick                           # 300 iterations
    python benchmarks/vs_deepxde.py --device cuda --iterations 1000 --out benchmarks/results/vs_deepxde_cuda.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
NU = 0.01 / math.pi
SETUP = {"domain": 2540, "boundary": 80, "initial": 160, "layers": [2, 20, 20, 20, 1], "activation": "tanh",
         "optimizer": "adam", "lr": 1e-3}

#: pinnsketch variant -> keyword arguments of `pinnsketch.solve` (besides the common set-up).
VARIANTS: dict[str, dict] = {
    "exact": {"storage": "exact"},
    "lowrank": {"storage": "lowrank"},
    "compiled": {"storage": "exact", "compile": True},
    "compiled_lowrank": {"storage": "lowrank", "compile": True},
}
#: variant -> its key in the results (DeepXDE's time per iteration over the variant's).
SPEEDUP_KEYS = {"exact": "speedup", "lowrank": "speedup_lowrank", "compiled": "speedup_compiled",
                "compiled_lowrank": "speedup_compiled_lowrank"}


class Aborted(RuntimeError):
    """Another participant failed; the benchmark stops."""


class Baton:
    """One turn at a time for named participants, in a fixed order, round after round.

    A participant holds the baton from `wait` until `pass_on` (or `leave`, when it
    is done); the next turn goes to the next participant in order that has not left.
    `abort` wakes every waiting participant with `Aborted`.
    """

    def __init__(self, names: list[str]):
        self._order = list(names)
        self._active = set(names)
        self._turn = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None

    def wait(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self._order[self._turn] == name)
            if self._error is not None:
                raise Aborted(f"{name}: stopped because another participant failed") from self._error

    def pass_on(self, name: str) -> None:
        with self._cond:
            self._next(name)

    def leave(self, name: str) -> None:
        with self._cond:
            self._active.discard(name)
            self._next(name)

    def abort(self, error: BaseException) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()

    def _next(self, name: str) -> None:
        if self._order[self._turn] != name or not self._active:
            self._cond.notify_all()
            return
        for _ in range(len(self._order)):
            self._turn = (self._turn + 1) % len(self._order)
            if self._order[self._turn] in self._active:
                break
        self._cond.notify_all()


class BlockClock:
    """Per-iteration hook of one participant: hands the baton over between timed blocks.

    `after(done)` is called with the number of iterations done so far (0 before the
    first). At `warmup` the participant's untimed set-up ends; then every `block`
    iterations it records the block's wall and CPU time and hands over. After the
    last block it keeps the baton until it leaves (its final evaluation is untimed
    and runs alone).
    """

    def __init__(self, name: str, baton: Baton, warmup: int, block: int, rounds: int, sync: Callable[[], None]):
        self.name, self.baton, self.warmup, self.block, self.rounds, self.sync = name, baton, warmup, block, rounds, sync
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    @property
    def total(self) -> int:
        return self.warmup + self.block * self.rounds

    def after(self, done: int) -> None:
        if done < self.warmup or (done - self.warmup) % self.block:
            return
        k = (done - self.warmup) // self.block
        if k > 0:
            self.sync()
            self.wall.append(time.perf_counter() - self._t0)
            self.cpu.append(time.thread_time() - self._c0)
        if k >= self.rounds:
            return
        self.baton.pass_on(self.name)
        self.baton.wait(self.name)
        self.sync()
        self._t0, self._c0 = time.perf_counter(), time.thread_time()


def reference(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation points (25600, 2) and u (25600, 1) on DeepXDE's Burgers grid."""
    if path is None:
        from pinnsketch.problems.burgers import Burgers

        x, u = Burgers().reference()
        return np.asarray(x, dtype=np.float64), np.asarray(u, dtype=np.float64).reshape(-1, 1)
    data = np.load(path)
    missing = {"x", "t", "usol"} - set(data.files)
    if missing:
        raise ValueError(f"--reference {path} lacks the arrays {sorted(missing)}; it needs x (nx, 1), t (nt, 1) "
                         "and usol (nx, nt) as in DeepXDE's Burgers.npz")
    x, t, usol = data["x"].ravel(), data["t"].ravel(), data["usol"]
    if usol.shape != (x.size, t.size):
        raise ValueError(f"--reference {path}: usol has shape {usol.shape}, expected (len(x), len(t)) = "
                         f"({x.size}, {t.size})")
    X, T = np.meshgrid(x, t, indexing="ij")
    return np.stack([X.ravel(), T.ravel()], axis=1), usol.reshape(-1, 1).astype(np.float64)


def l2(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(pred - ref) / np.linalg.norm(ref))


def deepxde_burgers_model(seed: int):
    """DeepXDE's Burgers example (`SETUP`) through its own API, compiled for Adam: a `dde.Model`.

    DeepXDE places its tensors on torch's default device, which is per thread: set it first.
    """
    import deepxde as dde

    dde.config.set_random_seed(seed)
    geom = dde.geometry.GeometryXTime(dde.geometry.Interval(-1, 1), dde.geometry.TimeDomain(0, 0.99))

    def pde(x, y):
        dy_x = dde.grad.jacobian(y, x, i=0, j=0)
        dy_t = dde.grad.jacobian(y, x, i=0, j=1)
        dy_xx = dde.grad.hessian(y, x, i=0, j=0)
        return dy_t + y * dy_x - NU * dy_xx

    bc = dde.icbc.DirichletBC(geom, lambda x: 0, lambda _, on_boundary: on_boundary)
    ic = dde.icbc.IC(geom, lambda x: -np.sin(np.pi * x[:, 0:1]), lambda _, on_initial: on_initial)
    data = dde.data.TimePDE(geom, pde, [bc, ic], num_domain=SETUP["domain"], num_boundary=SETUP["boundary"],
                            num_initial=SETUP["initial"])
    model = dde.Model(data, dde.nn.FNN(SETUP["layers"], SETUP["activation"], "Glorot normal"))
    model.compile("adam", lr=SETUP["lr"])
    return model


def run_deepxde(clock: BlockClock, seed: int, device: torch.device, x_ref, u_ref) -> dict:
    import deepxde as dde

    # DeepXDE places its tensors on torch's default device, which is per thread: this one only.
    torch.set_default_device(device)
    model = deepxde_burgers_model(seed)

    class Turns(dde.callbacks.Callback):
        def on_train_begin(self):
            self.start = self.model.train_state.step
            clock.after(0)

        def on_batch_end(self):
            clock.after(self.model.train_state.step - self.start)

    model.train(iterations=clock.total, display_every=10**9, verbose=0, callbacks=[Turns()])
    return {"l2": l2(model.predict(x_ref), u_ref)}


def deepxde_burgers_problem(x_ref=None, u_ref=None):
    """Burgers on DeepXDE's example domain (t up to 0.99) as a pinnsketch problem; its reference
    (x_ref (N, 2), u_ref (N, 1)) when given."""
    import pinnsketch as ps
    from pinnsketch.pinn import geometry as G

    class Burgers(ps.Problem):
        name = "burgers-deepxde-setup"
        domain = G.Interval(-1, 1) * G.TimeDomain(0, 0.99)
        conditions = [ps.Dirichlet(0.0), ps.Initial(lambda x: -torch.sin(math.pi * x[:, 0]))]

        def residual(self, x, u):
            return u.t + u * u.x - NU * u.xx

        if x_ref is not None:
            def reference(self):
                return x_ref, u_ref

    return Burgers()


def run_pinnsketch(clock: BlockClock, options: dict, seed: int, device: torch.device, x_ref, u_ref) -> dict:
    import pinnsketch as ps

    class Turns(ps.Callback):
        def on_start(self, state):
            clock.after(state.step)

        def on_step(self, state):
            clock.after(state.step)

    width, depth = SETUP["layers"][1], len(SETUP["layers"]) - 2
    result = ps.solve(
        deepxde_burgers_problem(x_ref, u_ref), network=ps.Network(width=width, depth=depth, activation=SETUP["activation"]),
        adam=ps.Adam(steps=clock.total, lr=SETUP["lr"], schedule="constant"), lbfgs=ps.LBFGS(steps=0),
        points=ps.Points(domain=SETUP["domain"], boundary=SETUP["boundary"], initial=SETUP["initial"],
                         sampler="hammersley"),
        seed=seed, device=str(device), eval_every=10**9, progress=False, callbacks=[Turns()], **options,
    )
    return {"l2": result.l2_relative_error, "saved_bytes_peak": result.saved_bytes_peak}


def available_variants(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split `names` into variants this `pinnsketch.solve` supports and the others, with the reason."""
    import pinnsketch as ps

    accepted = inspect.signature(ps.solve).parameters
    ok, absent = [], {}
    for name in names:
        unknown = sorted(set(VARIANTS[name]) - set(accepted))
        if unknown:
            absent[name] = f"pinnsketch.solve has no {', '.join(unknown)} option in this tree"
        else:
            ok.append(name)
    return ok, absent


def device_name(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"gpu_name": torch.cuda.get_device_name(device)}
    from pinnsketch.data.bench import cpu_model

    return {"cpu_model": cpu_model()}


def interleave(opts, variants: list[str], device: torch.device, x_ref, u_ref) -> dict:
    """Run DeepXDE and every variant in turns; per participant: clock and result (or error)."""
    names = ["deepxde", *variants]
    baton = Baton(names)
    rounds = opts.iterations // opts.block
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    clocks = {n: BlockClock(n, baton, opts.warmup, opts.block, rounds, sync) for n in names}
    results: dict[str, dict] = {}
    errors: dict[str, BaseException] = {}

    def participant(name: str) -> None:
        try:
            baton.wait(name)
            if name == "deepxde":
                results[name] = run_deepxde(clocks[name], opts.seed, device, x_ref, u_ref)
            else:
                results[name] = run_pinnsketch(clocks[name], VARIANTS[name], opts.seed, device, x_ref, u_ref)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors[name] = exc
            baton.abort(exc)
        finally:
            baton.leave(name)

    threads = [threading.Thread(target=participant, args=(n,), name=f"vs_deepxde-{n}") for n in names]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    first = next((e for e in errors.values() if not isinstance(e, Aborted)), None)
    if first is not None:
        raise first
    return {n: (clocks[n], results[n]) for n in names}


def summarize(runs: dict, block: int) -> dict:
    dde_clock, dde = runs["deepxde"]
    out = {"deepxde_ms_per_iter": 1e3 * statistics.median(dde_clock.wall) / block,
           "deepxde_cpu_ms_per_iter": 1e3 * statistics.median(dde_clock.cpu) / block,
           "deepxde_l2": dde["l2"], "pinnsketch": {}}
    for name, (clock, res) in runs.items():
        if name == "deepxde":
            continue
        ratios = [d / p for d, p in zip(dde_clock.wall, clock.wall)]
        cpu_ratios = [d / p for d, p in zip(dde_clock.cpu, clock.cpu) if p > 0]
        speedup = statistics.median(ratios)
        out[SPEEDUP_KEYS[name]] = speedup
        out["pinnsketch"][name] = {
            "solve_options": VARIANTS[name], "speedup": speedup,
            "speedup_cpu": statistics.median(cpu_ratios) if cpu_ratios else None,
            "block_ratio_quartiles": [float(q) for q in np.percentile(ratios, [25, 50, 75])],
            "ms_per_iter": 1e3 * statistics.median(clock.wall) / block,
            "cpu_ms_per_iter": 1e3 * statistics.median(clock.cpu) / block,
            "l2": res["l2"], "l2_ratio_to_deepxde": res["l2"] / dde["l2"],
            "saved_bytes_peak": res["saved_bytes_peak"],
        }
    if "exact" in out["pinnsketch"]:
        out["pinnsketch_ms_per_iter"] = out["pinnsketch"]["exact"]["ms_per_iter"]
        out["pinnsketch_l2"] = out["pinnsketch"]["exact"]["l2"]
    return out


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--iterations", type=int, default=2000, help="timed Adam iterations per system (default 2000)")
    cli.add_argument("--warmup", type=int, default=50, help="untimed iterations before timing (default 50)")
    cli.add_argument("--block", type=int, default=50, help="iterations per system per turn (default 50)")
    cli.add_argument("--quick", action="store_true", help="--iterations 300 --warmup 20 --block 25")
    cli.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                     help=f"pinnsketch variants (default all: {', '.join(VARIANTS)})")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; both libraries use it")
    cli.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's)")
    cli.add_argument("--reference", default=None, metavar="FILE.npz",
                     help="Burgers reference with x, t, usol (default: pinnsketch's Cole-Hopf reference)")
    cli.add_argument("--out", default=str(HERE / "results" / "vs_deepxde.json"))
    opts = cli.parse_args(argv)
    if opts.quick:
        opts.iterations, opts.warmup, opts.block = 300, 20, 25
    if opts.block < 1 or opts.iterations < opts.block or opts.warmup < 0 or opts.threads < 0:
        cli.error(f"need --block >= 1, --iterations >= --block, --warmup >= 0, --threads >= 0; got "
                  f"block={opts.block}, iterations={opts.iterations}, warmup={opts.warmup}, threads={opts.threads}")
    from pinnsketch.data.bench import benchmark_device

    try:
        device = benchmark_device(opts.device)
    except ValueError as err:
        cli.error(str(err))
    if opts.reference is not None and not Path(opts.reference).is_file():
        cli.error(f"--reference {opts.reference}: no such file")
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    x_ref, u_ref = reference(opts.reference)
    variants, absent = available_variants(opts.variants)
    rounds = opts.iterations // opts.block
    print(f"interleaving deepxde, {', '.join(variants)}: {rounds} rounds of {opts.block} iterations "
          f"after {opts.warmup} warm-up, {device}", file=sys.stderr)
    summary = summarize(interleave(opts, variants, device, x_ref, u_ref), opts.block)

    import deepxde

    from pinnsketch.data.bench import git_commit, jsonable

    payload = {
        "benchmark": "vs_deepxde",
        "command": "python benchmarks/vs_deepxde.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing": "interleaved blocks, median of per-block ratios",
        "iterations": rounds * opts.block, "warmup": opts.warmup, "block": opts.block, "rounds": rounds,
        **summary,
        "variants_absent": absent,
        "reference": opts.reference or "pinnsketch.problems.burgers.Burgers().reference() (Cole-Hopf)",
        "setup": {**SETUP, "seed": opts.seed},
        "device": str(device), **device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "deepxde": deepxde.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "commit": git_commit(),
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    print(f"deepxde      {summary['deepxde_ms_per_iter']:8.3f} ms/iter  L2 {summary['deepxde_l2']:.3e}", file=sys.stderr)
    for name, rec in summary["pinnsketch"].items():
        print(f"{name:<12} {rec['ms_per_iter']:8.3f} ms/iter  L2 {rec['l2']:.3e}  speedup {rec['speedup']:.2f} "
              f"(quartiles {', '.join(f'{q:.2f}' for q in rec['block_ratio_quartiles'])})", file=sys.stderr)
    for name, why in absent.items():
        print(f"{name:<12} absent: {why}", file=sys.stderr)
    print(json.dumps({k: payload[k] for k in payload if k.startswith("speedup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
