"""An account of the operations and host reads of one training step, per system (no GPU needed).

Question: how many device operations does one full-batch PINN training step issue, and how many
times does it read a value back to the host? On a GPU every operation is at least one kernel
launch, and every host read of a device value (`.item()`, `.tolist()`, `bool(tensor)`, ...) is a
synchronization that drains the device's queue; a launch-bound step is slow however fast the
kernels are. Both counts are properties of the code, not of the device, so they are measured
here on the CPU, with the chunking the GPU uses (one chunk per call: `--chunk-bytes`, default
unlimited), for the workload of the GPU table (tanh 2-256x6-1, Burgers jet streams u, u_x, u_t,
u_xx, Adam) and plain nested autograd (`torch.nn.Sequential`, what DeepXDE does) beside it:

* ops: aten operators the step dispatches (torch.profiler), split into the forward+backward
  of the loss, the optimizer step and `model.advance()`;
* host reads: calls of Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__ on
  tensors during the step (a TorchFunctionMode), with the source line of each.

    python benchmarks/step_account.py                   # 32,768 points
    python benchmarks/step_account.py --points 4096 --storages exact lowrank

Writes results/step_account.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
NU = 0.01 / math.pi
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values, keyed by the pinnsketch/benchmark line that made them."""

    def __init__(self):
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            stack = traceback.extract_stack()[:-1]
            if any("torch/optim" in f.filename for f in stack):
                # torch's optimizers keep their step counters on the host (capturable=False):
                # reading them never waits for the device
                self.where[f"torch.optim step counter {func.__name__} (host tensor, no sync)"] += 1
            else:
                frames = [f for f in stack if "pinnsketch" in f.filename or "step_account" in f.filename]
                f = frames[-1] if frames else stack[-1]
                self.where[f"{Path(f.filename).name}:{f.lineno} {func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def _outermost_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False                           # a sub-op of another operator: launched inside it
        parent = parent.cpu_parent
    return True


def run_counted(fn) -> tuple[int, dict]:
    """Run fn once; (outermost aten operators it dispatched, host reads by source line)."""
    from torch.profiler import ProfilerActivity, profile

    from pinnsketch.nn.memory import _QuietProfilerLog

    with _QuietProfilerLog(), profile(activities=[ProfilerActivity.CPU]) as prof, HostReads() as reads:
        fn()
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and _outermost_aten(e))
    return ops, dict(reads.where)


def pinnsketch_step(storage: str, n: int, chunk_bytes: int):
    from pinnsketch.nn import MLP, JetSpec

    spec = JetSpec.from_names(["x", "t", "xx"], ["x", "t"])
    model = MLP(2, 1, width=256, depth=6, storage=storage, seed=0, chunk_bytes=chunk_bytes)
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_backward():
        opt.zero_grad(set_to_none=True)
        u, ux, ut, uxx = model.jet(x, spec).streams
        (ut + u * ux - NU * uxx).square().mean().backward()

    return loss_backward, opt.step, model.advance


def nested_step(n: int):
    layers = [torch.nn.Linear(2, 256), torch.nn.Tanh()]
    for _ in range(5):
        layers += [torch.nn.Linear(256, 256), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(256, 1))
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss_backward():
        opt.zero_grad(set_to_none=True)
        u = net(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        ux, ut = du[:, :1], du[:, 1:]
        (uxx,) = torch.autograd.grad(ux.sum(), x, create_graph=True)
        (ut + u * ux - NU * uxx[:, :1]).square().mean().backward()

    return loss_backward, opt.step, lambda: None


def account(name: str, parts, warmup: int = 3) -> dict:
    loss_backward, opt_step, advance = parts
    for _ in range(warmup):                       # bases, optimizer state, audits' bootstrap
        loss_backward()
        opt_step()
        advance()
    record = {"system": name, "ops": {}, "host_reads": {}}
    for label, fn in (("loss_forward_backward", loss_backward), ("optimizer", opt_step), ("advance", advance)):
        record["ops"][label], record["host_reads"][label] = run_counted(fn)
    record["ops_total"] = sum(record["ops"].values())
    record["device_syncs_total"] = sum(n for v in record["host_reads"].values() for k, n in v.items()
                                       if "no sync" not in k)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=32_768)
    p.add_argument("--storages", nargs="+", default=["exact", "checkpoint", "lowrank"])
    p.add_argument("--chunk-bytes", type=int, default=1 << 40, help="chunk budget (default: one chunk per call)")
    p.add_argument("--json", type=Path, default=HERE / "results" / "step_account.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from pinnsketch.data.bench import git_commit

    records = [account("nested", nested_step(args.points))]
    for storage in args.storages:
        records.append(account(storage, pinnsketch_step(storage, args.points, args.chunk_bytes)))
    for r in records:
        print(f"{r['system']:10s} ops {r['ops']}  device syncs {r['device_syncs_total']}: "
              f"{ {k: v for k, v in r['host_reads'].items() if v} }")
    out = {"command": "python benchmarks/step_account.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": git_commit(), "torch": torch.__version__, "points": args.points,
           "chunk_bytes": args.chunk_bytes, "records": records}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
