"""A torch.profiler account of one full-batch Burgers step per system: kernels, launches, syncs.

Question: where does the time of one training step go on this device? For the workload of
`gpu_step.py` (tanh MLP 2-256x6-1, Burgers jet streams u, u_x, u_t, u_xx, Adam) this profiles
one step after warm-up, per system (`nested` autograd, what DeepXDE does, and pinnsketch's
storage policies), with CPU and CUDA activity, and records:

* `wall_ms`: the profiled step's wall time (synchronized), and `device_ms`: the summed
  device time of its kernels (CUDA only); a step whose wall time is far above its device
  time is bound by launches or host work, not by the kernels;
* `launches`: kernel launches issued by the host (cudaLaunchKernel and the like), and
  `syncs`: host waits on the device (cudaStreamSynchronize, cudaDeviceSynchronize, and
  device-to-host copies that block: cudaMemcpy, cudaMemcpyAsync followed by a wait);
* `sync_callers`: each of those waits with the host operators that issued it (which line to fix);
* `aten_ops`: operators dispatched (also on the CPU);
* `top`: the 15 operators with the largest self time on the device (on the CPU: on the host).

    python benchmarks/gpu_profile.py --device cuda              # 32,768 points -> results/gpu_profile_cuda.json
    python benchmarks/gpu_profile.py --device cpu --points 512 --out /tmp/p.json   # a dry run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def _gpu_step():
    """The gpu_step benchmark module (its build, collocation and loss definitions)."""
    spec = importlib.util.spec_from_file_location("gpu_step", HERE / "gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device_time_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_system(storage: str, points: int, device: torch.device, *, width: int, depth: int,
                   warmup: int = 2) -> dict:
    """One profiled step of `storage` ("nested" or a pinnsketch policy) after `warmup` steps."""
    bench = _gpu_step()
    config = {"network": "mlp", "storage": storage, "width": width, "depth": depth, "residual_depth": 12,
              "points": points}
    model, loss_fn = bench.build(config, device)
    x = bench.collocation(points, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    advance = getattr(model, "advance", lambda: None)
    cuda = device.type == "cuda"

    def step():
        advance()
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        opt.step()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in _LAUNCH_CALLS)
    syncs = {e.key: e.count for e in events if e.key.startswith(_SYNC_CALLS)}
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    if cuda:
        # a compiled (triton) kernel is listed twice, under its launcher's host event and as the kernel:
        # one row per name
        seen: set[str] = set()
        kernels = [e for e in events if _device_time_us(e) > 0 and not e.key.startswith(("aten::", "cuda"))
                   and not (e.key in seen or seen.add(e.key))]
        device_us = sum(_device_time_us(e) for e in kernels)
        top = sorted(kernels, key=_device_time_us, reverse=True)[:15]
        top_rows = [{"name": e.key[:120], "count": e.count, "device_ms": _device_time_us(e) / 1e3} for e in top]
    else:
        device_us = 0.0
        top = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total,
                     reverse=True)[:15]
        top_rows = [{"name": e.key, "count": e.count, "host_ms": e.self_cpu_time_total / 1e3} for e in top]
    return {"storage": storage, "points": points, "wall_ms": 1e3 * wall, "device_ms": device_us / 1e3,
            "launches": launches, "syncs": syncs, "sync_callers": sync_callers(prof.events()), "aten_ops": aten,
            "top": top_rows}


def sync_callers(events) -> list[tuple[str, int]]:
    """Each host wait (and device copy) with the chain of up to four host operators that issued it."""
    callers: dict[str, int] = {}
    for e in events:
        if e.name.startswith(_SYNC_CALLS):
            chain, parent = [], e.cpu_parent
            while parent is not None and len(chain) < 4:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = " <- ".join([e.name, *chain])
            callers[key] = callers.get(key, 0) + 1
    return sorted(callers.items(), key=lambda kv: -kv[1])


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--device", default="cuda")
    cli.add_argument("--points", type=int, nargs="+", default=[32_768])
    cli.add_argument("--storages", nargs="+", default=["nested", "exact", "checkpoint", "lowrank"])
    cli.add_argument("--width", type=int, default=256)
    cli.add_argument("--depth", type=int, default=6)
    cli.add_argument("--out", default=None, help="default results/gpu_profile_<cuda|cpu>.json")
    opts = cli.parse_args(argv)
    device = torch.device(opts.device)
    from pinnsketch.data.bench import git_commit

    records = []
    for points in opts.points:
        for storage in opts.storages:
            record = profile_system(storage, points, device, width=opts.width, depth=opts.depth)
            records.append(record)
            print(f"{storage:>10} {points:>8}: wall {record['wall_ms']:8.2f} ms, device {record['device_ms']:8.2f} ms, "
                  f"{record['launches']} launches, syncs {record['syncs']}, {record['aten_ops']} aten ops",
                  file=sys.stderr)
    payload = {"benchmark": "gpu_profile", "command": "python benchmarks/gpu_profile.py " + " ".join(argv or sys.argv[1:]),
               "device": device.type, "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "commit": git_commit(), "width": opts.width, "depth": opts.depth,
               "records": records}
    out = Path(opts.out) if opts.out else HERE / "results" / f"gpu_profile_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
