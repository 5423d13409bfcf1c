"""The `pinnsketch` command line: a thin layer over the library.

    pinnsketch problems
    pinnsketch solve burgers --storage lowrank --out burgers.h5
    pinnsketch inspect burgers.h5 | plot burgers.h5 | bench mnist

Each subcommand is a pair of small functions: `add_<name>_parser(subparsers)`
registers its arguments and sets `func`, and the command function takes the
parsed arguments and returns the exit status. Errors print one line,
`pinnsketch: error: ...`, and exit with 2 for bad input (usage, unknown names,
invalid values) or 1 for failures while running; `--debug` re-raises with the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "add_solve_parser", "add_problems_parser", "solve_command", "problems_command",
           "solve_options_from_config"]

PROG = "pinnsketch"


class CommandError(Exception):
    """A failure to report on one line (exit status in `.status`)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (subparsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message}\n")


def _debug_flag(parser: argparse.ArgumentParser, top: bool) -> None:
    """Add `--debug` (the dispatcher adds it to the top parser and to every subcommand)."""
    # SUPPRESS on subcommands, so `pinnsketch --debug solve ...` is not reset by the subparser's default
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="on errors, show the full traceback")


# --- problems ---------------------------------------------------------------------------------
def add_problems_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("problems", help="list the PDE library",
                              description="List the problems `pinnsketch solve` knows, with their tolerances.")
    p.set_defaults(func=problems_command)
    return p


def problems_command(args: argparse.Namespace) -> int:
    from . import problems

    for line in problems.describe():
        print(line)
    return 0


