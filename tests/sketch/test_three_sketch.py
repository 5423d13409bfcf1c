"""ThreeSketch: accuracy on known spectra, error estimates, linearity, numpy agreement, validation."""

import math

import numpy as np
import pytest
import torch

from sketch_matrices import SPECTRA, known_spectrum, tail_error
from pinnsketch.sketch import LowRankFactors, ThreeSketch, sketch_sizes

M, N, R = 120, 80, 5
F64 = torch.float64


def _error(a, factors):
    return float(torch.linalg.matrix_norm(a - factors.dense()))


# -- sizes ----------------------------------------------------------------------------
def test_default_and_tropp_sizes():
    assert sketch_sizes((100, 50), 5) == (11, 23)
    assert sketch_sizes((100, 50), 5, sizing="tropp") == (21, 43)
    assert sketch_sizes((100, 8), 3) == (7, 8)              # clamped to min(rows, cols)
    assert sketch_sizes((100, 50), 5, k=12, s=30) == (12, 30)
    sk = ThreeSketch((M, N), R, sizing="tropp")
    assert (sk.rank, sk.k, sk.s, sk.error_size, sk.shape) == (R, 21, 43, 10, (M, N))


# -- accuracy on known spectra ----------------------------------------------------------
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_reconstruction_within_factor_3_of_optimal(operator_name, spectrum):
    """Both A_hat (rank k = 2r+1) and its rank-r truncation are within 3x the best rank-r error.

    (Tropp et al. 2019, Thm 5.1, bound the expected squared error by about 3x the
    optimal for these sizes; the worst of 20 seeds measured here was 2.4x.)
    """
    s = SPECTRA[spectrum]
    optimal = tail_error(s, R)
    for seed in range(4):
        a = known_spectrum(M, N, s, seed)
        sk = ThreeSketch.from_matrix(a, R, operator=operator_name, seed=seed)
        assert _error(a, sk.reconstruct()) <= 3 * optimal
        truncated = sk.reconstruct(R)
        assert truncated.rank == R
        assert _error(a, truncated) <= 3 * optimal


@pytest.mark.parametrize("spectrum", ["poly1", "poly2"])
def test_error_decreases_as_sketch_grows(operator_name, spectrum):
    """Mean error over 4 seeds strictly decreases with k, and is ~0 at k = s = min(m, n)."""
    s = SPECTRA[spectrum]
    means = []
    for k in (11, 21, 41, 80):
        errors = [_error(a, ThreeSketch.from_matrix(a, R, k=k, operator=operator_name, seed=seed).reconstruct())
                  for seed in range(4) for a in [known_spectrum(M, N, s, seed)]]
        means.append(np.mean(errors))
    assert all(later < earlier for earlier, later in zip(means, means[1:])), means
    assert means[-1] < 1e-10 * float(s.norm())


def test_exact_for_low_rank_matrix(operator_name):
    """rank(A) <= k: the sketch recovers A exactly (to rounding)."""
    a = known_spectrum(60, 40, torch.tensor([3.0, 2.0, 1.0], dtype=F64), seed=1)
    sk = ThreeSketch.from_matrix(a, 3, operator=operator_name, seed=2)
    assert _error(a, sk.reconstruct()) < 1e-10
    assert _error(a, sk.reconstruct(3)) < 1e-10
    assert sk.error_estimate() < 1e-10


def test_float32_accuracy(operator_name):
    s = SPECTRA["poly2"]
    a = known_spectrum(M, N, s, 0)
    sk = ThreeSketch.from_matrix(a.float(), R, operator=operator_name, seed=0)
    factors = sk.reconstruct()
    assert sk.dtype == torch.float32 and factors.Q.dtype == factors.C.dtype == torch.float32
    err = float(torch.linalg.matrix_norm(a - factors.dense().double()))
    assert err <= 3 * tail_error(s, R)


# -- error estimates --------------------------------------------------------------------
@pytest.mark.parametrize("spectrum", ["poly1", "exp"])
def test_error_estimate_within_factor_2(operator_name, spectrum):
    """In >= 80% of 20 seeds the a-posteriori estimate is within a factor 2 of the true error."""
    s = SPECTRA[spectrum]
    hits = rel_hits = 0
    for seed in range(20):
        a = known_spectrum(M, N, s, seed)
        sk = ThreeSketch.from_matrix(a, R, operator=operator_name, seed=100 + seed)
        factors = sk.reconstruct()
        true = _error(a, factors)
        hits += 0.5 <= sk.error_estimate(factors) / true <= 2
        true_rel = true / float(torch.linalg.matrix_norm(a))
        rel_hits += 0.5 <= sk.relative_error_estimate(factors) / true_rel <= 2
        # The estimate without explicit factors uses the same reconstruction.
        assert sk.error_estimate() == pytest.approx(sk.error_estimate(factors), rel=1e-9)
    assert hits >= 16 and rel_hits >= 16


