"""Fused blocks in exact mode: gradcheck on values and jets, chunked backward, jets vs nested autograd."""

import pytest
import torch

from pinnsketch.nn import MLP, ResidualMLP, JetSpec, make_storage
from pinnsketch.nn.activations import ACTIVATIONS, get_activation
from pinnsketch.nn.chain import ChainCall, ChainFunction, ChainStage
from pinnsketch.nn.chunking import row_chunks
from pinnsketch.nn.fused import BlockCall, FusedDense

from nn_helpers import nested_derivatives, plain_forward, rel

SPECS = {
    "value": JetSpec(2),
    "jet2": JetSpec(2, [(0,), (1,), (0, 0)]),
    "jet4": JetSpec(2, [(0, 0, 0, 0), (0, 1)]),
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("spec_name,chunk", [("value", 2**20), ("jet2", 2**20), ("jet2", 100), ("jet4", 2**20)])
def test_gradcheck_exact(activation, spec_name, chunk):
    spec = SPECS[spec_name]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(spec.size, 5, 3, generator=g, dtype=torch.float64)
    if activation == "relu":
        z[0] = z[0] + 0.1 * z[0].sign()     # stay off the kink where finite differences break
    z.requires_grad_(True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    call = BlockCall(get_activation(activation), spec, make_storage("exact"), chunk_bytes=chunk)
    assert torch.autograd.gradcheck(lambda z, w, b: FusedDense.apply(z, w, b, call), (z, w, b))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("spec_name,chunk", [("value", 2**20), ("jet2", 2**20), ("jet2", 100), ("jet4", 2**20)])
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_exact_chain(activation, spec_name, chunk, residual):
    """Two blocks (the second with a skip connection or not) as one chunked ChainFunction."""
    spec = SPECS[spec_name]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(spec.size, 5, 3, generator=g, dtype=torch.float64)
    if activation == "relu":
        z[0] = z[0] + 0.1 * z[0].sign()
    z.requires_grad_(True)
    params = [torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(2 if not residual else 3, 3, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(2 if not residual else 3, generator=g, dtype=torch.float64, requires_grad=True)]
    act = get_activation(activation)
    call = ChainCall((ChainStage(BlockCall(act, spec, make_storage("exact"))),
                      ChainStage(BlockCall(act, spec, make_storage("exact")), residual)), chunk)
    assert torch.autograd.gradcheck(lambda z, *p: ChainFunction.apply(z, call, *p), (z, *params))


def test_forward_matches_jet_linear(spec2):
    g = torch.Generator().manual_seed(1)
    from pinnsketch.nn import Jet

    z = torch.randn(spec2.size, 6, 3, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    call = BlockCall(get_activation("tanh"), spec2, make_storage("exact"))
    expected = Jet(z, spec2).map("tanh").linear(w, b).streams
    torch.testing.assert_close(FusedDense.apply(z, w, b, call), expected)


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
@pytest.mark.parametrize("activation", ["tanh", "sin", "gelu", "relu"])
def test_model_jet_matches_nested_autograd(cls, activation, spec2):
    model = cls(2, 2, width=8, depth=3, activation=activation, seed=3, dtype=torch.float64)
    x = torch.rand(11, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    jet = model.jet(x, spec2)
    ref = nested_derivatives(lambda x: plain_forward(model, x), x, spec2)
    torch.testing.assert_close(jet.streams, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model(x), ref[0].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
def test_parameter_gradients_match_nested_autograd(cls, spec2):
    """A Burgers-like residual loss: first-order backward through jets == double backward."""
    model = cls(2, 1, width=8, depth=3, activation="tanh", seed=5, dtype=torch.float64)
    x = torch.rand(13, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def loss_of(streams):
        u, ux, ut, uxx = streams
        return ((ut + u * ux - 0.01 * uxx) ** 2).mean() + (u ** 2).mean()

    loss_of(model.jet(x, spec2).streams).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_of(nested_derivatives(lambda x: plain_forward(model, x), x, spec2)).backward()
    for mine, ref in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
@pytest.mark.parametrize("storage", ["exact", "lowrank", "ema", "projection", "checkpoint"])
def test_chunked_step_equals_unchunked(cls, storage, spec2):
    """Forward values and parameter gradients do not depend on the chunking (50 rows: 1 chunk vs 7)."""
    x = torch.rand(50, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    results = []
    for chunk in (None, 8 * 4 * 16 * 8):                   # 8 rows of a 4-stream jet 16 wide in float64
        model = cls(2, 1, width=16, depth=3, seed=7, dtype=torch.float64, storage=storage, chunk_bytes=chunk)
        streams = model.jet(x, spec2).streams
        (streams ** 2).sum().backward()
        results.append([streams.detach(), *(p.grad.clone() for p in model.parameters())])
    for a, b in zip(*results):
        assert rel(a, b) < 1e-12


def test_chunks_split_only_calls_above_the_byte_budget():
    assert row_chunks(2780, 4 * 20 * 4, 8 << 20) == [slice(0, 2780)]     # the Burgers benchmark: one chunk
    parts = row_chunks(100, 10, 250)                                     # 25 rows of 10 bytes per chunk
    assert [(p.start, p.stop) for p in parts] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert [(p.start, p.stop) for p in row_chunks(5, 10, 1)] == [(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError, match="chunk_bytes"):
        row_chunks(5, 10, 0)


def test_gpu_default_is_one_chunk_per_block_at_the_issue_sizes():
    """On an H100/H200 (80-141 GiB) a 2-256x6-1 Burgers jet (4 streams, float32) is one chunk per block
    at 32,768 and 262,144 points: the chunk budget is 1/16 of device memory."""
    from pinnsketch.nn.chunking import CUDA_CHUNK_FRACTION

    for memory in (80 << 30, 141 << 30):
        budget = int(memory * CUDA_CHUNK_FRACTION)
        for points in (32_768, 262_144):
            assert row_chunks(points, 4 * 256 * 4, budget) == [slice(0, points)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_chunk_is_one_per_block():
    from pinnsketch.nn.chunking import default_chunk_bytes

    assert row_chunks(32_768, 4 * 256 * 4, default_chunk_bytes("cuda")) == [slice(0, 32_768)]


def test_block_shape_errors(spec2):
    model = MLP(2, 1, width=4, depth=1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        model(torch.rand(3, 3))
    with pytest.raises(ValueError, match="in_features=2"):
        model.jet(torch.rand(3, 3), JetSpec(3, [(0,)]))
