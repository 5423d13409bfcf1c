"""Session fixtures of the io tests: one recorded solve shared by the read-side tests."""

from __future__ import annotations

import pytest

from io_helpers import write_fixture


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory):
    """(path, Result, GradientMonitor) of the 30-step Parabola1D solve that also made the frozen fixture.

    Written now by the current code with the fixture script's options, so its structure must
    equal the frozen tests/fixtures/run_v1.h5.
    """
    return write_fixture(tmp_path_factory.mktemp("recorded") / "run.h5")
