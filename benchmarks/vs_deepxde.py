"""pinnsketch against DeepXDE on the same Burgers set-up, side by side in one process.

Question: is a pinnsketch Adam iteration (forward-mode jets through fused
blocks, first-order backward) faster than DeepXDE's (nested autograd,
pytorch backend), and do both reach the same error after the same number of
iterations?

Set-up (DeepXDE's Burgers example): x in [-1, 1], t in [0, 0.99], nu = 0.01/pi,
2540 interior / 80 boundary / 160 initial Hammersley points, a [2] + [20]*3 + [1]
tanh network with Glorot-normal weights, Adam at lr 1e-3, no L-BFGS. The error is
the relative L2 error on the 256 x 100 grid of /work/shared/data/burgers_deepxde.npz
(or, without that file, pinnsketch's Cole-Hopf reference on the same grid).
Timing: wall time of `--iterations` steps after `--warmup` steps, per iteration,
including each library's own per-step bookkeeping (`*_ms_per_iter`, `speedup`), and
the main thread's CPU time over the same steps (`*_cpu_ms_per_iter`, `speedup_cpu`),
which a busy shared machine inflates less; pinnsketch uses `exact` storage
(DeepXDE has no sketching), with the default `lowrank` reported next to it. Both
libraries run on one thread (`--threads`, default 1: the tensors are small).

Allocator: glibc's malloc, by default, hands blocks above its mmap threshold back to
the operating system when freed and takes them again, page fault by page fault, on
the next step. pinnsketch's stacked jets (S x N x width, here 4 x 2780 x 20 floats)
are large enough for this to cost a measurable part of a step. `--malloc both` (the
default) first times both libraries with the allocator untouched, then raises glibc's
trim and mmap thresholds (`mallopt`, the same as the environment variables
MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_) for the whole process and times
both again; the top-level keys report the untouched allocator, `allocator_tuned`
the second pair.

    python benchmarks/vs_deepxde.py                                      # 5000 iterations
    python benchmarks/vs_deepxde.py --iterations 300 --warmup 20         # quick check
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED = Path("/work/shared/data/burgers_deepxde.npz")
NU = 0.01 / math.pi


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc only): M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD 32 MiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def reference() -> tuple[np.ndarray, np.ndarray]:
    """Evaluation points (25600, 2) and u (25600, 1) on DeepXDE's Burgers grid."""
    if SHARED.exists():
        data = np.load(SHARED)
        x, t, u = data["x"][:, 0], data["t"][:, 0], data["usol"]
    else:
        from pinnsketch.problems.burgers import cole_hopf

        x, t = np.linspace(-1, 1, 256), np.linspace(0, 0.99, 100)
        u = cole_hopf(x[:, None], t[None, :], NU)
    X, T = np.meshgrid(x, t, indexing="ij")
    return np.stack([X.ravel(), T.ravel()], axis=1), u.reshape(-1, 1)


def l2(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(pred - ref) / np.linalg.norm(ref))


def run_deepxde(iterations: int, warmup: int, seed: int, x_ref, u_ref) -> dict:
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    device = torch.get_default_device()
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
    data = dde.data.TimePDE(geom, pde, [bc, ic], num_domain=2540, num_boundary=80, num_initial=160)
    net = dde.nn.FNN([2] + [20] * 3 + [1], "tanh", "Glorot normal")
    model = dde.Model(data, net)
    model.compile("adam", lr=1e-3)
    model.train(iterations=warmup, display_every=10**9, verbose=0)
    start, cpu_start = time.perf_counter(), time.thread_time()
    model.train(iterations=iterations, display_every=10**9, verbose=0)
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    pred = model.predict(x_ref)
    torch.set_default_device(None if device.type == "cpu" else device)  # undo deepxde's import-time switch
    return {"ms_per_iter": 1e3 * elapsed / iterations, "cpu_ms_per_iter": 1e3 * cpu / iterations,
            "l2": l2(pred, u_ref)}


def run_pinnsketch(iterations: int, warmup: int, seed: int, storage: str, device: str, x_ref, u_ref) -> dict:
    import pinnsketch.pinn as pp
    from pinnsketch.pinn import geometry as G

    class Burgers(pp.Problem):
        name = "burgers-deepxde-setup"
        domain = G.Interval(-1, 1) * G.TimeDomain(0, 0.99)
        conditions = [pp.Dirichlet(0.0), pp.Initial(lambda x: -torch.sin(math.pi * x[:, 0]))]

        def residual(self, x, u):
            return u.t + u * u.x - NU * u.xx

        def reference(self):
            return x_ref, u_ref

    class CpuClock(pp.Callback):
        """Main-thread CPU time of the timed steps (robust to a shared machine; one torch thread)."""

        start = end = None

        def on_step(self, state):
            if state.step == warmup:
                self.start = time.thread_time()
            elif state.step == total:
                self.end = time.thread_time()

    total = warmup + iterations
    clock = CpuClock()
    if not warmup:
        clock.start = time.thread_time()  # includes the solver's set-up
    result = pp.solve(
        Burgers(), network=pp.Network(width=20, depth=3, activation="tanh"), storage=storage,
        adam=pp.Adam(steps=total, lr=1e-3, schedule="constant"), lbfgs=pp.LBFGS(steps=0),
        points=pp.Points(domain=2540, boundary=80, initial=160, sampler="hammersley"),
        seed=seed, device=device, eval_every=10**9, progress=False, callbacks=[clock],
    )
    wall = result.history["wall_time_s"]
    elapsed = wall[total - 1] - wall[warmup - 1] if warmup else wall[total - 1]
    return {"ms_per_iter": 1e3 * elapsed / iterations, "cpu_ms_per_iter": 1e3 * (clock.end - clock.start) / iterations,
            "l2": result.l2_relative_error, "saved_bytes_peak": result.saved_bytes_peak}


