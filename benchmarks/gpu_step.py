"""Time and peak memory of one full-batch Burgers training step: nested autograd against each storage policy.

Question: at PINN sizes where memory binds (32,768 to 1,048,576 collocation points on
a GPU), what does a pinnsketch step cost in time and memory against the nested-autograd
step DeepXDE takes, per storage policy?

One step: the Burgers residual u_t + u u_x - nu u_xx on all points (mean square), its
backward, an Adam update. Networks: `mlp` (tanh MLP 2-256x6-1) and `residual`
(ResidualMLP, 256 wide, 12 residual blocks). `nested` is a plain torch network of the
same shape (`torch.nn.Sequential` for `mlp`) whose u_x, u_t, u_xx come from nested
`torch.autograd.grad` (what DeepXDE does); the others are `pinnsketch.nn` models with
`model.jet(x, JetSpec.from_names(["x", "t", "xx"], ["x", "t"]))` and the named storage;
`compiled` is `exact` with the loss through `torch.compile` (inductor, dynamic point count), as
`solve(compile=True)` runs it (its compile time is in `warmup_s`).

Per configuration: `--warmup` untimed steps, then the median wall time of `--steps`
steps. CUDA (all in this process): synchronized timing; peak =
`torch.cuda.max_memory_allocated` over the timed steps (after
`reset_peak_memory_stats`) minus `memory_allocated` before them. CPU: every
configuration in a fresh subprocess (so that one configuration's cached memory does
not hide the next one's); peak = resident memory above the level before the first step
(`pinnsketch.nn.ResidentPeak`, warm-up included). Both: `saved_peak_bytes`, the bytes
autograd keeps for backward in one extra step (`pinnsketch.nn.MemoryMeter`). Out of
memory is recorded (`status: "oom"`), as is a configuration skipped because its
predicted time (from the same network and storage at the previous size) exceeds what
is left of `--time-budget-s`. The JSON is rewritten after every configuration.

`--interleave ROUNDS` (one process: CUDA, or the CPU with `--in-process`): after a size's
configurations are measured as above, they are kept and timed in turn, `ROUNDS` rounds of
`--steps` steps each in a fixed order; `step_ms` becomes the median of these steps (the alone
figure stays as `sequential_step_ms`) and `ratio_to[other]` the median over rounds of the
round-time ratio, so that a change of load or clock during the run meets all systems alike.

    python benchmarks/gpu_step.py --device cuda        # 32768, 262144, 1048576 points -> results/gpu_step_cuda.json
    python benchmarks/gpu_step.py                      # CPU: 4096, 16384 points -> results/gpu_step_cpu.json
    python benchmarks/gpu_step.py --dry-run --out /tmp/g.json   # tiny sizes (tests)
    python benchmarks/gpu_step.py --device cuda --networks mlp --points 32768 262144 --storages nested exact lowrank --interleave 8
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NU = 0.01 / math.pi
NETWORKS = ("mlp", "residual")
STORAGES = ("nested", "exact", "checkpoint", "lowrank", "ema", "projection", "compiled")
DEFAULT_STORAGES = ("nested", "exact", "checkpoint", "lowrank")
DEFAULT_POINTS = {"cuda": (32_768, 262_144, 1_048_576), "cpu": (4_096, 16_384)}


class PlainResidual(torch.nn.Module):
    """x_0 = W_0 x + b_0; x_{l+1} = x_l + W_l tanh(x_l) + b_l; out = W tanh(x_depth) + b (as ResidualMLP)."""

    def __init__(self, width: int, depth: int, *, device, dtype):
        super().__init__()
        opts = dict(device=device, dtype=dtype)
        self.first = torch.nn.Linear(2, width, **opts)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(width, width, **opts) for _ in range(depth))
        self.last = torch.nn.Linear(width, 1, **opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.first(x)
        for layer in self.hidden:
            z = z + layer(torch.tanh(z))
        return self.last(torch.tanh(z))


def nested_network(network: str, width: int, depth: int, *, device, dtype, seed: int) -> torch.nn.Module:
    """The plain torch network of the same shape, Xavier-normal weights from a CPU generator."""
    if network == "mlp":
        layers: list[torch.nn.Module] = [torch.nn.Linear(2, width, device=device, dtype=dtype)]
        for _ in range(depth - 1):
            layers += [torch.nn.Tanh(), torch.nn.Linear(width, width, device=device, dtype=dtype)]
        layers += [torch.nn.Tanh(), torch.nn.Linear(width, 1, device=device, dtype=dtype)]
        net: torch.nn.Module = torch.nn.Sequential(*layers)
    else:
        net = PlainResidual(width, depth, device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                std = math.sqrt(2.0 / (m.in_features + m.out_features))
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=dtype) * std)
                m.bias.zero_()
    return net


def nested_loss(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean squared Burgers residual with u_x, u_t, u_xx by nested torch.autograd.grad. x (N, 2)."""
    x = x.detach().requires_grad_(True)
    u = net(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    ux, ut = du[:, 0:1], du[:, 1:2]
    uxx = torch.autograd.grad(ux.sum(), x, create_graph=True)[0][:, 0:1]
    return ((ut + u * ux - NU * uxx) ** 2).mean()


def jet_loss(model, x: torch.Tensor, spec) -> torch.Tensor:
    """The same residual from the jet streams u, u_x, u_t, u_xx of a pinnsketch model."""
    jet = model.jet(x, spec)
    u, ux, ut, uxx = (jet.d(mi) for mi in ((), (0,), (1,), (0, 0)))
    return ((ut + u * ux - NU * uxx) ** 2).mean()


def build(config: dict, device: torch.device):
    """(model, loss closure of the points) for one configuration."""
    from pinnsketch.nn import MLP, JetSpec, ResidualMLP

    dtype = torch.float32
    depth = config["depth"] if config["network"] == "mlp" else config["residual_depth"]
    if config["storage"] == "nested":
        net = nested_network(config["network"], config["width"], depth, device=device, dtype=dtype, seed=0)
        return net, lambda x: nested_loss(net, x)
    cls = MLP if config["network"] == "mlp" else ResidualMLP
    compiled = config["storage"] == "compiled"
    model = cls(2, 1, width=config["width"], depth=depth, activation="tanh",
                storage="exact" if compiled else config["storage"], seed=0,
                dtype=dtype, device=device, chunk_bytes=config.get("chunk_bytes"))
    spec = JetSpec.from_names(["x", "t", "xx"], ["x", "t"])
    if compiled:
        # what solve(compile=True) compiles: the exact network's jet as plain torch ops
        # (pinnsketch.nn.functional.plain_jet), forward and backward fused by inductor
        from pinnsketch.nn.functional import plain_jet

        def loss(x):
            jet = plain_jet(model, x, spec)
            u, ux, ut, uxx = (jet.d(mi) for mi in ((), (0,), (1,), (0, 0)))
            return ((ut + u * ux - NU * uxx) ** 2).mean()

        return model, torch.compile(loss, dynamic=True, backend=config.get("compile_backend", "inductor"))
    return model, lambda x: jet_loss(model, x, spec)


def collocation(n: int, device: torch.device) -> torch.Tensor:
    """n points (n, 2) uniform in [-1, 1] x [0, 1], drawn on the CPU (the same on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.rand(n, 2, generator=gen) * torch.tensor([2.0, 1.0]) - torch.tensor([1.0, 0.0])
    return x.to(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc)


class Stepper:
    """One configuration's model, points and Adam; calling it runs one training step and returns the loss."""

    def __init__(self, config: dict, device: torch.device):
        self.model, self.loss_fn = build(config, device)
        self.x = collocation(config["points"], device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.advance = getattr(self.model, "advance", lambda: None)
        self.device = device

    def __call__(self) -> torch.Tensor:
        self.advance()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.x)
        loss.backward()
        self.opt.step()
        return loss

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self) -> tuple[float, torch.Tensor]:
        """(seconds, loss) of one step, synchronized at both ends on a GPU."""
        self.sync()
        t0 = time.perf_counter()
        loss = self()
        self.sync()
        return time.perf_counter() - t0, loss


