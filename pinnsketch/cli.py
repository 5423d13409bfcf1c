"""The `pinnsketch` command line: a thin layer over the library.

    pinnsketch problems
    pinnsketch solve burgers --storage lowrank --out burgers.h5
    pinnsketch solve allen_cahn --architecture pirate --fourier features=64,scale=2 --periodic x=2 --causal
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
import re
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
    p.add_argument("--width", type=int, default=None, help="hidden width of the network")
    p.add_argument("--depth", type=int, default=None, help="hidden layers of the network (pirate: gated blocks)")
    add_option_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"), help="default float32")
    p.add_argument("--derivatives", default=None, choices=("jet", "autograd"),
                   help="forward-mode jets (default) or nested autograd (keeps every activation: storage exact)")
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


def _keys(cls) -> str:
    """`cls`'s keys with their defaults, for --help: "features=64, scale=1.0, trainable=False"."""
    return ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING)


def _schedules() -> dict:
    """The learning-rate schedules by their command-line names: {"warmup-exponential": WarmupExponential, ...}."""
    from .pinn.options import SCHEDULES

    return {re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__).lower(): cls for cls in SCHEDULES.values()}


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """Network and training options of `solve` (`ps.Network`, `ps.Adam`/`ps.SOAP`, schedules, `ps.LBFGS`,
    `ps.RAR`, `ps.GradNormWeights`, `ps.Causal`) as NAME / KEY=VALUE,... specs, read by `_solve_options`."""
    from .pinn.causal import Causal
    from .pinn.options import ARCHITECTURES, LBFGS, RAR, Factorized, Fourier
    from .pinn.weighting import GradNormWeights

    net = parser.add_argument_group(
        "network options (ps.Network; KEY=VALUE,... as in --storage; 'none' turns an option off)")
    net.add_argument("--architecture", default=None, choices=ARCHITECTURES,
                     help="mlp (default), modified (gated MLP) or pirate (PirateNet: gated residual blocks)")
    net.add_argument("--activation", default=None, help="tanh (default), sin, relu, gelu")
    net.add_argument("--fourier", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                     help=f"random Fourier features, ps.Fourier: {_keys(Fourier)} (e.g. --fourier "
                          "features=128,scale=2; the flag alone: these defaults)")
    net.add_argument("--periodic", default=None, metavar="NAME=PERIOD,...",
                     help="exactly periodic in these inputs, e.g. --periodic x=2 (or x=2,y=1); the period is the "
                          "domain's length along the input")
    net.add_argument("--harmonics", type=int, default=None, metavar="K",
                     help="harmonics of the --periodic embedding (default 1)")
    net.add_argument("--factorized", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                     help=f"random weight factorization, ps.Factorized: {_keys(Factorized)} (the flag alone: "
                          "these defaults)")
    net.add_argument("--chunk-bytes", default=None, metavar="SIZE",
                     help="bytes per row-chunk tensor of a step, e.g. 32MiB: bounds a step's working set (peak "
                          "memory) at the cost of launches; default: the device's (one chunk per call on a GPU); "
                          "'none' restores it")
    train = parser.add_argument_group(
        "training options (KEY=VALUE,... as in --storage; a flag changes only the keys it names; values "
        "not given keep the problem's defaults)")
    train.add_argument("--optimizer", default=None, metavar="NAME[:KEY=VALUE,...]",
                       help="first phase: adam (default) or soap (ps.SOAP, Adam in Shampoo's eigenbasis); keys: "
                            "steps, lr, precondition_every (soap, default 10)")
    schedules = "; ".join(name + (f" ({_keys(c)})" if dataclasses.fields(c) else "")
                          for name, c in _schedules().items())
    train.add_argument("--schedule", default=None, metavar="NAME[:KEY=VALUE,...]",
                       help=f"learning-rate schedule of the first phase: {schedules}; e.g. --schedule "
                            "warmup-exponential:warmup=500")
    train.add_argument("--lbfgs", default=None, metavar="KEY=VALUE,...",
                       help=f"L-BFGS phase, ps.LBFGS: {_keys(LBFGS)} (--lbfgs-steps wins over steps=)")
    train.add_argument("--refine", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                       help=f"residual-based refinement during Adam, ps.RAR: {_keys(RAR)} (the flag alone: these "
                            "defaults; none: off)")
    train.add_argument("--balance", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                       help=f"gradient-norm loss balancing, ps.GradNormWeights: {_keys(GradNormWeights)} (the flag "
                            "alone: these defaults)")
    train.add_argument("--causal", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                       help=f"causal residual weights (time-dependent problems), ps.Causal: {_keys(Causal)} (the "
                            "flag alone: these defaults)")
    train.add_argument("--windows", type=int, default=None, metavar="K",
                       help="time-window marching (time-dependent problems), ps.TimeWindows: K windows trained in "
                            "turn, each with the full --steps/--lbfgs-steps budget")
    train.add_argument("--loss-weights", default=None, metavar="TERM=WEIGHT,...",
                       help="fixed loss weights, e.g. pde=1,initial_u=10 (the term names: `pinnsketch inspect` of "
                            "a run, or result.config['terms'])")


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
_NETWORK_FLAGS = ("width", "depth", "architecture", "activation", "fourier", "periodic", "harmonics", "factorized",
                  "chunk_bytes")