def test_error_estimate_of_truncation_tracks_truth():
    s = SPECTRA["poly2"]
    a = known_spectrum(M, N, s, 3)
    sk = ThreeSketch.from_matrix(a, R, seed=3)
    ratio = sk.error_estimate(rank=2) / _error(a, sk.reconstruct(2))
    assert 0.5 <= ratio <= 2


def test_norm_estimate_and_zero_matrix():
    sk = ThreeSketch((30, 20), 2, dtype=F64)
    assert sk.error_estimate() == 0.0 and sk.relative_error_estimate() == 0.0
    a = known_spectrum(30, 20, SPECTRA["poly1"][:20], 0)
    sk.update(a)
    assert 0.5 <= sk.norm_estimate() / float(torch.linalg.matrix_norm(a)) <= 2


# -- linearity and updates --------------------------------------------------------------
def _sketches(sk):
    return (sk.Y, sk.X, sk.Z, sk.W)


def test_linearity(operator_name):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 30, generator=gen, dtype=F64), torch.randn(40, 30, generator=gen, dtype=F64)
    kw = dict(operator=operator_name, seed=5)
    sum_sketch = ThreeSketch.from_matrix(a + b, 4, **kw)
    sk_a, sk_b = ThreeSketch.from_matrix(a, 4, **kw), ThreeSketch.from_matrix(b, 4, **kw)
    for total, x, y in zip(_sketches(sum_sketch), _sketches(sk_a), _sketches(sk_b)):
        torch.testing.assert_close(total, x + y)
    streamed = ThreeSketch((40, 30), 4, dtype=F64, **kw)
    streamed.update(a)
    streamed.update(b)
    for total, x in zip(_sketches(sum_sketch), _sketches(streamed)):
        torch.testing.assert_close(total, x)


def test_theta_eta_update_and_ema(operator_name):
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(25, 35, generator=gen, dtype=F64) for _ in range(4)]
    kw = dict(operator=operator_name, seed=2, dtype=F64)
    sk = ThreeSketch((25, 35), 3, **kw)
    sk.update(mats[0])
    sk.update(mats[1], theta=0.3, eta=-2.0)
    direct = ThreeSketch.from_matrix(0.3 * mats[0] - 2.0 * mats[1], 3, **kw)
    for x, y in zip(_sketches(sk), _sketches(direct)):
        torch.testing.assert_close(x, y)
    # EMA: theta = beta, eta = 1 - beta is the sketch of the moving average.
    beta, ema, sk = 0.9, torch.zeros(25, 35, dtype=F64), ThreeSketch((25, 35), 3, **kw)
    for h in mats:
        ema = beta * ema + (1 - beta) * h
        sk.update(h, theta=beta, eta=1 - beta)
    for x, y in zip(_sketches(sk), _sketches(ThreeSketch.from_matrix(ema, 3, **kw))):
        torch.testing.assert_close(x, y)


def test_column_and_row_updates_equal_dense_updates(operator_name):
    """update_columns / update_rows are update(H) with H zero outside the given columns / rows."""
    gen = torch.Generator().manual_seed(3)
    kw = dict(operator=operator_name, seed=4, dtype=F64)
    start = torch.randn(30, 20, generator=gen, dtype=F64)
    cols, rows = [7, 0, 19], [29, 3]
    col_values = torch.randn(30, 3, generator=gen, dtype=F64)
    row_values = torch.randn(2, 20, generator=gen, dtype=F64)
    streamed = ThreeSketch.from_matrix(start, 3, **kw)
    streamed.update_columns(cols, col_values, theta=0.5, eta=2.0)
    streamed.update_rows(torch.tensor(rows), row_values, theta=0.9, eta=-1.0)
    h_cols, h_rows = torch.zeros(30, 20, dtype=F64), torch.zeros(30, 20, dtype=F64)
    h_cols[:, cols], h_rows[rows] = col_values, row_values
    expected = 0.9 * (0.5 * start + 2.0 * h_cols) - 1.0 * h_rows
    for x, y in zip(_sketches(streamed), _sketches(ThreeSketch.from_matrix(expected, 3, **kw))):
        torch.testing.assert_close(x, y)


def test_streaming_columns_reconstructs_trajectory():
    """One column per 'step' (the gradient-monitor use): the final sketch equals the sketch of the whole matrix."""
    a = known_spectrum(40, 25, SPECTRA["exp"][:25], 2)
    sk = ThreeSketch((40, 25), 4, dtype=F64, operator="srft", seed=1)
    for t in range(25):
        sk.update_columns([t], a[:, t:t + 1])
    whole = ThreeSketch.from_matrix(a, 4, operator="srft", seed=1)
    torch.testing.assert_close(sk.reconstruct().dense(), whole.reconstruct().dense())
    assert _error(a, sk.reconstruct()) <= 3 * tail_error(SPECTRA["exp"][:25], 4)


