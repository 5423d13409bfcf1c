"""Test operators: agreement with their dense matrices, E[S^T S] = I, determinism, validation."""

import math

import numpy as np
import pytest
import torch

from pinnsketch.sketch import (OPERATORS, GaussianOperator, SparseSignOperator, SRFTOperator,
                               make_operator)

SHAPES = [(1, 1), (3, 7), (5, 16), (8, 33), (16, 16)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_methods_match_dense(operator_name, k, n, dtype):
    op = make_operator(operator_name, k, n, seed=11, dtype=dtype)
    s = op.dense()
    assert s.shape == (k, n) and s.dtype == dtype
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, 4, generator=gen, dtype=dtype)
    b = torch.randn(k, 3, generator=gen, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(op.apply(a), s @ a, **tol)
    torch.testing.assert_close(op.apply_right(a.mT), a.mT @ s.mT, **tol)
    torch.testing.assert_close(op.transpose_apply(b), s.mT @ b, **tol)
    torch.testing.assert_close(op.apply(a[:, 0]), s @ a[:, 0], **tol)
    torch.testing.assert_close(op.apply_right(a[:, 0]), s @ a[:, 0], **tol)
    torch.testing.assert_close(op.transpose_apply(b[:, 0]), s.mT @ b[:, 0], **tol)
    # dense() is built from columns(); applying to the identity goes through the fast path.
    torch.testing.assert_close(op.apply(torch.eye(n, dtype=dtype)), s, **tol)
    idx = [n - 1, 0, n // 2]
    torch.testing.assert_close(op.columns(idx), s[:, idx], **tol)


def test_expected_gram_is_identity(operator_name):
    """Monte Carlo over 1000 seeds: mean of S^T S within 0.15 of I (about 5 standard errors)."""
    k, n, trials = 3, 6, 1000
    mean = sum(_gram(operator_name, k, n, seed) for seed in range(trials)) / trials
    assert (mean - torch.eye(n, dtype=torch.float64)).abs().max() < 0.15


def _gram(name, k, n, seed):
    s = make_operator(name, k, n, seed=seed, dtype=torch.float64).dense()
    return s.mT @ s


def test_norm_preserved_in_expectation(operator_name):
    """E ||S x||^2 = ||x||^2: average over 300 seeds within 10%."""
    x = torch.linspace(-1, 2, 50, dtype=torch.float64)
    ratios = [make_operator(operator_name, 10, 50, seed=seed, dtype=torch.float64).apply(x).square().sum()
              / x.square().sum() for seed in range(300)]
    assert abs(float(torch.stack(ratios).mean()) - 1) < 0.1


def test_projected_weight_gradient_is_unbiased(operator_name):
    """E[(S G)^T (S A)] = G^T A (the `projection` storage policy).

    One draw is off by about 100-270% here (k = 8 of n = 40 rows); the mean of
    2000 draws must be within 20% (about 4 standard errors).
    """
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    a = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    exact = g.mT @ a
    total = torch.zeros_like(exact)
    for seed in range(2000):
        op = make_operator(operator_name, 8, 40, seed=seed, dtype=torch.float64)
        total += op.apply(g).mT @ op.apply(a)
    assert float(torch.linalg.matrix_norm(total / 2000 - exact) / torch.linalg.matrix_norm(exact)) < 0.2


def test_gaussian_entry_distribution():
    s = GaussianOperator(50, 2000, seed=3, dtype=torch.float64).dense()
    assert abs(float(s.mean())) < 5 / math.sqrt(50 * s.numel())      # 5 standard errors
    assert abs(float(s.var()) * 50 - 1) < 0.03


def test_sparse_sign_structure():
    op = SparseSignOperator(10, 40, seed=2, dtype=torch.float64, nnz=4)
    s = op.dense()
    assert op.nnz == 4
    assert torch.equal((s != 0).sum(0), torch.full((40,), 4))
    nonzero = s[s != 0].abs()
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, 0.5))
    assert op.nbytes == 40 * 4 * (4 + 1)          # int32 rows + int8 signs
    regenerated = SparseSignOperator(10, 40, seed=2, dtype=torch.float64, nnz=4, store=False)
    assert regenerated.nbytes == 0 and torch.equal(regenerated.dense(), s)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(regenerated.apply(x), s @ x)
    assert SparseSignOperator(20, 5, seed=0).nnz == 8   # default min(k, 8)
    assert SparseSignOperator(3, 5, seed=0).nnz == 3


