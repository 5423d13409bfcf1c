"""The fused kernels of `pinnsketch.nn.kernels` against the eager paths they replace.

On a GPU they are compiled by inductor; here (no GPU in CI) the same functions are traced by
torch.compile with `fullgraph=True` on the CPU (aot_eager backend: the captured graph, run by
eager kernels; the slow test compiles with inductor), and whole training steps through them
are compared with the eager step.
"""

import warnings

import pytest
import torch

import pinnsketch.nn.fused as fused_module
import pinnsketch.nn.lowrank as lowrank_module
from pinnsketch.nn import MLP, IntCodec, JetSpec, LowRankStorage, get_activation
from pinnsketch.nn import kernels
from pinnsketch.nn.jet import compose_streams, compose_vjp

BURGERS = JetSpec.from_names(["x", "t", "xx"], ["x", "t"])
THIRD = JetSpec(1, [(0, 0, 0)])
KERNELS = (kernels.activation_jet_kernel, kernels.activation_vjp_kernel, kernels.lowrank_encode_kernel,
           kernels.lowrank_decode_kernel)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Route CPU tensors through the kernels, compiled with `backend` (fullgraph: a graph break fails)."""

    def use(backend="aot_eager"):
        active = lambda x: not (torch.is_grad_enabled() and x.requires_grad)  # noqa: E731
        monkeypatch.setattr(fused_module, "fused_kernels_active", active)
        monkeypatch.setattr(lowrank_module, "fused_kernels_active", active)
        real_compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": backend}))
        for k in KERNELS:
            monkeypatch.setattr(k, "_variants", {})
        torch._dynamo.reset()

    yield use
    torch._dynamo.reset()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_matches_intcodec(bits):
    x = torch.randn(3, 50, 16, dtype=torch.float64) * torch.logspace(-3, 2, 50, dtype=torch.float64)[:, None]
    x[1, 7] = 0.0                                   # an all-zero row keeps scale 0
    codec = IntCodec(bits)
    codes, scale, x_hat = kernels._quantize(x, bits)
    ref_codes, ref_scale = codec.encode(x.reshape(-1, 16))
    assert torch.equal(codes.reshape(ref_codes.shape), ref_codes)
    assert torch.equal(scale.reshape(ref_scale.shape), ref_scale)
    ref_hat = codec.decode((ref_codes, ref_scale), (150, 16), x.dtype)
    assert torch.equal(x_hat.reshape(150, 16), ref_hat)
    assert torch.equal(kernels._dequantize(codes, scale, bits, 16), x_hat)


@pytest.mark.parametrize("name", ["tanh", "sin", "gelu"])
@pytest.mark.parametrize("spec", [BURGERS, THIRD], ids=["burgers", "third"])
def test_activation_kernels_match_eager(name, spec):
    act = get_activation(name)
    z = torch.randn(spec.size, 40, 8, dtype=torch.float64)
    g = torch.randn_like(z)
    a = kernels._activation_jet(z, activation=act, spec=spec)
    torch.testing.assert_close(a, compose_streams(z, act.derivatives(z[0], spec.order), spec), rtol=1e-12, atol=1e-12)
    a2, gz = kernels._activation_vjp(z, g.clone(), activation=act, spec=spec, need_a=True)
    derivs = act.derivatives(z[0], spec.order + 1)
    torch.testing.assert_close(a2, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, compose_vjp(z, derivs, g.clone(), spec), rtol=1e-12, atol=1e-12)
    assert kernels._activation_vjp(z, g, activation=act, spec=spec, need_a=False)[0] is None


def _step(storage, dtype=torch.float64, n=300, steps=3):
    """Losses and gradients of a few Burgers jet steps of a 2-32x3-1 tanh MLP (Adam in between)."""
    model = MLP(2, 1, width=32, depth=3, activation="tanh", storage=storage, seed=0, dtype=dtype)
    x = torch.rand(n, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = []
    for _ in range(steps):
        model.advance()
        opt.zero_grad()
        jet = model.jet(x, BURGERS)
        u, ux, ut, uxx = (jet.d(mi) for mi in ((), (0,), (1,), (0, 0)))
        loss = ((ut + u * ux - 0.01 * uxx) ** 2).mean()
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return out


def _assert_steps_close(got, ref, rtol):
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref):
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() <= rtol * r.norm()


@pytest.mark.parametrize("storage", ["exact", "lowrank"])
def test_training_steps_through_kernels_match_eager(storage, kernels_on_cpu):
    policy = storage if storage == "exact" else LowRankStorage(audit_every=2)
    ref = _step(policy)
    kernels_on_cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)           # a compile failure would warn and fall back
        got = _step(policy)
    _assert_steps_close(got, ref, 1e-10)
    assert not any(k.failed for k in KERNELS)
    used = KERNELS if storage == "lowrank" else KERNELS[:2]
    assert all(k._variants for k in used)          # the steps did run through the compiled kernels


def test_lowrank_float32_codes_through_kernels(kernels_on_cpu):
    """float32: U in bfloat16 and int4/int8 codes, as on a GPU; rounding ties aside, the same step."""
    ref = _step("lowrank", dtype=torch.float32)
    kernels_on_cpu()
    got = _step("lowrank", dtype=torch.float32)
    _assert_steps_close(got, ref, 1e-4)


def test_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    def data_dependent(x):
        if x.sum().item() > 0:          # a graph break: fullgraph compilation refuses it
            return x * 2
        return x

    kernel = kernels.DeviceKernel(data_dependent)
    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="data_dependent failed"):
        assert torch.equal(kernel(x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(kernel(-x), -x)        # the failed variant runs eagerly, without a second warning
    assert kernel.failed
    torch._dynamo.reset()


def test_missing_compiler_warns_and_runs_eagerly(monkeypatch):
    def no_compiler(fn, **kw):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compiler)
    kernel = kernels.DeviceKernel(kernels._activation_jet)
    z = torch.randn(4, 5, 8)
    with pytest.warns(RuntimeWarning, match="not supported on this Python"):
        a = kernel(z, activation=get_activation("tanh"), spec=BURGERS)
    torch.testing.assert_close(a, kernels._activation_jet(z, activation=get_activation("tanh"), spec=BURGERS))


def test_variants_compile_apart_and_share_equal_statics(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__code__) or fn)
    kernel = kernels.DeviceKernel(kernels._activation_jet)
    z = torch.randn(4, 5, 8)
    for act in (get_activation("tanh"), get_activation("tanh"), get_activation("sin")):
        kernel(z, activation=act, spec=BURGERS)
    kernel(z.double(), activation=get_activation("tanh"), spec=BURGERS)
    kernel(torch.randn(4, 9, 8), activation=get_activation("tanh"), spec=JetSpec.from_names(["x", "t", "xx"], ["x", "t"]))
    assert len(compiled) == 3                         # tanh, sin, tanh in float64; rows and equal specs share
    assert len({id(c) for c in compiled}) == 3        # each on its own code object (own recompile budget)


@pytest.mark.slow
def test_kernels_compile_with_inductor(kernels_on_cpu):
    ref = _step(LowRankStorage(audit_every=2), dtype=torch.float32, steps=2)
    kernels_on_cpu("inductor")
    got = _step(LowRankStorage(audit_every=2), dtype=torch.float32, steps=2)
    _assert_steps_close(got, ref, 1e-4)
    assert not any(k.failed for k in KERNELS)


def test_activation_with_constructor_arguments_through_kernels(kernels_on_cpu):
    """A user activation that takes arguments (no default constructor) works through the kernels."""
    from pinnsketch.nn.activations import Activation

    class ScaledTanh(Activation):
        name = "scaled_tanh"

        def __init__(self, k: float):
            self.k = k

        def _derivatives(self, z, order):
            t = torch.tanh(self.k * z)
            s = 1 - t * t
            out = [t, self.k * s, -2 * self.k ** 2 * t * s, self.k ** 3 * s * (6 * t * t - 2)]
            return out[: order + 1]

    kernels_on_cpu()
    act = ScaledTanh(1.5)
    z = torch.randn(BURGERS.size, 30, 6, dtype=torch.float64)
    from pinnsketch.nn.fused import activation_jet

    a = activation_jet(z, act, BURGERS)
    torch.testing.assert_close(a, compose_streams(z, act.derivatives(z[0], BURGERS.order), BURGERS))
    assert kernels.activation_jet_kernel._variants       # it ran through the kernel