def test_state_dict_round_trip(operator_name):
    a = torch.randn(20, 15, generator=torch.Generator().manual_seed(0), dtype=F64)
    sk = ThreeSketch.from_matrix(a, 3, operator=operator_name, seed=7, error_size=5)
    state = sk.state_dict()
    clone = ThreeSketch.from_state_dict(state)
    assert clone.seed == 7 and clone.error_size == 5 and clone.dtype == F64
    for x, y in zip(_sketches(sk), _sketches(clone)):
        assert torch.equal(x, y)
    # Further updates stay identical: the test matrices were rebuilt from the seed.
    sk.update(a, theta=0.5)
    clone.update(a, theta=0.5)
    assert torch.equal(sk.reconstruct().dense(), clone.reconstruct().dense())
    with pytest.raises(ValueError, match=r"cannot load a state with rank=3 into a sketch with rank=2"):
        ThreeSketch((20, 15), 2, dtype=F64, operator=operator_name).load_state_dict(state)


def test_update_casts_dtype():
    a = torch.randn(10, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    sk = ThreeSketch((10, 8), 2)
    sk.update(a)
    torch.testing.assert_close(sk.Y, ThreeSketch.from_matrix(a.float(), 2).Y)


def test_reset():
    a = torch.randn(20, 15, generator=torch.Generator().manual_seed(0), dtype=F64)
    sk = ThreeSketch.from_matrix(a, 2, seed=1)
    y_before = sk.Y.clone()
    sk.reset()
    assert all(float(t.abs().max()) == 0 for t in _sketches(sk))
    sk.update(a)
    assert torch.equal(sk.Y, y_before)          # same test matrices
    sk.reset(seed=2)
    assert sk.seed == 2
    sk.update(a)
    assert not torch.allclose(sk.Y, y_before)   # redrawn test matrices
    assert torch.equal(sk.Y, ThreeSketch.from_matrix(a, 2, seed=2).Y)


# -- determinism ------------------------------------------------------------------------
def test_same_seed_identical_different_seed_differs(operator_name):
    a = known_spectrum(50, 40, SPECTRA["poly1"][:40], 0)
    one = ThreeSketch.from_matrix(a, 3, operator=operator_name, seed=9)
    two = ThreeSketch.from_matrix(a, 3, operator=operator_name, seed=9)
    other = ThreeSketch.from_matrix(a, 3, operator=operator_name, seed=10)
    for x, y, z in zip(_sketches(one), _sketches(two), _sketches(other)):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    assert torch.equal(one.reconstruct().dense(), two.reconstruct().dense())
    assert one.error_estimate() == two.error_estimate()


# -- agreement with a direct numpy computation ------------------------------------------
def test_matches_numpy(operator_name):
    """Rebuild the test matrices with dense() and redo Tropp's reconstruction in numpy."""
    a = known_spectrum(45, 35, SPECTRA["poly2"][:35], 4)
    sk = ThreeSketch.from_matrix(a, 4, operator=operator_name, seed=3)
    ops = {name: op.dense().numpy() for name, op in sk.operators.items()}
    an = a.numpy()
    y, x = an @ ops["Omega"].T, ops["Upsilon"] @ an
    z, w = ops["Phi"] @ an @ ops["Psi"].T, ops["Theta"] @ an
    for ours, theirs in zip(_sketches(sk), (y, x, z, w)):
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-12)
    q, _ = np.linalg.qr(y)
    p, _ = np.linalg.qr(x.T)
    left = np.linalg.lstsq(ops["Phi"] @ q, z, rcond=None)[0]
    c = np.linalg.lstsq(ops["Psi"] @ p, left.T, rcond=None)[0].T
    a_hat = q @ c @ p.T
    factors = sk.reconstruct()
    np.testing.assert_allclose(factors.dense().numpy(), a_hat, atol=1e-10)
    err = np.linalg.norm(w - ops["Theta"] @ a_hat)
    assert sk.error_estimate(factors) == pytest.approx(err, rel=1e-8)
    assert sk.norm_estimate() == pytest.approx(np.linalg.norm(w), rel=1e-12)


# -- memory -----------------------------------------------------------------------------
def test_nbytes(operator_name):
    m, n = 2000, 1000
    sk = ThreeSketch((m, n), R, operator=operator_name, dtype=F64)
    sketch_bytes = 8 * (m * sk.k + sk.k * n + sk.s**2 + 10 * n)
    operator_bytes = sum(op.nbytes for op in sk.operators.values())
    assert sk.nbytes == sketch_bytes + operator_bytes
    if operator_name == "gaussian":
        assert operator_bytes == 0                  # regenerated from seeds, nothing stored
    assert sk.nbytes < 0.05 * m * n * 8             # far below the dense matrix