# --- solve ------------------------------------------------------------------------------------
def add_solve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "solve", help="train a PINN on a library problem and report its error",
        description="Train a PINN on PROBLEM (see `pinnsketch problems`) with Adam then L-BFGS, print the "
                    "relative L2 error against the problem's reference, and record the run in --out while it "
                    "trains (checkpoints every --checkpoint-every steps; --resume continues a killed run, "
                    "--from reruns a recorded one). Unset options use the problem's defaults.")
    p.add_argument("problem", nargs="?", default=None,
                   help="problem name, e.g. burgers (taken from the file with --resume and --from)")
    p.add_argument("--storage", default=None, metavar="POLICY",
                   help="activation storage: exact, checkpoint, ema, lowrank (default), projection, with options "
                        "as NAME:KEY=VALUE,... (e.g. lowrank:target=1e-3,r_max=16)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="Adam steps")
    p.add_argument("--lbfgs-steps", type=int, default=None, metavar="M", help="L-BFGS iterations (0 skips)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--points", type=int, default=None, metavar="N", help="interior collocation points")
    p.add_argument("--width", type=int, default=None, help="hidden width of the MLP")
    p.add_argument("--depth", type=int, default=None, help="hidden layers of the MLP")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"), help="default float32")
    p.add_argument("--derivatives", default=None, choices=("jet", "autograd"),
                   help="forward-mode jets (default) or nested autograd")
    p.add_argument("--eval-every", type=int, default=None, metavar="N", help="steps between error evaluations")
    p.add_argument("--out", default=None, metavar="FILE", help="write the run to FILE (HDF5)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .io.commands import add_run_file_arguments

    add_run_file_arguments(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the loss with torch.compile (pays for --storage exact; see solve(compile=))")
    add_distributed_arguments(p)
    p.set_defaults(func=solve_command)
    return p


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of runs launched by torchrun as several processes (ignored in one process)."""
    parser.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                        help="under torchrun: seconds a collective waits for the other ranks before the job fails "
                             "(default 300)")
    parser.add_argument("--dist-check-every", type=int, default=0, metavar="N",
                        help="under torchrun: every N steps check that all ranks hold the same parameters "
                             "(debugging; default 0 = never)")


def distributed_options(args: argparse.Namespace):
    """The `ps.Distributed` options of --dist-timeout / --dist-check-every."""
    from .training.distributed import Distributed

    return Distributed(timeout_s=args.dist_timeout, check_every=args.dist_check_every)


# Flags that change what a run computes (refused with --resume: the file fixes them).
_TRAINING_FLAGS = ("storage", "steps", "lbfgs_steps", "lr", "points", "width", "depth", "seed", "dtype",
                   "derivatives", "eval_every", "from_file", "monitor_rank")


def _solve_options(problem, args: argparse.Namespace, recorded: dict | None = None) -> dict:
    """Keyword arguments of `solve` from the flags, on top of `recorded` (--from) or the problem's defaults."""
    from .pinn.solver import problem_defaults

    base = {**problem_defaults(problem), **(recorded or {})}
    options: dict = dict(recorded or {})

    def updated(key: str, **changes):
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            options[key] = dataclasses.replace(options.get(key, base[key]), **changes)

    updated("adam", steps=args.steps, lr=args.lr)
    updated("lbfgs", steps=args.lbfgs_steps)
    updated("points", domain=args.points)
    if args.width is not None or args.depth is not None:
        if not dataclasses.is_dataclass(base["network"]):
            raise CommandError(f"{problem.name} builds its own network; --width/--depth do not apply", 2)
        updated("network", width=args.width, depth=args.depth)
    for key in ("storage", "seed", "device", "dtype", "derivatives", "eval_every"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _recorded_config(path: str) -> dict:
    import json

    from .io.reader import open_run

    with open_run(path) as f:
        return json.loads(f.attrs.get("config", "{}")), bool(f.attrs.get("completed", False))


def solve_options_from_config(config: dict) -> dict:
    """Keyword arguments of ``pinnsketch.solve`` that rerun a recorded run (the root attribute ``config``).

    The storage is returned as recorded: a policy name or a ``"name:key=value,..."`` spec (parse it
    with ``pinnsketch.data.bench.parse_storage(spec, defaults={})``). Raises ValueError when the run
    cannot be rebuilt from its record (own network module, storage options not recorded).
    """
    from .pinn.causal import Causal
    from .pinn.options import LBFGS, RAR, SCHEDULES, SOAP, Adam, Network, Points
    from .pinn.weighting import GradNormWeights
    from .pinn.windows import TimeWindows

    missing = [k for k in ("problem", "network", "storage", "adam", "lbfgs", "points", "seed") if k not in config]
    if missing:
        raise ValueError(f"the run's configuration lacks {missing}; it was not written by pinnsketch solve")
    network = config["network"]
    if not isinstance(network, dict) or "width" not in network:
        raise ValueError(f"the run trained its own network module {network!r}; rerun it from Python with "
                         "that module")
    recorded = config.get("storage_options")
    if isinstance(recorded, dict) and recorded.get("unrecorded"):
        raise ValueError(f"the run's storage policy options {recorded['unrecorded']} were not recorded "
                         f"(policy {config['storage']!r}); rerun with --storage NAME:KEY=VALUE,...")
    adam = dict(config["adam"])
    schedule = dict(adam.pop("schedule"))
    adam["schedule"] = SCHEDULES[schedule.pop("name")](**schedule)
    adam["betas"] = tuple(adam["betas"])
    first = SOAP if adam.pop("optimizer", "adam") == "soap" else Adam
    points = dict(config["points"])
    points["refine"] = None if points.get("refine") is None else RAR(**points["refine"])
    options = {"network": Network(**network), "storage": config["storage"], "adam": first(**adam),
               "lbfgs": LBFGS(**config["lbfgs"]), "points": Points(**points), "seed": config["seed"],
               "loss_weights": config.get("loss_weights")}
    for key, cls in (("balance", GradNormWeights), ("causal", Causal), ("windows", TimeWindows)):
        recorded_option = dict(config.get(key) or {})
        recorded_option.pop("name", None)
        options[key] = cls(**recorded_option) if config.get(key) else None
    for key in ("dtype", "device", "derivatives", "eval_every", "eval_points"):
        if config.get(key) is not None:
            options[key] = config[key]
    return options


def solve_command(args: argparse.Namespace) -> int:
    from . import problems
    from .data.bench import parse_storage
    from .training.distributed import env_rank
    from .io.commands import run_file_callbacks
    from .io.runfile import check_output_path
    from .pinn.errors import TrainingDivergedError
    from .pinn.solver import problem_defaults, solve

    recorded = None
    source = args.resume or args.from_file
    if args.resume is not None:
        given = [f"--{k.replace('_', '-')}" for k in _TRAINING_FLAGS if getattr(args, k) is not None]
        if given:
            raise CommandError(f"--resume continues {args.resume} with the options recorded in it; leave out "
                               f"{' '.join(given)} (or start a new run with --from {args.resume} --out NEW.h5)", 2)
    if source is not None:
        config, completed = _recorded_config(source)
        if args.resume is not None and completed:
            raise CommandError(f"{args.resume} holds a completed run; nothing to resume (rerun it with "
                               f"--from {args.resume} --out NEW.h5)", 2)
        recorded = solve_options_from_config(config)
        if args.problem is not None and args.problem != config["problem"]:
            raise CommandError(f"{source} is a run of {config['problem']!r}, not {args.problem!r}; leave out "
                               "the problem name", 2)
        args.problem = config["problem"]
    if args.problem is None:
        raise CommandError("the following arguments are required: problem (or --resume FILE / --from FILE)", 2)
    problem = problems.get(args.problem)
    options = _solve_options(problem, args, recorded)
    extra = {}
    spec = args.storage if args.storage is not None else (recorded or {}).get("storage")
    if isinstance(spec, str):
        # one parser for `solve` and `bench`; PINN training keeps the policies' own defaults
        options["storage"] = parse_storage(spec, defaults={})
        extra["storage"] = spec
    out = args.resume if args.resume is not None else args.out
    main_rank = env_rank() == 0          # under torchrun only rank 0 writes the run file and reports
    if out is not None and main_rank:
        check_output_path(out)           # before any training: a folder, an unwritable place, a busy file
    defaults = problem_defaults(problem)
    total = options.get("adam", defaults["adam"]).steps + options.get("lbfgs", defaults["lbfgs"]).steps
    callbacks, state = run_file_callbacks(args, total_steps=total, config=extra)
    try:
        result = solve(problem, progress=not args.no_progress, callbacks=callbacks, resume=state,
                       compile=args.compile, distributed=distributed_options(args), **options)
    except TrainingDivergedError as err:
        where = f"; {out} keeps the history up to step {_err_step(callbacks)} and the last checkpoint" if out else ""
        raise CommandError(f"{str(err).splitlines()[0]}{where}") from err
    if not main_rank:
        return 0
    storage = extra.get("storage", result.config.get("storage"))
    l2 = result.l2_relative_error
    where = f"{result.config['problem']}, storage={storage}, {result.config['steps_done']} steps, {result.timing['total_s']:.1f} s"
    if l2 is None:
        print(f"relative L2 error: n/a (the problem has no reference) [{where}]")
    else:
        print(f"relative L2 error: {l2:.3e} [{where}]")
    if "compile_s" in result.timing:
        t = result.timing
        print(f"compile: {t['compile_s']:.1f} s (not in the steps); Adam {t['adam_ms_per_step']:.2f} ms/step, "
              f"L-BFGS {t['lbfgs_ms_per_step']:.2f} ms/iteration")
    ranks = result.config.get("distributed")
    if ranks:
        peaks = ranks.get("step_peak_bytes_per_rank") or []
        known = [p for p in peaks if p is not None]
        print(f"{ranks['world_size']} ranks ({ranks['backend']}); step peak memory per rank: "
              f"{', '.join('n/a' if p is None else f'{p / 2**20:.2f} MiB' for p in peaks)}"
              + (f" (max {max(known) / 2**20:.2f} MiB)" if known else ""))
    stop = result.history.get("lbfgs_stop")
    if stop:
        print(f"L-BFGS stopped at step {stop['step']}: {stop['reason']} ({stop['detail']})")
    if out is not None:
        print(f"saved to {out}")
    return 0


def _err_step(callbacks) -> str:
    """The step a failed run's writer recorded (for the one-line error)."""
    from .io.reader import load

    for cb in callbacks:
        path = getattr(cb, "path", None)
        if path is not None:
            try:
                return str(load(path).attrs.get("stop_step", "?"))
            except Exception:  # noqa: BLE001 - the message only
                return "?"
    return "?"


# --- dispatcher -------------------------------------------------------------------------------
# Subcommands owned by other modules: (module, function registering the subparser).
_EXTERNAL = (
    ("pinnsketch.io.commands", "add_inspect_parser"),
    ("pinnsketch.io.commands", "add_plot_parser"),
    ("pinnsketch.data.bench", "add_bench_parser"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Physics-informed neural networks with sketched activation storage.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_solve_parser(sub)
    add_problems_parser(sub)
    for module, function in _EXTERNAL:
        getattr(importlib.import_module(module), function)(sub)
    for subparser in sub.choices.values():
        _debug_flag(subparser, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`pinnsketch inspect run.h5 --json | head`): not an error of ours.
        # Point stdout at devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # one line for users; --debug shows everything
        if args.debug:
            raise
        status = exc.status if isinstance(exc, CommandError) else 2 if isinstance(exc, (ValueError, TypeError, KeyError)) else 1
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
