"""Fixtures for tests/nn."""

import pytest

from pinnsketch.nn import JetSpec


@pytest.fixture
def spec2():
    """Burgers-like jet: value, u_x, u_t, u_xx over inputs (x, t)."""
    return JetSpec.from_names(["x", "t", "xx"], ("x", "t"))
