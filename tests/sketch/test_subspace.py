"""TrackedSubspace: warm-started subspace iteration converges to the top eigenvectors."""

import pytest
import torch

from pinnsketch.sketch import TrackedSubspace


def _matrix(seed, n=400, w=48, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, w, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(w, w, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(w, dtype=torch.float64)
    return (u * s) @ v.mT, v, s


def test_from_gram_is_the_exact_top_subspace_and_energy():
    z, v, s = _matrix(0)
    t = TrackedSubspace.from_gram((z.mT @ z)[None], 6)
    assert torch.allclose(t.evals[0], s[:6] ** 2)
    assert torch.allclose(t.energy[0], (s ** 2).sum())
    proj = t.q[0] @ t.q[0].mT
    assert torch.linalg.norm(proj @ v[:, :6] - v[:, :6]) < 1e-10


def test_repeated_updates_converge_from_a_stale_basis():
    z, v, s = _matrix(1)
    other, _, _ = _matrix(2)
    t = TrackedSubspace.from_gram((other.mT @ other)[None], 6)      # a basis of another matrix
    for _ in range(60):
        t.update((z.mT @ z)[None], 6)
    proj = t.q[0] @ t.q[0].mT
    assert torch.linalg.norm(proj @ v[:, :4] - v[:, :4]) < 1e-6
    assert torch.allclose(t.evals[0, :4], s[:4] ** 2, rtol=1e-8)


def test_tail_factors_predict_the_residual_change():
    z, _, s = _matrix(3)
    t = TrackedSubspace.from_gram((z.mT @ z)[None], 16)
    factors = t.tail_factors(8)
    tail = lambda r: float((s[r:] ** 2).sum().sqrt())                # noqa: E731
    assert list(factors) == ["up", "down"]
    assert factors["up"] == pytest.approx(tail(16) / tail(8), rel=1e-8)
    assert factors["down"] == pytest.approx(tail(4) / tail(8), rel=1e-8)
    assert TrackedSubspace.from_gram((z.mT @ z)[None], 4).tail_factors(8) == {}


def test_batched_streams_are_independent_and_state_round_trips():
    a, _, _ = _matrix(4)
    b, _, _ = _matrix(5)
    grams = torch.stack([a.mT @ a, b.mT @ b])
    t = TrackedSubspace.from_gram(grams, 5)
    single = TrackedSubspace.from_gram(grams[1:], 5)
    assert torch.allclose(t.evals[1], single.evals[0])
    clone = TrackedSubspace.from_state(t.state())
    assert torch.equal(clone.q, t.q) and clone.q.data_ptr() != t.q.data_ptr()


def test_track_many_batches_and_matches_one_by_one():
    """Requests of several trackers (fresh and warm-started, two widths) in one call give what each gives alone."""
    from pinnsketch.sketch import SubspaceRequest, track_many

    gen = torch.Generator().manual_seed(5)
    grams = [(lambda z: z.mT @ z)(torch.randn(3, 40, w, generator=gen, dtype=torch.float64)) for w in (24, 24, 32)]
    old = [TrackedSubspace.from_gram(g, 4) for g in grams]
    nxt = [g + 0.1 * (lambda z: z.mT @ z)(torch.randn(3, 40, g.shape[-1], generator=gen, dtype=torch.float64))
           for g in grams]
    requests = [SubspaceRequest(old[0], nxt[0], 4), SubspaceRequest(old[1], nxt[1], 4),
                SubspaceRequest(None, nxt[2], 4), SubspaceRequest(old[2], nxt[2], 12)]   # k changes: fresh
    assert [r.fresh for r in requests] == [False, False, True, True]
    batched = track_many(requests)
    assert [r.result for r in requests] == batched and old[0].q.shape == (3, 24, 4)     # inputs untouched
    for r, got in zip(requests, batched):
        alone = track_many([SubspaceRequest(r.subspace, r.gram, r.k)])[0]
        assert got.q.shape == alone.q.shape == (3, r.gram.shape[-1], r.k)
        # the same subspace (columns may differ in sign), the same Ritz values and energy
        assert torch.allclose(got.q @ got.q.mT, alone.q @ alone.q.mT, atol=1e-10)
        assert torch.allclose(got.evals, alone.evals, rtol=1e-10) and torch.allclose(got.energy, alone.energy)
