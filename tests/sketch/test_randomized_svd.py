"""Randomized range finder and SVD against scipy."""

import numpy as np
import pytest
import scipy.linalg
import torch

from sketch_matrices import SPECTRA, known_spectrum
from pinnsketch.sketch import randomized_range_finder, randomized_svd

F64 = torch.float64


def test_randomized_svd_matches_scipy_on_low_rank_matrix():
    s_true = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=F64)
    a = known_spectrum(70, 50, s_true, seed=0)
    u, s, vh = randomized_svd(a, 5, seed=1)
    u_ref, s_ref, vh_ref = scipy.linalg.svd(a.numpy(), full_matrices=False)
    np.testing.assert_allclose(s.numpy(), s_ref[:5], rtol=1e-10)
    # Singular vectors agree up to sign: compare the projectors.
    np.testing.assert_allclose((u @ u.mT).numpy(), u_ref[:, :5] @ u_ref[:, :5].T, atol=1e-10)
    np.testing.assert_allclose((vh.mT @ vh).numpy(), vh_ref[:5].T @ vh_ref[:5], atol=1e-10)
    np.testing.assert_allclose((u * s @ vh).numpy(), a.numpy(), atol=1e-10)
    assert u.shape == (70, 5) and s.shape == (5,) and vh.shape == (5, 50)


def test_power_iterations_help_on_slow_decay():
    s_true = SPECTRA["poly1"][:50]
    a = known_spectrum(80, 50, s_true, seed=2)
    errors = []
    for q in (0, 2):
        _, s, _ = randomized_svd(a, 5, oversample=5, power_iters=q, seed=3)
        errors.append(float((s - s_true[:5]).abs().max()))
    assert errors[1] < 0.3 * errors[0]
    assert errors[1] < 1e-3


def test_range_finder_is_orthonormal_and_captures_range():
    a = known_spectrum(60, 40, torch.tensor([4.0, 2.0, 1.0], dtype=F64), seed=4)
    q = randomized_range_finder(a, 6, seed=0)
    assert q.shape == (60, 6)
    torch.testing.assert_close(q.mT @ q, torch.eye(6, dtype=F64))
    torch.testing.assert_close(q @ (q.mT @ a), a)


def test_float32_and_determinism():
    a = known_spectrum(60, 40, SPECTRA["exp"][:40], seed=5).float()
    u1, s1, vh1 = randomized_svd(a, 4, seed=7)
    u2, s2, vh2 = randomized_svd(a, 4, seed=7)
    assert s1.dtype == torch.float32
    assert torch.equal(u1, u2) and torch.equal(s1, s2) and torch.equal(vh1, vh2)
    torch.testing.assert_close(s1.double(), SPECTRA["exp"][:4], rtol=1e-4, atol=1e-5)
    q1 = randomized_range_finder(a, 4, power_iters=0, seed=7)
    q2 = randomized_range_finder(a, 4, power_iters=0, seed=8)
    assert not torch.equal(q1, q2)


def test_bad_arguments():
    a = torch.zeros(10, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"rank=7 must be <= 6; a 10 x 6 matrix has rank <= 6"):
        randomized_svd(a, 7)
    with pytest.raises(ValueError, match=r"size=0 must be >= 1"):
        randomized_range_finder(a, 0)
    with pytest.raises(ValueError, match=r"power_iters=-1 must be >= 0"):
        randomized_range_finder(a, 2, power_iters=-1)
    with pytest.raises(ValueError, match=r"oversample=-2 must be >= 0"):
        randomized_svd(a, 2, oversample=-2)
    with pytest.raises(ValueError, match=r"must be 2-D, got shape \(10,\)"):
        randomized_svd(torch.zeros(10), 1)
    with pytest.raises(TypeError, match=r"dtype torch.int64"):
        randomized_svd(torch.zeros(10, 6, dtype=torch.long), 1)
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"A has 1 non-finite entries"):
        randomized_svd(bad, 2)
