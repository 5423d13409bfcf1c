"""Every storage policy, the solver and the classifier bench on CUDA against the CPU.

For each policy an MLP built from the same seed on both devices (float64) runs the
fused jet forward, the backward and two Adam steps; values and parameter gradients
must agree. The sketching policies use settings under which they store the
activations exactly (full rank, no quantized residual, exact derivative codec), so
that a difference between devices is a device bug, not sketching noise: their
random test matrices come from per-device generators and differ between CPU and
CUDA. `test_exact_settings_match_exact_storage` (CPU, always runs) checks that those
settings are indeed exact, which is what gives the CUDA comparison its meaning.
"""

from __future__ import annotations

import math

import pytest
import torch

from pinnsketch.nn import MLP, STORAGES, EMAStorage, JetSpec, LowRankStorage, ProjectionStorage

WIDTH, DEPTH, POINTS = 24, 3, 200
SPEC = JetSpec.from_names(["x", "t", "xx"], ["x", "t"])
NU = 0.01 / math.pi

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def exact_settings(name: str):
    """Policy `name` under settings where it stores z_prev exactly (up to rounding): a
    name or one policy per block (block 0 stores the 2 input columns, the others WIDTH)."""
    ranks = [2] + [WIDTH] * DEPTH
    if name == "lowrank":
        return [LowRankStorage(rank=r, r_min=r, r_max=r, adaptive=False, residual=None, value_residual=None,
                               audit_every=0) for r in ranks]
    if name == "ema":
        return [EMAStorage(beta=0.0, rank=r, r_max=r, derivative="exact") for r in ranks]
    if name == "projection":
        return ProjectionStorage(k=POINTS, operator="srft", derivative="exact")
    return name


# Relative tolerance per policy: rounding only, amplified by the sketches' least-squares solves.
TOLERANCE = {"exact": 1e-10, "checkpoint": 1e-10, "lowrank": 1e-8, "ema": 1e-6, "projection": 1e-8}


def points(device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(3)
    x = torch.rand(POINTS, 2, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 1.0], dtype=torch.float64)
    return (x - torch.tensor([1.0, 0.0], dtype=torch.float64)).to(device)