def _pair(opts, x_ref, u_ref, label: str) -> tuple[dict, dict]:
    dde = run_deepxde(opts.iterations, opts.warmup, opts.seed, x_ref, u_ref)
    print(f"[{label}] deepxde     {dde['ms_per_iter']:8.3f} ms/iter  (cpu {dde['cpu_ms_per_iter']:.3f})  "
          f"L2 {dde['l2']:.3e}", file=sys.stderr)
    ps = run_pinnsketch(opts.iterations, opts.warmup, opts.seed, "exact", opts.device, x_ref, u_ref)
    print(f"[{label}] pinnsketch  {ps['ms_per_iter']:8.3f} ms/iter  (cpu {ps['cpu_ms_per_iter']:.3f})  "
          f"L2 {ps['l2']:.3e}  (exact)  speedup {dde['ms_per_iter'] / ps['ms_per_iter']:.2f} "
          f"(cpu {dde['cpu_ms_per_iter'] / ps['cpu_ms_per_iter']:.2f})", file=sys.stderr)
    return dde, ps


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--iterations", type=int, default=5000, help="timed Adam iterations (default 5000)")
    cli.add_argument("--warmup", type=int, default=50, help="untimed iterations before timing (default 50)")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--device", default="cpu", help="cpu (default) or cuda; both libraries use it")
    cli.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both (default 1; 0: torch's)")
    cli.add_argument("--malloc", choices=("both", "default", "tuned"), default="both",
                     help="glibc allocator: untouched, tuned (see the module docstring), or both in turn (default)")
    cli.add_argument("--no-lowrank", action="store_true", help="skip the extra pinnsketch lowrank run")
    cli.add_argument("--out", default=str(HERE / "results" / "vs_deepxde.json"))
    opts = cli.parse_args(argv)
    if opts.iterations < 1 or opts.warmup < 0 or opts.threads < 0:
        cli.error("--iterations must be >= 1, --warmup >= 0 and --threads >= 0")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device != "cpu":
        torch.set_default_device(opts.device)  # DeepXDE builds its tensors on the default device
    x_ref, u_ref = reference()

    tuned = None
    if opts.malloc == "tuned" and not tune_malloc():
        cli.error("--malloc tuned needs glibc's mallopt")
    dde, ps = _pair(opts, x_ref, u_ref, "tuned" if opts.malloc == "tuned" else "default malloc")
    low = None
    if not opts.no_lowrank:
        low = run_pinnsketch(opts.iterations, opts.warmup, opts.seed, "lowrank", opts.device, x_ref, u_ref)
        print(f"pinnsketch  {low['ms_per_iter']:8.3f} ms/iter  (cpu {low['cpu_ms_per_iter']:.3f})  "
              f"L2 {low['l2']:.3e}  (lowrank)", file=sys.stderr)
    if opts.malloc == "both" and tune_malloc():
        dde_t, ps_t = _pair(opts, x_ref, u_ref, "tuned malloc")
        tuned = {"deepxde_ms_per_iter": dde_t["ms_per_iter"], "pinnsketch_ms_per_iter": ps_t["ms_per_iter"],
                 "speedup": dde_t["ms_per_iter"] / ps_t["ms_per_iter"],
                 "deepxde_cpu_ms_per_iter": dde_t["cpu_ms_per_iter"],
                 "pinnsketch_cpu_ms_per_iter": ps_t["cpu_ms_per_iter"],
                 "speedup_cpu": dde_t["cpu_ms_per_iter"] / ps_t["cpu_ms_per_iter"],
                 "deepxde_l2": dde_t["l2"], "pinnsketch_l2": ps_t["l2"],
                 "mallopt": {"M_TRIM_THRESHOLD": 1 << 30, "M_MMAP_THRESHOLD": 32 << 20}}

    from pinnsketch.data.bench import git_commit, jsonable

    payload = {
        "benchmark": "vs_deepxde",
        "command": "python benchmarks/vs_deepxde.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "iterations": opts.iterations,
        "warmup": opts.warmup,
        "malloc": "tuned" if opts.malloc == "tuned" else "default",
        "deepxde_ms_per_iter": dde["ms_per_iter"],
        "pinnsketch_ms_per_iter": ps["ms_per_iter"],
        "speedup": dde["ms_per_iter"] / ps["ms_per_iter"],
        "deepxde_l2": dde["l2"],
        "pinnsketch_l2": ps["l2"],
        "deepxde_cpu_ms_per_iter": dde["cpu_ms_per_iter"],
        "pinnsketch_cpu_ms_per_iter": ps["cpu_ms_per_iter"],
        "speedup_cpu": dde["cpu_ms_per_iter"] / ps["cpu_ms_per_iter"],
        "pinnsketch_storage": "exact",
        "pinnsketch_saved_bytes_peak": ps["saved_bytes_peak"],
        "pinnsketch_lowrank": low,
        "allocator_tuned": tuned,
        "setup": {"domain": 2540, "boundary": 80, "initial": 160, "layers": [2, 20, 20, 20, 1],
                  "activation": "tanh", "optimizer": "adam", "lr": 1e-3, "seed": opts.seed},
        "device": opts.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepxde": __import__("deepxde").__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "commit": git_commit(),
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    summary = {k: payload[k] for k in ("deepxde_ms_per_iter", "pinnsketch_ms_per_iter", "speedup",
                                         "deepxde_l2", "pinnsketch_l2", "iterations", "speedup_cpu")}
    if tuned is not None:
        summary["speedup_tuned_malloc"] = tuned["speedup"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