def measure(config: dict, device: torch.device, keep: bool = False) -> dict | tuple[dict, Stepper | None]:
    """Median step time over config["steps"] after config["warmup"], and peak memory (see module doc).
    keep=True: (record, the warmed-up Stepper, None after out of memory) for `interleave`."""
    from pinnsketch.nn import MemoryMeter, ResidentPeak

    cuda = device.type == "cuda"
    record = dict(config)
    stepper = None
    try:
        stepper = Stepper(config, device)
        times = []
        rss = None if cuda else ResidentPeak()
        if rss is not None:
            rss.__enter__()
        try:
            t0 = time.perf_counter()
            for _ in range(config["warmup"]):
                stepper()
            stepper.sync()
            record["warmup_s"] = time.perf_counter() - t0
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(config["steps"]):
                seconds, loss = stepper.timed()
                times.append(seconds)
        finally:
            if rss is not None:
                rss.__exit__(None, None, None)
        if cuda:
            record["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            record["peak_kind"] = "torch.cuda.max_memory_allocated above memory_allocated before the timed steps"
        else:
            record["peak_bytes"] = rss.peak_bytes
            record["peak_kind"] = "resident memory above the level before the first step (ResidentPeak)"
        with MemoryMeter() as meter:
            stepper()
        record["saved_peak_bytes"] = meter.peak_bytes
        record.update(status="ok", step_ms=1e3 * statistics.median(times), step_ms_all=[1e3 * t for t in times],
                      loss=float(loss.detach()))
    except Exception as exc:  # noqa: BLE001 - an out-of-memory configuration is a result, not a crash
        if not _is_oom(exc):
            raise
        record.update(status="oom", error=str(exc).splitlines()[0][:300])
        stepper = None
    finally:
        if not keep:
            stepper = None  # free before the next configuration
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return (record, stepper) if keep else record


def interleave(runs: list[tuple[dict, Stepper]], rounds: int) -> None:
    """Time warmed-up configurations of one network and size in turn: `rounds` rounds, in each every
    configuration runs its config["steps"] steps, in a fixed order. Updates each record: `sequential_step_ms`
    (its own timed steps, measured alone), `step_ms` (median of its interleaved steps), `round_ms` and
    `ratio_to` (per other configuration, the median over rounds of this one's round time over the
    other's): a change of load or clock between rounds meets every configuration alike."""
    round_s = {id(r): [] for r, _ in runs}
    steps = {id(r): [] for r, _ in runs}
    for _ in range(rounds):
        for record, stepper in runs:
            total = 0.0
            for _ in range(record["steps"]):
                seconds, _ = stepper.timed()
                steps[id(record)].append(seconds)
                total += seconds
            round_s[id(record)].append(total)
    for record, _ in runs:
        mine = round_s[id(record)]
        record.update(
            sequential_step_ms=record["step_ms"], step_ms=1e3 * statistics.median(steps[id(record)]),
            step_ms_all=[1e3 * t for t in steps[id(record)]], round_ms=[1e3 * t for t in mine], rounds=rounds,
            ratio_to={other["storage"]: statistics.median(a / b for a, b in zip(mine, round_s[id(other)]))
                      for other, _ in runs if other is not record})


def measure_in_subprocess(config: dict, timeout: float | None, threads: int = 0) -> dict:
    """CPU: one configuration in a fresh interpreter (its peak resident memory is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--one", json.dumps(config)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "status": "timeout", "error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        killed = out.returncode < 0 and -out.returncode == 9
        tail = out.stderr.strip().splitlines()[-1:] or [""]
        return {**config, "status": "oom" if killed else "failed",
                "error": f"exit {out.returncode}" + (" (killed, likely out of memory)" if killed else f": {tail[0]}")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"gpu_name": torch.cuda.get_device_name(device), "gpu_memory_bytes": props.total_memory}
    from pinnsketch.data.bench import cpu_model

    return {"cpu_model": cpu_model()}


def predicted_s(records: list[dict], config: dict) -> float | None:
    """Time of warm-up + steps at config's size, scaled linearly in points from the same network and storage."""
    same = [r for r in records if r["network"] == config["network"] and r["storage"] == config["storage"]
            and r.get("status") == "ok"]
    if not same:
        return None
    r = max(same, key=lambda r: r["points"])
    per_step = r["step_ms"] / 1e3 * config["points"] / r["points"]
    return per_step * (config["warmup"] + config["steps"] + 1)


def _show(record: dict, label: str = "") -> None:
    shown = (f"{record['step_ms']:9.1f} ms  peak {record['peak_bytes'] / 2**20:9.1f} MiB  "
             f"saved {record['saved_peak_bytes'] / 2**20:9.1f} MiB" if record["status"] == "ok"
             else f"{record['status']}: {record.get('error', '')}")
    ratios = " ".join(f"/{k} {v:.2f}" for k, v in record.get("ratio_to", {}).items()) if label else ""
    print(f"{record['network']:<9} {record['storage']:<11} {record['points']:>9}  {shown} {label} {ratios}".rstrip(),
          file=sys.stderr)


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    cli.add_argument("--points", type=int, nargs="+", default=None,
                     help="collocation point counts (default: cuda 32768 262144 1048576, cpu 4096 16384)")
    cli.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    cli.add_argument("--storages", nargs="+", default=list(DEFAULT_STORAGES), choices=STORAGES)
    cli.add_argument("--width", type=int, default=256)
    cli.add_argument("--depth", type=int, default=6, help="hidden layers of the MLP (default 6)")
    cli.add_argument("--residual-depth", type=int, default=12, help="residual blocks of the ResidualMLP (default 12)")
    cli.add_argument("--steps", type=int, default=5, help="timed steps (median; default 5)")
    cli.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    cli.add_argument("--chunk-bytes", type=int, default=None,
                     help="bytes per row-chunk tensor of the pinnsketch models (default: the device's, one chunk "
                          "per call on a GPU); smaller chunks bound a step's working set at the cost of launches")
    cli.add_argument("--time-budget-s", type=float, default=None,
                     help="skip configurations predicted to exceed what is left of this budget (default: none)")
    cli.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                     help="after each size's sequential measurements, time its configurations in turn for ROUNDS "
                          "rounds of --steps steps each (one process: CUDA, or the CPU with --in-process); step_ms "
                          "and ratio_to come from these rounds (default 0: sequential only)")
    cli.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0: torch's)")
    cli.add_argument("--in-process", action="store_true",
                     help="CPU: measure every configuration in this process (quicker; peaks then include "
                          "memory the allocator kept from earlier configurations)")
    cli.add_argument("--dry-run", action="store_true",
                     help="tiny and quick: 256 points, width 16, depth 2, residual depth 2, 2 steps, "
                          "one thread, in process")
    cli.add_argument("--out", default=None, help="default results/gpu_step_<cuda|cpu>.json")
    cli.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one CPU configuration (JSON)
    opts = cli.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.one is not None:
        config = json.loads(opts.one)
        print(json.dumps(measure(config, torch.device("cpu"))))
        return 0
    from pinnsketch.data.bench import benchmark_device

    try:
        device = benchmark_device(opts.device)
    except ValueError as err:
        cli.error(str(err))
    if opts.dry_run:
        opts.points = opts.points or [256]
        opts.width, opts.depth, opts.residual_depth, opts.steps, opts.warmup = 16, 2, 2, 2, 1
        opts.in_process = True
        torch.set_num_threads(1)
    points = sorted(opts.points or DEFAULT_POINTS[device.type])
    for name, value in (("--points", min(points)), ("--width", opts.width), ("--depth", opts.depth),
                        ("--residual-depth", opts.residual_depth), ("--steps", opts.steps),
                        ("--chunk-bytes", opts.chunk_bytes or 1)):
        if value < 1:
            cli.error(f"{name} must be >= 1, got {value}")
    if opts.warmup < 0:
        cli.error(f"--warmup must be >= 0, got {opts.warmup}")
    if opts.interleave < 0:
        cli.error(f"--interleave must be >= 0, got {opts.interleave}")
    if opts.interleave and device.type == "cpu" and not opts.in_process:
        cli.error("--interleave keeps every configuration of a size in one process: on the CPU add --in-process")
    out = Path(opts.out or HERE / "results" / f"gpu_step_{device.type}.json")

    from pinnsketch.data.bench import git_commit, jsonable

    payload = {
        "benchmark": "gpu_step",
        "command": "python benchmarks/gpu_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device), **device_info(device),
        "points": points, "networks": opts.networks, "storages": opts.storages,
        "shapes": {"mlp": f"MLP 2-{opts.width}x{opts.depth}-1 tanh",
                   "residual": f"ResidualMLP 2-{opts.width}, {opts.residual_depth} residual blocks, -1, tanh"},
        "steps": opts.steps, "warmup": opts.warmup, "interleave_rounds": opts.interleave,
        "dtype": "float32", "optimizer": "adam, lr 1e-3",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "commit": git_commit(), "time_budget_s": opts.time_budget_s,
        "process_per_configuration": device.type == "cpu" and not opts.in_process, "records": [],
    }
    start = time.perf_counter()
    # Network-major, sizes ascending: under a time budget the first network's table is complete first.
    for network in opts.networks:
        for n in points:
            kept = []           # (record, stepper) of this size, for --interleave
            for storage in opts.storages:
                config = {"network": network, "storage": storage, "points": n, "width": opts.width,
                          "depth": opts.depth, "residual_depth": opts.residual_depth, "steps": opts.steps,
                          "warmup": opts.warmup, "chunk_bytes": opts.chunk_bytes}
                left = None if opts.time_budget_s is None else opts.time_budget_s - (time.perf_counter() - start)
                guess = predicted_s(payload["records"], config)
                if left is not None and (left <= 0 or (guess is not None and guess > left)):
                    record = {**config, "status": "skipped",
                              "error": f"predicted {guess or 0:.0f} s, {max(left, 0):.0f} s of the time budget left"}
                elif opts.interleave:
                    record, stepper = measure(config, device, keep=True)
                    if stepper is not None:
                        kept.append((record, stepper))
                elif device.type == "cuda" or opts.in_process:
                    record = measure(config, device)
                else:
                    record = measure_in_subprocess(config, timeout=left, threads=opts.threads)
                payload["records"].append(record)
                _show(record)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
            if len(kept) > 1:
                interleave(kept, opts.interleave)
                for record, _ in kept:
                    _show(record, "interleaved")
                out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
            kept = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    payload["wall_s"] = time.perf_counter() - start
    out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
