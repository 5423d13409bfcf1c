"""The PDE library under `exact` and `lowrank` storage: error, time, activation memory.

Question: does every library problem reach its tolerance with its default
settings, and what do sketched activations (`lowrank`) cost in accuracy and
save in memory against `exact`, on the same seed?

For each problem (`pinnsketch problems`) and storage policy, one `solve` with the
problem's defaults. Each record holds what ran and what came out: the network
(`Network.config()`), the training options (Adam, L-BFGS, points, loss weights),
steps done, wall time, ms per Adam / L-BFGS step, relative L2 error against the
reference, the problem's tolerance and whether it was met, peak bytes autograd saved
for backward and the step's peak live bytes (MemoryMeter), and on lowrank records
the error and memory ratios to exact. Results go to benchmarks/results/pinn_suite.json
(with the command, commit, torch version and CPU model) and a Markdown table is printed.

    OMP_NUM_THREADS=1 python benchmarks/pinn_suite.py                      # full defaults (hours on CPU)
    python benchmarks/pinn_suite.py --problems burgers,heat --device cuda
    python benchmarks/pinn_suite.py --problems heat,poisson_corner --quick --out /tmp/suite.json   # smoke run
    python benchmarks/pinn_suite.py --problems burgers --seed 1 --runs /tmp/runs   # + run files (history, events)
    python benchmarks/pinn_suite.py --from-runs kg_exact.h5 kg_lowrank.h5 --out /tmp/suite.json
    python benchmarks/pinn_suite.py --seed-summary benchmarks/results/pinn_suite.json   # lowrank/exact per seed

`--from-runs` makes the records from finished run files of `pinnsketch solve PROBLEM --storage S --out
FILE` instead of solving (a suite split over processes or machines): the same fields, with the
per-phase times from the run's wall clock (evaluations included), and `at_defaults` saying whether the
run's network, training and point options were the problem's defaults.

`--seed-summary` reads a results file and tabulates, per problem, the errors of every seed that ran
at today's defaults and lowrank/exact per seed and as a geometric mean: one seed's ratio moves with
where its L-BFGS phase meets float32's noise floor (Burgers: 1.58, 0.92 and 0.78 over three seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

#: --quick: steps per phase for a smoke run that shows the script works (not the tolerances).
QUICK_STEPS = {"adam": 200, "lbfgs": 20}

#: The training options copied from each run's config into its record (the rest stays under "config").
OPTION_KEYS = ("network", "adam", "lbfgs", "points", "loss_weights", "dtype", "device", "derivatives", "seed")


def run_one(name: str, storage: str, opts) -> dict:
    """One default solve of problem `name` under `storage`, as a JSON-able record."""
    from pinnsketch import problems
    from pinnsketch.pinn.solver import problem_defaults, solve

    problem = problems.get(name)
    base = problem_defaults(problem)
    kwargs = {"storage": storage, "seed": opts.seed, "device": opts.device, "progress": False}
    if opts.steps is not None:
        kwargs["adam"] = dataclasses.replace(base["adam"], steps=opts.steps)
    if opts.lbfgs_steps is not None:
        kwargs["lbfgs"] = dataclasses.replace(base["lbfgs"], steps=opts.lbfgs_steps)
    shape = {k: v for k, v in (("width", opts.width), ("depth", opts.depth)) if v is not None}
    if shape:  # a candidate default network, recorded in the record's options like any other
        kwargs["network"] = dataclasses.replace(base["network"], **shape)
    start = time.perf_counter()
    record = {"problem": name, "storage": storage, "tolerance": getattr(problem, "tolerance", None)}
    try:
        result = solve(problem, **kwargs)
    except Exception as exc:  # a failing problem is a result too; the table names the error
        record.update(error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - start)
        return record
    wall_s = time.perf_counter() - start
    if opts.runs is not None:  # the run file: loss history, L-BFGS stop and storage events, for diagnosis
        from pinnsketch import save

        record["run_file"] = str(save(result, Path(opts.runs) / f"{name}_{storage}_s{opts.seed}.h5"))
    tol, l2 = record["tolerance"], result.l2_relative_error
    record.update(
        l2_relative_error=l2,
        l2_per_field=result.l2_per_field,
        passed=None if tol is None or l2 is None else bool(l2 <= tol),
        wall_s=wall_s,
        adam_steps=result.timing["adam_steps"],
        lbfgs_steps=result.timing["lbfgs_steps"],
        adam_ms_per_step=result.timing["adam_ms_per_step"],
        lbfgs_ms_per_step=result.timing["lbfgs_ms_per_step"],
        lbfgs_stop=result.history.get("lbfgs_stop"),
        precision=result.history.get("precision"),
        saved_bytes_peak=result.saved_bytes_peak,
        step_peak_bytes=result.step_peak_bytes,
        parameters=result.parameters,
        options={key: result.config.get(key) for key in OPTION_KEYS},
        config=result.config,
    )
    return record


def record_from_run(path: str) -> dict:
    """The record of `run_one` from a finished run file of `pinnsketch solve --out` (see the module docstring)."""
    import numpy as np

    from pinnsketch import load, problems
    from pinnsketch.pinn.solver import problem_defaults

    run = load(path)
    if not run.completed:
        raise SystemExit(f"--from-runs {path}: the run did not finish (status {run.attrs.get('status')!r}); "
                         "resume it with `pinnsketch solve --resume FILE` first")
    if run.attrs.get("kind") != "pinn" or run.problem not in problems.names():
        raise SystemExit(f"--from-runs {path}: not a run of a library problem (problem {run.problem!r})")
    problem = problems.get(run.problem)
    steps, phase, wall = run.training["step"], run.training["phase"], run.training["wall_time_s"]
    adam_rows = np.flatnonzero(phase == "adam")
    adam_steps = int(steps[adam_rows[-1]]) if adam_rows.size else 0
    adam_wall = float(wall[adam_rows[-1]]) if adam_rows.size else 0.0
    lbfgs_steps = run.steps - adam_steps
    tol, l2 = getattr(problem, "tolerance", None), run.l2_relative_error
    per_field = {k.split("/", 1)[1]: float(v[~np.isnan(v)][-1]) for k, v in run.training.items()
                 if k.startswith("l2_per_output/") and (~np.isnan(v)).any()}
    return {
        "problem": run.problem, "storage": run.storage, "tolerance": tol,
        "l2_relative_error": l2, "l2_per_field": per_field or None,
        "passed": None if tol is None or l2 is None else bool(l2 <= tol),
        "wall_s": run.wall_time_s, "adam_steps": adam_steps, "lbfgs_steps": lbfgs_steps,
        "adam_ms_per_step": 1e3 * adam_wall / adam_steps if adam_steps else None,
        "lbfgs_ms_per_step": (1e3 * (run.wall_time_s - adam_wall) / lbfgs_steps
                              if lbfgs_steps and run.wall_time_s is not None else None),
        "lbfgs_stop": run.summary()["lbfgs_stop"], "precision": _precision(run), "saved_bytes_peak": run.saved_bytes_peak, "step_peak_bytes": run.step_peak_bytes,
        "parameters": run.config.get("parameters") or {},
        "options": {key: run.config.get(key) for key in OPTION_KEYS}, "config": run.config,
        "run_file": str(path), "at_defaults": at_defaults(run.problem, run.config),
        "source": "run file of `pinnsketch solve --out`; per-phase ms from its wall clock (evaluations included)",
    }


def _precision(run) -> dict | None:
    """history["precision"] of a run file (L-BFGS' float64 continuations), from its final checkpoint."""
    from pinnsketch import RunFileError

    try:
        return run.checkpoint()["history"].get("precision")
    except (RunFileError, KeyError):  # a file without a readable checkpoint: not recorded
        return None


def at_defaults(name: str, config: dict) -> bool:
    """Whether a run's network, training and point options (its `config`) are problem `name`'s defaults today."""
    from pinnsketch import problems
    from pinnsketch.pinn.solver import problem_defaults

    defaults = {k: (v.config() if hasattr(v, "config") else v) for k, v in problem_defaults(problems.get(name)).items()}
    if isinstance(config.get("lbfgs"), dict) and isinstance(defaults.get("lbfgs"), dict):
        # a record from before LBFGS' float64 continuation ran at the defaults of its time
        defaults["lbfgs"] = {k: v for k, v in defaults["lbfgs"].items()
                             if not k.startswith("float64") or k in config["lbfgs"]}
    return all(json.dumps(config.get(k), sort_keys=True) == json.dumps(defaults.get(k), sort_keys=True)
               for k in ("network", "adam", "lbfgs", "points", "loss_weights"))


def seed_summary(records: list[dict]) -> list[dict]:
    """Per problem, the `exact` and `lowrank` errors of every seed run at today's defaults (float32, the
    policies' default options) and the lowrank/exact ratio per seed and as a geometric mean over the seeds
    that ran both. A later record of the same problem, storage and seed replaces an earlier one."""
    from pinnsketch import problems

    latest: dict[tuple, dict] = {}
    for r in records:
        config = r.get("config") or {}
        if ("error" in r or r.get("storage") not in ("exact", "lowrank") or r.get("problem") not in problems.names()
                or r.get("l2_relative_error") is None or config.get("dtype", "float32") != "float32"
                or not at_defaults(r["problem"], config)):
            continue
        latest[(r["problem"], r["storage"], config.get("seed", 0))] = r
    rows = []
    for name in sorted({p for p, _, _ in latest}):
        tol = getattr(problems.get(name), "tolerance", None)
        seeds = sorted({seed for p, _, seed in latest if p == name})
        l2 = {s: {seed: latest[(name, s, seed)]["l2_relative_error"] for seed in seeds if (name, s, seed) in latest}
              for s in ("exact", "lowrank")}
        ratios = {seed: l2["lowrank"][seed] / l2["exact"][seed] for seed in seeds
                  if seed in l2["exact"] and seed in l2["lowrank"] and l2["exact"][seed] > 0}
        mean = math.exp(sum(math.log(v) for v in ratios.values()) / len(ratios)) if ratios else None
        misses = {s: sorted(seed for seed, v in l2[s].items() if tol is not None and v > tol) for s in l2}
        float64 = {s: sorted(seed for seed in seeds if (name, s, seed) in latest
                             and (latest[(name, s, seed)].get("precision") or {}).get("dtype"))
                   for s in ("exact", "lowrank")}
        rows.append({"problem": name, "tolerance": tol, "seeds": seeds, "l2": l2, "ratio": ratios,
                     "ratio_geometric_mean": mean, "misses": misses, "float64": float64})
    return rows


def seed_table(rows: list[dict]) -> str:
    """Markdown of `seed_summary`: one row per problem; * marks a run whose L-BFGS went on in float64."""
    def per_seed(values: dict, spec: str, marked=()) -> str:
        return ", ".join(f"{seed}: {format(v, spec)}{'*' if seed in marked else ''}"
                         for seed, v in sorted(values.items())) or "-"

    lines = ["| problem | tol | seeds | L2 exact | L2 lowrank | lowrank/exact per seed | geometric mean | misses |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        misses = "; ".join(f"{s} seed {', '.join(map(str, v))}" for s, v in r["misses"].items() if v) or "none"
        lines.append(f"| {r['problem']} | {_fmt(r['tolerance'], 'g')} | {', '.join(map(str, r['seeds']))} | "
                     f"{per_seed(r['l2']['exact'], '.2e', r['float64']['exact'])} | "
                     f"{per_seed(r['l2']['lowrank'], '.2e', r['float64']['lowrank'])} | "
                     f"{per_seed(r['ratio'], '.2f')} | {_fmt(r['ratio_geometric_mean'], '.2f')} | {misses} |")
    return "\n".join(lines)


def add_ratios(records: list[dict]) -> None:
    """Give each lowrank record its error and memory relative to exact's on the same problem (None if unknown)."""
    exact = {r["problem"]: r for r in records if r["storage"] == "exact"}
    for r in records:
        if r["storage"] != "lowrank":
            continue
        e = exact.get(r["problem"], {})
        for key, ratio_key in (("l2_relative_error", "l2_ratio_to_exact"), ("saved_bytes_peak", "saved_ratio_to_exact"),
                               ("step_peak_bytes", "step_peak_ratio_to_exact")):
            r[ratio_key] = r[key] / e[key] if e.get(key) and r.get(key) is not None else None


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _mib(value) -> str:
    return _fmt(None if value is None else value / 2**20, ".2f")


def table(records: list[dict]) -> str:
    """Markdown: one row per problem, each storage's steps, error, time and memory side by side."""
    by = {(r["problem"], r["storage"]): r for r in records}
    names = sorted({r["problem"] for r in records})
    storages = list(dict.fromkeys(r["storage"] for r in records))
    head = ["problem", "tol", "network", "steps Adam+L-BFGS"]
    for s in storages:
        head += [f"L2 {s}", f"time {s} (s)", f"saved {s} (MiB)", f"step peak {s} (MiB)"]
    both = {"exact", "lowrank"} <= set(storages)
    if both:
        head += ["L2 lowrank/exact", "saved lowrank/exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        first = next(by[(name, s)] for s in storages if (name, s) in by)
        net = (first.get("options") or {}).get("network") or {}
        arch = f"{net['width']}x{net['depth']} {net['activation']}" if {"width", "depth", "activation"} <= set(net) else "-"
        steps = "/".join(dict.fromkeys(
            f"{by[(name, s)]['adam_steps']}+{by[(name, s)]['lbfgs_steps']}" for s in storages
            if "adam_steps" in by.get((name, s), {})
        )) or "-"
        row = [name, _fmt(first.get("tolerance"), "g"), arch, steps]
        for s in storages:
            r = by.get((name, s), {})
            if "error" in r:
                row += [f"error: {r['error'][:40]}", _fmt(r.get("wall_s"), ".0f"), "-", "-"]
                continue
            mark = "" if r.get("passed") in (None, True) else " (miss)"
            row += [_fmt(r.get("l2_relative_error"), ".2e") + mark, _fmt(r.get("wall_s"), ".0f"),
                    _mib(r.get("saved_bytes_peak")), _mib(r.get("step_peak_bytes"))]
        if both:
            lr = by.get((name, "lowrank"), {})
            row += [_fmt(lr.get("l2_ratio_to_exact"), ".2f"), _fmt(lr.get("saved_ratio_to_exact"), ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _names(values: list[str] | None) -> list[str] | None:
    """--problems as given: space- and/or comma-separated names."""
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def main(argv=None) -> int:
    from pinnsketch import problems

    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--problems", nargs="+", default=None, metavar="NAME",
                     help="problems to run, e.g. burgers,heat or burgers heat (default: the whole library)")
    cli.add_argument("--storages", nargs="+", default=["exact", "lowrank"], metavar="POLICY")
    cli.add_argument("--quick", action="store_true",
                     help=f"smoke run: {QUICK_STEPS['adam']} Adam + {QUICK_STEPS['lbfgs']} L-BFGS steps per "
                          "problem (the tolerances are for the defaults, so expect misses)")
    cli.add_argument("--steps", type=int, default=None, help="override every problem's Adam steps")
    cli.add_argument("--lbfgs-steps", type=int, default=None, help="override every problem's L-BFGS steps")
    cli.add_argument("--width", type=int, default=None, help="override every problem's network width")
    cli.add_argument("--depth", type=int, default=None, help="override every problem's network depth")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--device", default="auto")
    cli.add_argument("--out", default=str(HERE / "results" / "pinn_suite.json"))
    cli.add_argument("--from-runs", nargs="+", default=None, metavar="FILE",
                     help="make the records from these finished run files (pinnsketch solve --out) instead of solving")
    cli.add_argument("--runs", default=None, metavar="DIR",
                     help="also write each solve's HDF5 run file to DIR/<problem>_<storage>_s<seed>.h5")
    cli.add_argument("--seed-summary", default=None, metavar="JSON",
                     help="print the per-seed lowrank/exact table of the records in JSON (e.g. "
                          "results/pinn_suite.json) at today's defaults, and solve nothing")
    opts = cli.parse_args(argv)
    if opts.seed_summary is not None:
        path = Path(opts.seed_summary)
        try:
            records = json.loads(path.read_text())["records"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            cli.error(f"--seed-summary {path}: not a pinn_suite results file with 'records' ({exc})")
        print(seed_table(seed_summary(records)))
        return 0
    for flag, value in (("--steps", opts.steps), ("--lbfgs-steps", opts.lbfgs_steps)):
        if value is not None and value < 0:
            cli.error(f"{flag} {value} must be >= 0 (0 skips the phase)")
    for flag, value in (("--width", opts.width), ("--depth", opts.depth)):
        if value is not None and value < 1:
            cli.error(f"{flag} {value} must be >= 1")
    if opts.quick:
        opts.steps = QUICK_STEPS["adam"] if opts.steps is None else opts.steps
        opts.lbfgs_steps = QUICK_STEPS["lbfgs"] if opts.lbfgs_steps is None else opts.lbfgs_steps
    names = _names(opts.problems) or problems.names()
    unknown = sorted(set(names) - set(problems.names()))
    if unknown:
        cli.error(f"unknown problems {unknown}; choose from {problems.names()}")

    from pinnsketch.data.bench import cpu_model, git_commit, jsonable

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "pinn_suite",
        "command": "python benchmarks/pinn_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget": "quick" if opts.quick else ("each problem's defaults" if opts.steps is None and opts.lbfgs_steps is None
                                              else f"Adam {opts.steps}, L-BFGS {opts.lbfgs_steps} (overrides)"),
        "network_override": {"width": opts.width, "depth": opts.depth},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "machine": platform.machine(), "cpu": cpu_model(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "commit": git_commit(), "records": [],
    }
    jobs = ([(None, None, path) for path in opts.from_runs] if opts.from_runs
            else [(name, storage, None) for name in names for storage in opts.storages])
    if opts.from_runs:
        payload["budget"] = "as recorded in each run file"
    for name, storage, path in jobs:
        record = run_one(name, storage, opts) if path is None else record_from_run(path)
        name, storage = record["problem"], record["storage"]
        payload["records"].append(record)
        add_ratios(payload["records"])
        l2 = record.get("l2_relative_error")
        print(f"{name:20s} {storage:10s} L2 {_fmt(l2, '.3e'):>10s}  {record['wall_s']:7.1f} s"
              + (f"  {record['error']}" if "error" in record else ""), file=sys.stderr, flush=True)
        # rewrite after every run so an interrupted suite keeps what it measured
        out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    print(table(payload["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
