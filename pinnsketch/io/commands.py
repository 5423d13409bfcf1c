"""The `inspect` and `plot` subcommands (wired into `pinnsketch.cli`)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_inspect_parser", "add_plot_parser", "inspect_command", "plot_command", "add_run_file_arguments",
           "run_file_callbacks", "solve_options_from_config"]


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    # Same flag as the dispatcher's other subcommands (SUPPRESS keeps `pinnsketch --debug inspect ...`).
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on errors, show the full traceback")


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="summarize a run file",
                              description="Print a summary of a pinnsketch HDF5 run file.")
    p.add_argument("path", help="run file (.h5)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _debug_flag(p)
    p.set_defaults(func=inspect_command)
    return p


def add_plot_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="write PNG figures of a run file",
                              description="Write solution, loss, gradient-norm and rank figures of a run as PNGs.")
    p.add_argument("path", help="run file (.h5)")
    p.add_argument("--out", default=None, help="output folder (default: <run file name>_plots next to it)")
    p.add_argument("--dpi", type=int, default=120, help="resolution of the PNGs (default 120)")
    _debug_flag(p)
    p.set_defaults(func=plot_command)
    return p


def inspect_command(args: argparse.Namespace) -> int:
    from .reader import load
    from .summary import format_summary

    summary = load(args.path).summary()
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_summary(summary))
    return 0


def plot_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .plot import plot_run

    out = args.out if args.out is not None else Path(args.path).with_name(Path(args.path).stem + "_plots")
    for path in plot_run(args.path, out, dpi=args.dpi):
        print(path)
    return 0


# -- run files for `solve` -------------------------------------------------------------------
def add_run_file_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `solve` that write the run while it trains: checkpoints, resume, rerun, gradient monitor.

    (``--out FILE`` itself belongs to the solve parser.)
    """
    parser.add_argument("--checkpoint-every", type=int, default=1000, metavar="N",
                        help="steps between checkpoints committed to --out, which also gets one when the Adam "
                             "phase ends and the final state (default 1000; 0: only the final state)")
    parser.add_argument("--resume", default=None, metavar="FILE",
                        help="continue the interrupted run in FILE from its last checkpoint, with the options "
                             "recorded in FILE (give no problem or training options)")
    parser.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                        help="rerun the run recorded in FILE: its problem, network, storage options, solver "
                             "options and seed; options given here replace the recorded ones")
    parser.add_argument("--monitor-rank", type=int, default=None, metavar="R",
                        help="also record each layer's gradient history in --out, compressed to rank R")
    parser.add_argument("--monitor-method", default="three_sketch", choices=("three_sketch", "isvd"),
                        help="how --monitor-rank compresses the history (default three_sketch)")
    parser.add_argument("--monitor-step-sketch", type=int, default=0, metavar="M",
                        help="with --monitor-rank, also keep an M-row sketch of every step's gradient per layer "
                             "(norms, cosines, inner products of any steps to about 1/sqrt(M); memory grows as "
                             "steps x M per layer; default 0 = none)")


def run_file_callbacks(args: argparse.Namespace, *, total_steps: int,
                       config: dict | None = None) -> tuple[list, dict | None]:
    """(callbacks, resume state) for ``solve`` from ``--out``, ``--resume``, ``--checkpoint-every``,
    ``--monitor-rank``: a RunWriter that records the run while it trains, continuing FILE on --resume.

    ``config``: entries the writer adds to the recorded configuration (the command line's storage spec).
    """
    from ..monitor import GradientMonitor
    from .writer import RunWriter

    out, resume = getattr(args, "out", None), getattr(args, "resume", None)
    every = args.checkpoint_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"--checkpoint-every {every!r} must be an int >= 0 (0: only the final state)")
    if resume is not None:
        if out is not None and str(out) != str(resume):
            raise ValueError(f"--resume {resume} continues that file; leave out --out {out} (or make it the same)")
        writer, state = RunWriter.resume(resume, checkpoint_every=every)
        return [writer], state
    if out is None:
        if args.monitor_rank is not None:
            raise ValueError("--monitor-rank records into the run file; pass --out FILE as well")
        return [], None
    monitor = None
    if args.monitor_rank is not None:
        # One sketch window over the whole run: memory stays constant in the number of steps.
        monitor = GradientMonitor(rank=args.monitor_rank, window=max(int(total_steps), 1),
                                  method=getattr(args, "monitor_method", "three_sketch"),
                                  step_sketch=getattr(args, "monitor_step_sketch", 0) or 0)
    return [RunWriter(out, checkpoint_every=every, monitor=monitor, config=config)], None


def solve_options_from_config(config: dict) -> dict:
    """Keyword arguments of ``pinnsketch.solve`` that rerun a recorded run (the root attribute ``config``).

    The storage is returned as recorded: a policy name or a ``"name:key=value,..."`` spec (parse it
    with ``pinnsketch.data.bench.parse_storage(spec, defaults={})``). Raises ValueError when the run
    cannot be rebuilt from its record (own network module, storage options not recorded).
    """
    from ..pinn.causal import Causal
    from ..pinn.options import LBFGS, RAR, SCHEDULES, SOAP, Adam, Network, Points
    from ..pinn.weighting import GradNormWeights

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
    for key, cls in (("balance", GradNormWeights), ("causal", Causal)):
        recorded_option = dict(config.get(key) or {})
        recorded_option.pop("name", None)
        options[key] = cls(**recorded_option) if config.get(key) else None
    for key in ("dtype", "device", "derivatives", "eval_every", "eval_points"):
        if config.get(key) is not None:
            options[key] = config[key]
    return options