# -- LowRankFactors -----------------------------------------------------------------------
def test_low_rank_factors_algebra():
    a = known_spectrum(30, 20, SPECTRA["poly1"][:20], 0)
    f = ThreeSketch.from_matrix(a, 3, seed=0).reconstruct()
    dense = f.dense()
    gen = torch.Generator().manual_seed(0)
    b, g = torch.randn(20, 4, generator=gen, dtype=F64), torch.randn(5, 30, generator=gen, dtype=F64)
    torch.testing.assert_close(f.matmul(b), dense @ b)
    torch.testing.assert_close(f.rmatmul(g), g @ dense)
    torch.testing.assert_close(f.matmul(b[:, 0]), dense @ b[:, 0])
    torch.testing.assert_close(f.T.dense(), dense.mT)
    assert f.shape == (30, 20) and f.T.shape == (20, 30) and f.rank == 7
    assert f.nbytes == 8 * (30 * 7 + 7 * 7 + 20 * 7)
    u, s, vh = f.svd()
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:7])
    t = f.truncate(2)
    assert t.rank == 2 and torch.equal(t.C, torch.diag(t.C.diagonal()))
    # Eckart-Young on A_hat: the truncation error equals the tail of A_hat's spectrum.
    assert float(torch.linalg.matrix_norm(dense - t.dense())) == pytest.approx(float(s[2:].norm()), rel=1e-9)


def test_low_rank_factors_validation():
    with pytest.raises(ValueError, match=r"inconsistent factor shapes"):
        LowRankFactors(torch.zeros(5, 2), torch.zeros(3, 3), torch.zeros(4, 2))
    f = LowRankFactors(torch.zeros(5, 2), torch.zeros(2, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"rank=3 must be <= 2"):
        f.truncate(3)


# -- bad input ----------------------------------------------------------------------------
def test_bad_arguments():
    with pytest.raises(ValueError, match=r"rank=50 exceeds min\(rows, cols\)=40.*pass rank <= 40"):
        ThreeSketch((60, 40), 50)
    with pytest.raises(ValueError, match=r"rank=0 must be >= 1"):
        ThreeSketch((60, 40), 0)
    with pytest.raises(ValueError, match=r"k=3 must be >= 4"):
        ThreeSketch((60, 40), 4, k=3)
    with pytest.raises(ValueError, match=r"s=5 must be >= 9"):
        ThreeSketch((60, 40), 4, k=9, s=5)
    with pytest.raises(ValueError, match=r"s=41 must be <= 40"):
        ThreeSketch((60, 40), 4, s=41)
    with pytest.raises(ValueError, match=r"sizing='big' is not one of 'default', 'tropp'"):
        ThreeSketch((60, 40), 4, sizing="big")
    with pytest.raises(ValueError, match=r"operator='dct' is not one of 'gaussian', 'sparse', 'srft'"):
        ThreeSketch((60, 40), 4, operator="dct")
    with pytest.raises(ValueError, match=r"shape must be a pair"):
        ThreeSketch(60, 4)
    with pytest.raises(ValueError, match=r"error_size=-1 must be >= 0"):
        ThreeSketch((60, 40), 4, error_size=-1)
    sk = ThreeSketch((6, 4), 2)
    with pytest.raises(ValueError, match=r"update H has shape \(4, 6\).*6 x 4 matrix.*\(6, 4\)"):
        sk.update(torch.zeros(4, 6))
    bad = torch.zeros(6, 4)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"update H has 1 non-finite entries"):
        sk.update(bad)
    bad[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"non-finite"):
        sk.update(bad)
    assert float(sk.Y.abs().max()) == 0          # rejected updates leave the sketch untouched
    with pytest.raises(ValueError, match=r"theta=nan must be finite"):
        sk.update(torch.zeros(6, 4), theta=math.nan)
    with pytest.raises(ValueError, match=r"rank=5 must be <= 4; the reconstruction has rank at most k=4"):
        sk.reconstruct(rank=5)
    with pytest.raises(ValueError, match=r"update values has shape \(6, 1\).*pass values of shape \(6, 2\)"):
        sk.update_columns([0, 1], torch.zeros(6, 1))
    with pytest.raises(ValueError, match=r"index has entries outside \[0, 4\): min 0, max 4"):
        sk.update_columns([0, 4], torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"index must be a 1-D sequence of integers"):
        sk.update_rows([0.5], torch.zeros(1, 4))
    no_error = ThreeSketch((6, 4), 2, error_size=0)
    assert "Theta" not in no_error.operators
    with pytest.raises(ValueError, match=r"error_size >= 1"):
        no_error.error_estimate()
