import pytest
import torch

from pinnsketch.pinn import DerivativeNameError, Field


def make_field(input_names=("x", "t")):
    x = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    streams = {(): x, (0,): 2 * x, (1,): 3 * x, (0, 0): 4 * x, (0, 1): 5 * x, (0, 0, 0, 0): 6 * x}
    return Field("u", input_names, lambda mi: streams[mi]), x


def test_field_acts_as_its_value():
    u, x = make_field()
    assert torch.equal(u + 1, x + 1) and torch.equal(1 + u, 1 + x)
    assert torch.equal(u - 2, x - 2) and torch.equal(2 - u, 2 - x)
    assert torch.equal(3 * u, 3 * x) and torch.equal(u * u, x * x)
    assert torch.equal(u / 2, x / 2) and torch.equal(2 / u, 2 / x)
    assert torch.equal(u ** 2, x ** 2) and torch.equal(2 ** u, 2 ** x)
    assert torch.equal(-u, -x) and torch.equal(abs(-u), x)
    assert torch.equal(torch.sin(u), torch.sin(x))
    assert torch.equal(torch.stack([u, u]), torch.stack([x, x]))
    assert torch.equal(torch.where(u > 0.5, u, 0 * u), torch.where(x > 0.5, x, 0 * x))
    assert u.shape == (5,) and u.dtype == torch.float64 and len(u) == 5
    assert torch.equal(u[1:3], x[1:3])
    assert torch.equal(u.exp(), x.exp())


def test_derivatives_by_name():
    u, x = make_field()
    assert torch.equal(u.x, 2 * x) and torch.equal(u.t, 3 * x)
    assert torch.equal(u.xx, 4 * x)
    assert torch.equal(u.xt, 5 * x) and torch.equal(u.tx, 5 * x)  # mixed partials commute
    assert torch.equal(u.d("x", "t"), 5 * x) and torch.equal(u.d(), x)
    assert torch.equal(u.xxxx, 6 * x)
    assert torch.equal(u.x * u, 2 * x * x)


def test_unknown_derivative_names_are_clear_errors():
    u, _ = make_field()
    with pytest.raises(DerivativeNameError, match=r"'y'.*inputs are \('x', 't'\)"):
        u.y
    with pytest.raises(ValueError, match="xx"):  # also a ValueError, and names examples
        u.xy
    with pytest.raises(DerivativeNameError, match="order 5"):
        u.xxxxx
    with pytest.raises(DerivativeNameError, match="no such input"):
        u.d("z")


def test_multi_letter_inputs_use_d():
    streams = {(): torch.ones(3), (1,): 2 * torch.ones(3), (0, 1): 3 * torch.ones(3)}
    u = Field("u", ("x1", "x2"), lambda mi: streams[mi])
    assert torch.equal(u.d("x2"), 2 * torch.ones(3))
    assert torch.equal(u.d("x2", "x1"), 3 * torch.ones(3))
    with pytest.raises(DerivativeNameError, match=r"\.d\('x1', 'x1'\)"):
        u.x1x2
