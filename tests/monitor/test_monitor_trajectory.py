"""TrajectorySketch.add_column is ThreeSketch.update of the dense one-column matrix."""

import pytest
import torch

from pinnsketch.monitor import IncrementalSVD, TrajectorySketch
from pinnsketch.sketch import ThreeSketch


@pytest.mark.parametrize("operator", ["gaussian", "sparse", "srft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_updates_equal_dense_updates(operator, dtype):
    gen = torch.Generator().manual_seed(0)
    m, n = 40, 12
    a = torch.randn(m, n, generator=gen, dtype=dtype)
    by_column = TrajectorySketch((m, n), 3, operator=operator, error_size=4, seed=7, dtype=dtype)
    dense = ThreeSketch((m, n), 3, operator=operator, error_size=4, seed=7, dtype=dtype)
    for j in range(n):
        by_column.add_column(j, a[:, j])
    dense.update(a)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, value in by_column.sketches().items():
        torch.testing.assert_close(value, getattr(dense, name), atol=tol, rtol=tol)


def test_column_errors_estimate_per_column_residuals():
    gen = torch.Generator().manual_seed(1)
    m, n, r = 200, 60, 4
    low = torch.randn(m, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen, dtype=torch.float64)
    a = low + 0.05 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    sketch = TrajectorySketch((m, n), r, error_size=40, seed=3, dtype=torch.float64)
    for j in range(n):
        sketch.add_column(j, a[:, j])
    factors = sketch.reconstruct()
    true = torch.linalg.vector_norm(a - factors.dense(), dim=0)
    est = sketch.column_errors(factors)
    ratio = est / true
    assert 0.7 < float(ratio.median()) < 1.3           # q = 40 degrees of freedom
    assert float((ratio - 1).abs().max()) < 0.8


def test_bad_columns_and_loading():
    sketch = TrajectorySketch((5, 4), 1, error_size=2)
    with pytest.raises(IndexError, match="column 4"):
        sketch.add_column(4, torch.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        sketch.add_column(0, torch.zeros(6))
    other = TrajectorySketch((5, 4), 1, error_size=2)
    other.add_column(1, torch.ones(5))
    sketch.load_sketches(other.sketches())
    assert torch.equal(sketch.X, other.X)
    with pytest.raises(ValueError, match="saved sketch Y"):
        sketch.load_sketches({**other.sketches(), "Y": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="error_size"):
        TrajectorySketch((5, 4), 1, error_size=0).column_errors(sketch.reconstruct())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_incremental_svd_matches_the_truncated_svd(dtype):
    gen = torch.Generator().manual_seed(2)
    m, n = 150, 80
    a = (torch.randn(m, 5, generator=gen, dtype=torch.float64) * torch.tensor([8.0, 4, 2, 1, 0.5], dtype=torch.float64)
         ) @ torch.randn(5, n, generator=gen, dtype=torch.float64)
    a[:, 3] = 0                                  # a zero column (a step without gradient)
    a = a.to(dtype)
    track = IncrementalSVD((m, n), 5, error_size=8, seed=1, dtype=dtype, reorthogonalize=16)
    for j in range(n):
        track.add_column(j, a[:, j])
    f = track.reconstruct()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(f.dense(), a, atol=tol * float(a.abs().max()), rtol=0)
    eye = torch.eye(5, dtype=dtype)
    torch.testing.assert_close(f.Q.mT @ f.Q, eye, atol=tol, rtol=0)
    torch.testing.assert_close(f.P.mT @ f.P, eye, atol=tol, rtol=0)
    assert float(track.column_errors(f).max()) < 1e3 * tol * float(a.norm())
    assert track.nbytes == (m * 5 + 5 + n * 5 + 8 * n) * a.element_size()
    with pytest.raises(ValueError, match="expected column 80"):
        track.add_column(3, a[:, 3])
    clone = IncrementalSVD((m, n), 5, error_size=8, seed=1, dtype=dtype)
    clone.load_sketches(track.sketches())
    torch.testing.assert_close(clone.reconstruct().dense(), f.dense())