def burgers_loss(model: MLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared Burgers residual and the jet streams (S, N, 1) it came from."""
    jet = model.jet(x, SPEC)
    u, ux, ut, uxx = (jet.d(mi) for mi in ((), (0,), (1,), (0, 0)))
    return ((ut + u * ux - NU * uxx) ** 2).mean(), jet.streams


def trajectory(storage, device: str, steps: int = 2) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per step: the jet streams and the parameter gradients (on the CPU), then an Adam step."""
    model = MLP(2, 1, width=WIDTH, depth=DEPTH, storage=storage, seed=0, dtype=torch.float64, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, out = points(device), []
    for _ in range(steps):
        model.advance()
        opt.zero_grad(set_to_none=True)
        loss, streams = burgers_loss(model, x)
        loss.backward()
        out.append((streams.detach().cpu(), [p.grad.detach().cpu() for p in model.parameters()]))
        opt.step()
    return out


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    err = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    assert err <= rtol, f"{what}: relative difference {err:.2e} > {rtol:.0e}"


def assert_same_trajectory(got, want, rtol: float) -> None:
    for step, ((s1, g1), (s2, g2)) in enumerate(zip(got, want)):
        assert_close(s1, s2, rtol, f"step {step} jet streams")
        for i, (a, b) in enumerate(zip(g1, g2)):
            assert_close(a, b, rtol, f"step {step} gradient of parameter {i}")


def test_every_policy_is_covered():
    assert set(TOLERANCE) == set(STORAGES)


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_exact_settings_match_exact_storage(name):
    assert_same_trajectory(trajectory(exact_settings(name), "cpu"), trajectory("exact", "cpu"), TOLERANCE[name])


@needs_cuda
@pytest.mark.parametrize("name", sorted(STORAGES))
def test_policy_on_cuda_matches_cpu(name):
    storage = exact_settings(name)
    assert_same_trajectory(trajectory(storage, "cuda"), trajectory(storage, "cpu"), TOLERANCE[name])


@needs_cuda
@pytest.mark.parametrize("name", ["lowrank", "ema", "projection"])
def test_default_sketching_policy_runs_on_cuda(name):
    # Default (adaptive, quantized) settings: no exact agreement to check, but the
    # CUDA code paths of the sketches, codecs and audits must run and stay finite.
    out = trajectory(name, "cuda", steps=3)
    for streams, grads in out:
        assert torch.isfinite(streams).all() and all(torch.isfinite(g).all() for g in grads)


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("w,group", [(7, None), (256, None), (20, 6)])
def test_int_codec_on_cuda_matches_cpu(bits, w, group):
    # The codec takes device-specific paths (row maxima by one reduction on CUDA, by halving on the
    # CPU; CUDA divides by a host scalar as a multiplication by its reciprocal), so scales agree to
    # rounding and a code may differ by one step where x / scale lands on a rounding boundary. Each
    # device's decode must meet the codec's error bound, and decoding into a buffer must give
    # exactly what decode returns (seen on an H200: scales differed in the last bit).
    from pinnsketch.nn.codecs import IntCodec

    x = torch.randn(300, w, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 300)[:, None]
    x[7] = 0.0
    codec = IntCodec(bits, group)
    cpu_parts, cpu_hat = codec.encode_decode(x)
    gpu_parts, gpu_hat = codec.encode_decode(x.cuda())
    cpu_scale, gpu_scale = cpu_parts[1], gpu_parts[1].cpu()
    assert torch.allclose(gpu_scale, cpu_scale, rtol=1e-6, atol=0)
    # per-element scale (N, w): each group's scale over its columns
    g = w if group is None else group
    step = cpu_scale.repeat_interleave(g, dim=1)[:, :w]
    assert ((gpu_hat.cpu() - cpu_hat).abs() <= 1.0001 * step).all()          # at most one code step apart
    assert ((gpu_hat.cpu() - x).abs() <= 0.5001 * step).all()                # the codec's own bound
    out = torch.empty(x.shape, device="cuda")
    assert codec.decode(gpu_parts, x.shape, x.dtype, out=out) is out
    assert torch.equal(out, codec.decode(gpu_parts, x.shape, x.dtype))
    assert torch.equal(out, gpu_hat)


@needs_cuda
def test_seeding_under_default_device_cuda():
    # vs_deepxde.py's situation: deepxde's import switches the default device to CUDA.
    want = MLP(2, 1, width=20, depth=3, seed=0)
    previous = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        got = MLP(2, 1, width=20, depth=3, seed=0)
        assert all(p.device.type == "cuda" for p in got.parameters())
    finally:
        torch.set_default_device(previous)
    for a, b in zip(got.parameters(), want.parameters()):
        assert torch.equal(a.detach().cpu(), b.detach())


@needs_cuda
@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_solve_on_cuda(storage):
    import pinnsketch as ps
    from pinnsketch.problems.burgers import Burgers

    result = ps.solve(Burgers(), storage=storage, device="cuda", network=ps.Network(width=16, depth=2),
                      adam=ps.Adam(steps=5), lbfgs=ps.LBFGS(steps=2),
                      points=ps.Points(domain=256, boundary=32, initial=32), eval_every=5, progress=False)
    assert result.config["device"].startswith("cuda")
    assert result.l2_relative_error is not None and math.isfinite(result.l2_relative_error)


@needs_cuda
def test_bench_digits_on_cuda(tmp_path):
    from pinnsketch.cli import main

    out = tmp_path / "digits.json"
    assert main(["bench", "digits", "--storage", "exact", "lowrank", "--epochs", "1", "--device", "cuda",
                 "--no-progress", "--json", str(out)]) == 0
    assert out.exists()


@needs_cuda
@pytest.mark.parametrize("storage", ["exact", "lowrank"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_kernels_match_eager_on_cuda(storage, dtype, monkeypatch):
    """The compiled kernels (`pinnsketch.nn.kernels`: activation jets, vjps, lowrank's codec) against the
    eager arithmetic on the same device: a step's loss and gradients, and no fallback to eager."""
    import warnings

    import pinnsketch.nn.fused as fused_module
    import pinnsketch.nn.lowrank as lowrank_module
    from pinnsketch.nn import kernels

    def steps():
        model = MLP(2, 1, width=64, depth=3, storage=storage, seed=0, dtype=dtype, device="cuda")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, out = points("cuda").to(dtype), []
        for _ in range(3):
            model.advance()
            opt.zero_grad(set_to_none=True)
            loss, _ = burgers_loss(model, x)
            loss.backward()
            out.append((loss.item(), [p.grad.detach().cpu() for p in model.parameters()]))
            opt.step()
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fused = steps()
    for module in (fused_module, lowrank_module):
        monkeypatch.setattr(module, "fused_kernels_active", lambda x: False)
    eager = steps()
    rtol = 1e-9 if dtype == torch.float64 else 1e-3     # float32: rounding ties of the codes may flip
    for (loss, grads), (ref_loss, ref_grads) in zip(fused, eager):
        assert abs(loss - ref_loss) <= rtol * abs(ref_loss)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, rtol, "gradient")
    assert not any(k.failed for k in (kernels.activation_jet_kernel, kernels.activation_vjp_kernel,
                                       kernels.lowrank_encode_kernel, kernels.lowrank_decode_kernel))
