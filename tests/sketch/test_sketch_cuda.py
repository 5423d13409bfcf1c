"""CUDA path (skipped without a GPU): the same numerics on the inputs' device."""

import pytest
import torch

from sketch_matrices import SPECTRA, known_spectrum, tail_error
from pinnsketch.sketch import ThreeSketch, make_operator, randomized_svd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operators_on_cuda(operator_name, dtype):
    op = make_operator(operator_name, 6, 50, seed=1, dtype=dtype, device="cuda")
    s = op.dense()
    assert s.is_cuda
    a = torch.randn(50, 3, dtype=dtype, device="cuda")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(op.apply(a), s @ a, **tol)
    torch.testing.assert_close(op.apply_right(a.mT), a.mT @ s.mT, **tol)
    torch.testing.assert_close(op.transpose_apply(a[:6]), s.mT @ a[:6], **tol)
    # Deterministic on the device too.
    assert torch.equal(make_operator(operator_name, 6, 50, seed=1, dtype=dtype, device="cuda").dense(), s)


def test_three_sketch_on_cuda(operator_name):
    s = SPECTRA["poly2"]
    a = known_spectrum(120, 80, s, 0).float().cuda()
    sk = ThreeSketch.from_matrix(a, 5, operator=operator_name, seed=0)
    assert sk.device.type == "cuda" and sk.Y.is_cuda
    factors = sk.reconstruct()
    err = float(torch.linalg.matrix_norm(a - factors.dense()))
    assert err <= 3 * tail_error(s, 5)
    assert 0.5 <= sk.error_estimate(factors) / err <= 2
    with pytest.raises(ValueError, match=r"is on device cpu"):
        sk.update(a.cpu())


def test_randomized_svd_on_cuda():
    a = known_spectrum(70, 50, torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64), 0).cuda()
    u, s, vh = randomized_svd(a, 3)
    assert u.is_cuda
    torch.testing.assert_close(s.cpu(), torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64))