def test_sparse_dense_and_scatter_paths_agree():
    """Small operands use index_add passes, large ones a dense S: both give S @ a."""
    op = SparseSignOperator(6, 30, seed=1, dtype=torch.float64, nnz=3)
    s = op.dense()
    gen = torch.Generator().manual_seed(2)
    for m in (1, 5, 50):                     # k * n = 180 vs operand sizes 30, 150, 1500
        a = torch.randn(30, m, generator=gen, dtype=torch.float64)
        b = torch.randn(6, m, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(op.apply(a), s @ a)
        torch.testing.assert_close(op.apply_right(a.mT), a.mT @ s.mT)
        torch.testing.assert_close(op.transpose_apply(b), s.mT @ b)


@pytest.mark.parametrize("k,n", [(4, 16), (5, 33), (7, 7)])
def test_srft_rows_are_scaled_orthonormal(k, n):
    """S = sqrt(n/k) R H D with H orthogonal: S S^T = (n/k) I_k exactly."""
    s = SRFTOperator(k, n, seed=5, dtype=torch.float64).dense()
    torch.testing.assert_close(s @ s.mT, torch.eye(k, dtype=torch.float64) * n / k)
    # Every entry has the magnitude of a Hartley coefficient: |cas| / sqrt(k) <= sqrt(2/k).
    assert float(s.abs().max()) <= math.sqrt(2 / k) + 1e-12


def test_srft_matches_numpy_hartley():
    """The FFT path equals sqrt(n/k) R H D built in numpy from the operator's rows and signs."""
    k, n = 6, 21
    op = SRFTOperator(k, n, seed=9, dtype=torch.float64)
    rows, signs = op._rows.numpy(), op._signs.numpy().astype(float)
    assert len(set(rows.tolist())) == k and set(signs.tolist()) <= {-1.0, 1.0}
    angle = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
    hartley = (np.cos(angle) + np.sin(angle)) / np.sqrt(n)
    expected = np.sqrt(n / k) * hartley[rows] * signs
    np.testing.assert_allclose(op.apply(torch.eye(n, dtype=torch.float64)).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(op.dense().numpy(), expected, atol=1e-12)


def test_gaussian_blocks_and_store():
    """Many blocks (n > 2**18 / k): regenerated, stored and column access agree."""
    op = GaussianOperator(3, 90_000, seed=4, dtype=torch.float64)
    stored = GaussianOperator(3, 90_000, seed=4, dtype=torch.float64, store=True)
    assert op._num_blocks == 2 and op.nbytes == 0 and stored.nbytes == 3 * 90_000 * 8
    dense = op.dense()
    assert torch.equal(dense, stored.dense())
    a = torch.randn(90_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(op.apply(a), dense @ a)
    torch.testing.assert_close(op.apply_right(a.mT), a.mT @ dense.mT)
    torch.testing.assert_close(op.transpose_apply(a[:3]), dense.mT @ a[:3])
    idx = [0, 87_380, 87_381, 89_999]
    assert torch.equal(op.columns(idx), dense[:, idx])


def test_same_seed_same_matrix_different_seed_differs(operator_name):
    a = make_operator(operator_name, 4, 12, seed=7, dtype=torch.float64).dense()
    b = make_operator(operator_name, 4, 12, seed=7, dtype=torch.float64).dense()
    c = make_operator(operator_name, 4, 12, seed=8, dtype=torch.float64).dense()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_does_not_touch_global_rng(operator_name):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_operator(operator_name, 4, 12, seed=1).apply(torch.ones(12))
    assert torch.equal(torch.rand(3), expected)


def test_registry_and_repr():
    assert set(OPERATORS) == {"gaussian", "sparse", "srft"}
    op = make_operator("sparse", 3, 9, seed=1, nnz=2)
    assert isinstance(op, SparseSignOperator) and op.shape == (3, 9) and op.dtype == torch.float32
    assert "SparseSignOperator(k=3, n=9, seed=1" in repr(op)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"operator='bogus' is not one of 'gaussian', 'sparse', 'srft'"):
        make_operator("bogus", 3, 4, seed=0)
    with pytest.raises(ValueError, match=r"k=5.*n=4"):
        SRFTOperator(5, 4, seed=0)
    with pytest.raises(ValueError, match=r"k=0 must be >= 1"):
        GaussianOperator(0, 4, seed=0)
    with pytest.raises(TypeError, match=r"n must be an integer, got 4.0"):
        GaussianOperator(2, 4.0, seed=0)
    with pytest.raises(ValueError, match=r"seed=-1 must be >= 0"):
        GaussianOperator(2, 4, seed=-1)
    with pytest.raises(ValueError, match=r"nnz=5 must be <= 3"):
        SparseSignOperator(3, 4, seed=0, nnz=5)
    with pytest.raises(ValueError, match=r"dtype=torch.float16 is not supported"):
        GaussianOperator(2, 4, seed=0, dtype=torch.float16)
    op = GaussianOperator(2, 4, seed=0)
    with pytest.raises(ValueError, match=r"shape \(5, 3\)"):
        op.apply(torch.zeros(5, 3))
    with pytest.raises(TypeError, match=r"dtype torch.float64"):
        op.apply(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must be 1-D or 2-D"):
        op.apply(torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match=r"out of range for n=4"):
        op.columns([4])