_OPTION_FLAGS = ("optimizer", "schedule", "lbfgs", "refine", "balance", "causal", "windows", "loss_weights")
_TRAINING_FLAGS = ("storage", "steps", "lbfgs_steps", "lr", "points", *_NETWORK_FLAGS, *_OPTION_FLAGS, "seed",
                   "dtype", "derivatives", "eval_every", "from_file", "monitor_rank")
# Flags whose value is optional: `solve --causal allen_cahn` reads the problem name as their value.
_OPTIONAL_VALUE_FLAGS = ("fourier", "factorized", "refine", "balance", "causal")
_TYPES = {"int": int, "float": float, "bool": bool}


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def _from_spec(flag: str, text: str, cls, base=None, keys=None, example: str = "", where: str = ""):
    """A `cls` dataclass from the spec "KEY=VALUE,..." of `flag`: the given keys over `base` (an instance
    of `cls`, else `cls`'s defaults). `keys` limits the keys the flag takes (default: all fields);
    `where` names the spec in errors (default: the flag and `text`)."""
    from .data.bench import parse_key_values

    where = where or f"{flag} {text!r}"
    given = parse_key_values(text, where, f"{flag} {example}")
    fields = {f.name: f for f in dataclasses.fields(cls) if keys is None or f.name in keys}
    unknown = [k for k in given if k not in fields]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; {flag} takes "
                         + (f"{', '.join(fields)} (e.g. {flag} {example})" if fields else "no keys here"))
    for key, value in given.items():     # the field's type, so a bad value is named before any training
        kind = _TYPES.get(getattr(fields[key].type, "__name__", fields[key].type))
        if kind is None or type(value) is kind:
            continue
        if kind is float and type(value) is int:
            given[key] = float(value)
        else:
            raise ValueError(f"{where}: {key}={value!r} must be "
                             f"{ {int: 'an int', float: 'a number', bool: 'true or false'}[kind]}")
    try:
        return dataclasses.replace(base, **given) if isinstance(base, cls) else cls(**given)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def _named_spec(flag: str, text: str, choices: dict, base=None, keys=None, carry=()):
    """NAME[:KEY=VALUE,...] of `flag`, NAME a key of `choices` (case, '-' and '_' ignored): that class with
    the given keys over `base` when it is of that class, else over the class's defaults and `base`'s
    `carry` fields."""
    def plain(name: str) -> str:
        return name.lower().replace("-", "").replace("_", "")

    name, _, options = text.partition(":")
    found = [(k, c) for k, c in choices.items() if plain(k) == plain(name)]
    if not found:
        raise ValueError(f"unknown {flag[2:]} {name!r} in {flag} {text!r}; choose one of {', '.join(choices)}, "
                         "optionally with options as NAME:KEY=VALUE,...")
    name, cls = found[0]
    if base is not None and type(base) is not cls:
        base = cls(**{k: getattr(base, k) for k in carry})
    first = next((f for f in dataclasses.fields(cls) if keys is None or f.name in keys), None)
    example = f"{name}:{first.name}={first.default}" if first is not None else name
    return _from_spec(flag, options, cls, base, keys, example=example, where=f"{flag} {text!r}")


def _network_options(problem, args: argparse.Namespace, network):
    """`network` (a `ps.Network`) with the network flags applied."""
    from .data.bench import parse_bytes, parse_key_values
    from .pinn.options import Factorized, Fourier

    given = [_flag(k) for k in _NETWORK_FLAGS if getattr(args, k) is not None]
    if not given:
        return network
    if not dataclasses.is_dataclass(network):
        raise CommandError(f"{problem.name} builds its own network; {' '.join(given)} do not apply", 2)
    changes = {k: getattr(args, k) for k in ("width", "depth", "architecture", "activation", "harmonics")
               if getattr(args, k) is not None}
    for key, cls, example in (("fourier", Fourier, "features=128,scale=2"),
                              ("factorized", Factorized, "mean=1,std=0.1")):
        text = getattr(args, key)
        if text is not None:
            changes[key] = None if text.lower() == "none" else _from_spec(
                _flag(key), text, cls, getattr(network, key), example=example)
    if args.chunk_bytes is not None:
        try:
            changes["chunk_bytes"] = (None if args.chunk_bytes.lower() == "none"
                                      else parse_bytes(args.chunk_bytes, "--chunk-bytes"))
        except ValueError as err:
            raise CommandError(str(err), 2) from None
    if args.periodic is not None:
        periodic = None if args.periodic.lower() == "none" else parse_key_values(
            args.periodic, f"--periodic {args.periodic!r}", "--periodic x=2", what="input")
        changes["periodic"] = periodic
        if periodic is None and "harmonics" not in changes:
            changes["harmonics"] = 1
    return dataclasses.replace(network, **changes)


