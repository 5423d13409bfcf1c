"""Network options: accuracy after a fixed budget, and what the storage policies still save.

Question 1 (`--part accuracy`): on the library's `allen_cahn` (periodic in x) and `burgers`,
what relative L2 error does each `ps.Network` option reach after the same small budget
(exact storage, one thread, the same seed, points and optimizer steps), against the plain
MLP of the same width and depth measured in the same run?

Variants (width W, depth D from the flags; the plain MLP is the baseline):
  mlp         ps.Network(W, D)
  fourier     + ps.Fourier(features=W, scale=--fourier-scale)
  periodic    + periodic={"x": 2.0}          (allen_cahn only: burgers is not periodic)
  factorized  + ps.Factorized()              (mean 1, std 0.1)
  modified    architecture="modified"
  pirate      architecture="pirate", depth max(1, D // 2) residual blocks, + Fourier features
  all         pirate + Fourier + factorized (+ periodic on allen_cahn)

Question 2 (`--part memory`): bytes autograd saves for backward (`MemoryMeter` peak, one
forward of the Burgers residual's jet u, u_x, u_t, u_xx at --memory-points points) for each
architecture under `exact` and `lowrank`; `saving` = 1 - lowrank / exact, and
`saving_vs_mlp` = that saving over the plain MLP's (how much of the MLP's saving remains).

    python benchmarks/network_options.py --part memory
    python benchmarks/network_options.py --part accuracy --problems burgers --adam 2000 --lbfgs 300
    python benchmarks/network_options.py --part accuracy --quick        # smoke test, seconds

Results: `results/network_options_<part>.json` (one entry per invocation, appended).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def variants(problem: str, width: int, depth: int, fourier_scale: float) -> dict:
    import pinnsketch as ps

    fourier = ps.Fourier(features=width, scale=fourier_scale)
    periodic = {"x": 2.0} if problem == "allen_cahn" else None
    out = {
        "mlp": ps.Network(width=width, depth=depth),
        "fourier": ps.Network(width=width, depth=depth, fourier=fourier),
        "factorized": ps.Network(width=width, depth=depth, factorized=True),
        "modified": ps.Network(width=width, depth=depth, architecture="modified"),
        "pirate": ps.Network(width=width, depth=max(1, depth // 2), architecture="pirate", fourier=fourier),
        "all": ps.Network(width=width, depth=max(1, depth // 2), architecture="pirate", fourier=fourier,
                          factorized=True, periodic=periodic),
    }
    if periodic:
        out["periodic"] = ps.Network(width=width, depth=depth, periodic=periodic)
    return out


def accuracy(opts) -> list[dict]:
    import pinnsketch as ps
    from pinnsketch import problems

    records = []
    for name in opts.problems:
        problem = problems.get(name)
        problem.reference()          # computed (or cached) before any clock starts
        for label, network in variants(name, opts.width, opts.depth, opts.fourier_scale).items():
            if opts.variants and label not in opts.variants:
                continue
            start = time.process_time()
            try:
                result = ps.solve(problem, network=network, storage="exact", seed=opts.seed,
                                  adam=ps.Adam(steps=opts.adam), lbfgs=ps.LBFGS(steps=opts.lbfgs),
                                  points=ps.Points(domain=opts.points, refine=None), eval_every=opts.adam or 1,
                                  progress=False)
                l2, error = result.l2_relative_error, None
            except FloatingPointError as err:
                l2, error = None, str(err)
            record = {"problem": name, "variant": label, "network": network.config(), "l2": l2,
                      "cpu_seconds": round(time.process_time() - start, 1), "error": error}
            records.append(record)
            print(json.dumps(record), flush=True)
    for name in opts.problems:
        base = next((r["l2"] for r in records if r["problem"] == name and r["variant"] == "mlp"), None)
        for r in records:
            if r["problem"] == name and base and r["l2"]:
                r["l2_over_mlp"] = round(r["l2"] / base, 3)
    return records


def memory(opts) -> list[dict]:
    import torch

    from pinnsketch.nn import MLP, JetSpec, MemoryMeter, ModifiedMLP, PirateNet

    spec = JetSpec(2, [(0,), (1,), (0, 0)])
    x = torch.rand(opts.memory_points, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w, d = opts.width, opts.depth
    fourier = {"features": w, "scale": opts.fourier_scale}
    models = {
        "mlp": lambda s: MLP(2, 1, w, d, storage=s),
        "mlp+fourier": lambda s: MLP(2, 1, w, d, storage=s, fourier=fourier),
        "mlp+factorized": lambda s: MLP(2, 1, w, d, storage=s, factorized=(1.0, 0.1)),
        "modified": lambda s: ModifiedMLP(2, 1, w, d, storage=s),
        "pirate+fourier": lambda s: PirateNet(2, 1, w, max(1, d // 2), storage=s, fourier=fourier),
    }
    records = []
    for label, make in models.items():
        row = {"network": label}
        for storage in ("exact", "lowrank"):
            model = make(storage)
            for _ in range(2):               # the second step is metered (lowrank's rank has adapted once)
                with MemoryMeter() as meter:
                    out = model.jet(x, spec).streams
                out.square().sum().backward()
                model.advance()
            row[f"{storage}_bytes"] = meter.peak_bytes
            row["blocks"] = len(model.blocks)
        row["saving"] = round(1 - row["lowrank_bytes"] / row["exact_bytes"], 3)
        records.append(row)
        print(json.dumps(row), flush=True)
    base = records[0]["saving"]
    for r in records:
        r["saving_vs_mlp"] = round(r["saving"] / base, 3)
    return records


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--part", choices=("accuracy", "memory"), required=True)
    cli.add_argument("--problems", nargs="+", default=["allen_cahn", "burgers"])
    cli.add_argument("--variants", nargs="+", default=None, help="run only these variants")
    cli.add_argument("--width", type=int, default=32)
    cli.add_argument("--depth", type=int, default=4)
    cli.add_argument("--fourier-scale", type=float, default=2.0)
    cli.add_argument("--adam", type=int, default=2000)
    cli.add_argument("--lbfgs", type=int, default=300)
    cli.add_argument("--points", type=int, default=4000)
    cli.add_argument("--memory-points", type=int, default=8192)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--quick", action="store_true", help="a few steps, to check the script runs")
    opts = cli.parse_args(argv)
    if opts.quick:
        opts.adam, opts.lbfgs, opts.points, opts.memory_points = 5, 2, 256, 512

    import torch

    from pinnsketch.data.bench import cpu_model, git_commit

    torch.set_num_threads(1)
    entry = {
        "benchmark": f"network_options_{opts.part}",
        "command": "python benchmarks/network_options.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "device": "cpu",
        "threads": 1,
        "quick": opts.quick,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": {k: v for k, v in vars(opts).items() if k != "part"},
    }
    entry["records"] = accuracy(opts) if opts.part == "accuracy" else memory(opts)
    if not opts.quick:
        path = RESULTS / f"network_options_{opts.part}.json"
        data = json.loads(path.read_text()) if path.exists() else []
        data.append(entry)
        path.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
