"""Can a compiled `lowrank` step be fast on a CPU? A feasibility probe for issue 17.

`solve(compile=True)` compiles `exact` only: `lowrank`'s custom autograd Functions keep Python-side state
(bases, rank controller, measurements) that `torch.compile` does not trace. Before building a traced
`lowrank` step into the solver, this probe measures what one would cost at best. It writes DeepXDE's
Burgers step (2,540 domain + 240 boundary/initial points, 2-20x3-1 tanh, jet streams u, u_x, u_t, u_xx,
one Adam update) as one compiled function (`torch.func.grad_and_value`, then Adam, as
`pinnsketch.pinn.compiled.CompiledAdam` does) in four variants that differ only in how the input
z (4, N, width) of each block after the coordinate layer is kept for the backward pass:

* `exact`: plain autograd (what `compile=True` runs today): the baseline of every ratio;
* `lowrank`: a traceable block Function that keeps what `lowrank` keeps (U = z P in bfloat16 on a rank-8
  basis P of the top eigenvectors of a strided sample's Gram matrix, computed in the graph each step, and
  the residual z - U P^T coded with one scale per row: int8 on the value stream, int4 on the others, with
  `pinnsketch.nn.kernels`' codec) and reconstructs z_hat in backward;
* `lowrank_fixed_basis`: the same without the eigensolver (a fixed basis): the codec's own cost;
* `int8`: no low-rank part, z itself coded int8 per row (0.3 of exact's bytes at this width).

No rank control, measurements or audits are included, so each figure is a lower bound for a real compiled
`lowrank` step. Timing: every variant trains its own copy of the parameters; blocks of `--chunk` iterations
per variant, interleaved over `--rounds` rounds; the median of the per-round ratios to `exact`. The relative
error of each variant's first gradient against `exact`'s is recorded as a check that it computes the step.
On CUDA each variant's `max_memory_allocated` over its timed blocks is recorded too (above what was
allocated before them).

    OMP_NUM_THREADS=1 python benchmarks/compiled_lowrank_probe.py --rounds 9 --chunk 50
    python benchmarks/compiled_lowrank_probe.py --device cuda --width 256 --depth 6 --points 32768 \
        --rounds 5 --chunk 10 --out benchmarks/results/compiled_lowrank_probe_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.adam import adam as torch_adam

from pinnsketch.data.bench import cpu_model, git_commit
from pinnsketch.nn.activations import get_activation
from pinnsketch.nn.jet import JetSpec, compose_terms_functional
from pinnsketch.nn.kernels import _dequantize, _quantize

SPEC = JetSpec(2, [(0,), (1,), (0, 0)])      # (x, t): u, u_x, u_t, u_xx
TANH = get_activation("tanh")
RANK = 8


def _act_jet(z: torch.Tensor) -> torch.Tensor:
    return compose_terms_functional(z, TANH._derivatives(z[0], SPEC.order), SPEC)


def _block_out(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = _act_jet(z) @ weight.mT
    return torch.cat([(out[0] + bias).unsqueeze(0), out[1:]])


def _backward_from(z_hat, weight, g):
    """(grad_z, grad_W, grad_b) of the block at the reconstructed input z_hat (S, N, w)."""
    a_hat, vjp = torch.func.vjp(_act_jet, z_hat)
    (grad_z,) = vjp(g @ weight)
    return grad_z, torch.einsum("sno,snw->ow", g, a_hat), g[0].sum(0)


class _LowRankBlock(torch.autograd.Function):
    """act(z) W^T + b, keeping U (bf16), P and the coded residual of z (int8 value stream, int4 others)."""

    @staticmethod
    def forward(z, weight, bias, p):
        u = torch.bmm(z, p).to(torch.bfloat16)
        residual = z - torch.bmm(u.to(z.dtype), p.mT)
        c8, s8, _ = _quantize(residual[:1], 8)
        c4, s4, _ = _quantize(residual[1:], 4)
        return _block_out(z, weight, bias), u, c8, s8, c4, s4

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight, _, p = inputs
        _, *kept = output
        ctx.save_for_backward(weight, p, *kept)
        ctx.mark_non_differentiable(*kept)

    @staticmethod
    def backward(ctx, g, *_):
        weight, p, u, c8, s8, c4, s4 = ctx.saved_tensors
        w = p.shape[1]
        with torch.no_grad():
            z_hat = torch.bmm(u.to(p.dtype), p.mT) + torch.cat([_dequantize(c8, s8, 8, w), _dequantize(c4, s4, 4, w)])
        return (*_backward_from(z_hat, weight, g), None)


class _Int8Block(torch.autograd.Function):
    """act(z) W^T + b, keeping z coded int8 with one scale per row."""

    @staticmethod
    def forward(z, weight, bias):
        codes, scale, _ = _quantize(z, 8)
        return _block_out(z, weight, bias), codes, scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, codes, scale = output
        ctx.save_for_backward(inputs[1], codes, scale)
        ctx.mark_non_differentiable(codes, scale)

    @staticmethod
    def backward(ctx, g, *_):
        weight, codes, scale = ctx.saved_tensors
        with torch.no_grad():
            z_hat = _dequantize(codes, scale, 8, codes.shape[-1])
        return _backward_from(z_hat, weight, g)


def _sample_basis(z: torch.Tensor) -> torch.Tensor:
    """(S, w, RANK): top eigenvectors of a strided row sample's Gram matrix, per stream."""
    sample = z[:, ::max(1, z.shape[1] // 256)]
    _, vecs = torch.linalg.eigh(sample.mT @ sample)
    return vecs.flip(-1)[..., :RANK]


def _hidden(variant: str, z, weight, bias, fixed_basis):
    if variant == "exact":
        return _block_out(z, weight, bias)
    if variant == "int8":
        return _Int8Block.apply(z, weight, bias)[0]
    p = fixed_basis if variant == "lowrank_fixed_basis" else _sample_basis(z.detach())
    return _LowRankBlock.apply(z, weight, bias, p)[0]


def _loss(variant, flat, x, n_domain, fixed_basis):
    """Burgers' mean-square residual on the first n_domain rows, the conditions' on the rest."""
    w1, b1, *rest = flat
    n = x.shape[0]
    value = x @ w1.mT + b1
    z = torch.stack([value, w1[:, 0].expand(n, -1), w1[:, 1].expand(n, -1), torch.zeros_like(value)])
    for weight, bias in zip(rest[0::2], rest[1::2]):      # every block after the coordinate layer
        z = _hidden(variant, z, weight, bias, fixed_basis)
    u, ux, ut, uxx = (z[i, :, 0] for i in range(4))
    d = slice(0, n_domain)
    residual = ut[d] + u[d] * ux[d] - 0.01 / math.pi * uxx[d]
    xb = x[n_domain:]
    target = torch.where(xb[:, 1] == 0, -torch.sin(math.pi * xb[:, 0]), torch.zeros_like(xb[:, 0]))
    return residual.square().mean() + (u[n_domain:] - target).square().mean()


def _step_fn(variant, fixed_basis):
    def step(flat, exp_avg, exp_avg_sq, steps, x, n_domain):
        grads, loss = torch.func.grad_and_value(lambda f: _loss(variant, f, x, n_domain, fixed_basis))(flat)
        # torch's own Adam (lr 1e-3), as `CompiledAdam` runs it; the step counts are tensors
        torch_adam(flat, list(grads), exp_avg, exp_avg_sq, [], steps, foreach=False, capturable=False,
                   differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False,
                   amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False)
        return loss, grads
    return step


def _network(width: int, depth: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    sizes = [2] + [width] * depth + [1]
    flat = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        flat += [torch.randn(b, a, generator=generator) * math.sqrt(2 / (a + b)), torch.zeros(b)]
    return [t.to(device) for t in flat]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--chunk", type=int, default=50, help="iterations per variant per round")
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=2540, help="domain points (240 condition points besides)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: trace only, for tests)")
    parser.add_argument("--variants", nargs="+", default=["exact", "lowrank", "lowrank_fixed_basis", "int8"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compiled_lowrank_probe.json"))
    args = parser.parse_args(argv)
    if args.variants[0] != "exact":
        parser.error("--variants must start with exact (the baseline of the ratios)")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    flat0 = _network(args.width, args.depth, gen, device)
    xd = torch.rand(args.points, 2, generator=gen) * torch.tensor([2.0, 1.0]) - torch.tensor([1.0, 0.0])
    xb = torch.cat([torch.stack([torch.full((80,), -1.0), torch.rand(80, generator=gen)], 1),
                    torch.stack([torch.rand(160, generator=gen) * 2 - 1, torch.zeros(160)], 1)])
    x = torch.cat([xd, xb]).to(device)
    fixed_basis = torch.linalg.qr(torch.randn(4, args.width, args.width, generator=gen))[0][..., :RANK].contiguous()
    fixed_basis = fixed_basis.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs, records = {}, {}
    for name in args.variants:
        flat = [p.clone() for p in flat0]
        state = ([torch.zeros_like(p) for p in flat], [torch.zeros_like(p) for p in flat],
                 [torch.zeros((), dtype=torch.float64, device=device) for _ in flat])
        fn = torch.compile(_step_fn(name, fixed_basis), backend=args.backend)
        t0 = time.perf_counter()
        with torch.no_grad():
            _, grads = fn(flat, *state, x, args.points)
        records[name] = {"compile_s": round(time.perf_counter() - t0, 2)}
        first = torch.cat([g.flatten() for g in grads])
        if name == "exact":
            reference = first
        records[name]["first_grad_rel_error"] = float((first - reference).norm() / reference.norm())
        runs[name] = (fn, flat, state)
        print(f"{name}: compiled in {records[name]['compile_s']} s, first gradient's relative error "
              f"{records[name]['first_grad_rel_error']:.2e}", flush=True)
    times, peaks = {name: [] for name in runs}, {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (fn, flat, state) in runs.items():
                sync()
                if device.type == "cuda":
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(args.chunk):
                    fn(flat, *state, x, args.points)
                sync()
                times[name].append((time.perf_counter() - t0) / args.chunk * 1e3)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated() - base)
    for name, ms in times.items():
        ratios = [a / b for a, b in zip(ms, times["exact"])]
        records[name].update(ms_per_iteration=round(statistics.median(ms), 3),
                             ratio_to_exact=round(statistics.median(ratios), 3),
                             ratio_quartiles=[round(q, 3) for q in statistics.quantiles(ratios, n=4)[::2]])
        if name in peaks:
            records[name].update(peak_mib=round(peaks[name] / 2**20, 1),
                                 peak_ratio_to_exact=round(peaks[name] / peaks["exact"], 3))
        print(f"{name:20s} {records[name]['ms_per_iteration']:7.3f} ms  x{records[name]['ratio_to_exact']:.2f} "
              f"of exact (quartiles {records[name]['ratio_quartiles']})")
    out = {"commit": git_commit(), "torch": torch.__version__, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
           "threads": torch.get_num_threads(),
           "command": "python benchmarks/compiled_lowrank_probe.py " + " ".join(argv or sys.argv[1:]),
           "backend": args.backend, "width": args.width, "depth": args.depth, "points": args.points + 240, "rank": RANK, "variants": records}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