def _solve_options(problem, args: argparse.Namespace, recorded: dict | None = None) -> dict:
    """Keyword arguments of `solve` from the flags, on top of `recorded` (--from) or the problem's defaults."""
    from .data.bench import parse_key_values
    from .pinn.causal import Causal
    from .pinn.options import LBFGS, RAR, SOAP, Adam
    from .pinn.solver import problem_defaults
    from .pinn.weighting import GradNormWeights
    from .pinn.windows import TimeWindows

    base = {**problem_defaults(problem), **(recorded or {})}
    options: dict = dict(recorded or {})

    def updated(key: str, **changes):
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            options[key] = dataclasses.replace(options.get(key, base[key]), **changes)

    def current(key: str):
        return options.get(key, base[key])

    if args.optimizer is not None:
        options["adam"] = _named_spec("--optimizer", args.optimizer, {"adam": Adam, "soap": SOAP}, current("adam"),
                                      keys=("steps", "lr", "precondition_every"), carry=("steps", "lr", "schedule"))
    if args.schedule is not None:
        schedule = _named_spec("--schedule", args.schedule, _schedules(), current("adam").schedule)
        options["adam"] = dataclasses.replace(current("adam"), schedule=schedule)
    updated("adam", steps=args.steps, lr=args.lr)
    if args.lbfgs is not None:
        options["lbfgs"] = _from_spec("--lbfgs", args.lbfgs, LBFGS, current("lbfgs"),
                                      example="history_size=100,max_iter=50")
    updated("lbfgs", steps=args.lbfgs_steps)
    if args.refine is not None:
        refine = None if args.refine.lower() == "none" else _from_spec(
            "--refine", args.refine, RAR, current("points").refine, example="every=500,add=100")
        options["points"] = dataclasses.replace(current("points"), refine=refine)
    updated("points", domain=args.points)
    network = _network_options(problem, args, current("network"))
    if network is not current("network"):
        options["network"] = network
    for key, cls, example in (("balance", GradNormWeights, "every=500,alpha=0.9"),
                              ("causal", Causal, "chunks=32,tol=1")):
        text = getattr(args, key)
        if text is None:
            continue
        if text.lower() == "none":
            if problem_defaults(problem)[key] is not None:
                raise CommandError(f"{problem.name} turns on {key} by default and solve() cannot turn it off; "
                                   f"give other options instead, e.g. {_flag(key)} {example}", 2)
            options[key] = None
        else:
            options[key] = _from_spec(_flag(key), text, cls, current(key), example=example)
    if args.windows is not None:
        try:
            options["windows"] = TimeWindows(args.windows)
        except ValueError as err:
            raise CommandError(f"--windows {args.windows}: {err}", 2) from None
    if args.loss_weights is not None:
        options["loss_weights"] = None if args.loss_weights.lower() == "none" else parse_key_values(
            args.loss_weights, f"--loss-weights {args.loss_weights!r}", "--loss-weights pde=1,initial_u=10",
            what="term")
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
    # a run recorded before L-BFGS' float64 continuation existed ran without it
    lbfgs = {"float64_fallback": False, **config["lbfgs"]}
    options = {"network": Network(**network), "storage": config["storage"], "adam": first(**adam),
               "lbfgs": LBFGS(**lbfgs), "points": Points(**points), "seed": config["seed"],
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
        given = [_flag(k) for k in _TRAINING_FLAGS if getattr(args, k) is not None]
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
        for key in _OPTIONAL_VALUE_FLAGS:
            if getattr(args, key) in problems.names():
                raise CommandError(f"{_flag(key)} took {getattr(args, key)!r} as its value; put the problem name "
                                   f"first: pinnsketch solve {getattr(args, key)} {_flag(key)} ...", 2)
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
        if "compiled_ms_per_step_measured" in t:
            print(f"measured on this machine: compiled {t['compiled_ms_per_step_measured']:.2f} ms, eager "
                  f"{t['eager_ms_per_step_measured']:.2f} ms per Adam step; the faster ran the rest")
    ranks = result.config.get("distributed")
    if ranks:
        peaks = ranks.get("step_peak_bytes_per_rank") or []
        known = [p for p in peaks if p is not None]
        print(f"{ranks['world_size']} ranks ({ranks['backend']}); step peak memory per rank: "
              f"{', '.join('n/a' if p is None else f'{p / 2**20:.2f} MiB' for p in peaks)}"
              + (f" (max {max(known) / 2**20:.2f} MiB)" if known else ""))
    precision = result.history.get("precision")
    if precision:
        starts = [str(s) for s, d in zip(precision["step"], precision["dtype"]) if d == "float64"]
        print(f"L-BFGS continued in float64 from step {', '.join(starts)} (float32 L-BFGS stopped early there)")
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
