"""The frozen fixtures guard the schema: every version must keep loading, and files written now must
have the structure of the newest (write a new one with tests/fixtures/make_fixture.py only with a new
version)."""

import json

import h5py
import numpy as np
import pytest

from io_helpers import FIXTURE, OLD_FIXTURES
from pinnsketch.io import SCHEMA_VERSION, load, load_checkpoint
from pinnsketch.io.schema import GROUPS

# Root attributes whose values change from run to run.
VOLATILE = {"created", "wall_time_s", "pinnsketch_version", "torch_version", "h5py_version", "config",
            "saved_bytes_peak", "l2_relative_error"}


def _structure(path):
    """{object path: (type, dtype, ndim, attribute names)} of a file, ignoring values."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = ("file", None, None, tuple(sorted(f.attrs)))

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                dtype = obj.dtype.kind if obj.dtype.kind != "O" else "str"
                out[name] = ("dataset", dtype, obj.ndim, tuple(sorted(obj.attrs)))
            else:
                out[name] = ("group", None, None, tuple(sorted(obj.attrs)))
        f.visititems(visit)
    return out


def test_fixture_exists_and_is_small():
    assert FIXTURE.exists(), "run tests/fixtures/make_fixture.py to create the fixture"
    assert FIXTURE.stat().st_size < 1_000_000


@pytest.mark.parametrize("version", [2, 1])
def test_fixture_loads_with_known_content(version):
    path = FIXTURE if version == SCHEMA_VERSION else OLD_FIXTURES[version]
    run = load(path)
    assert run.schema_version == version and SCHEMA_VERSION == 2
    assert (run.problem, run.storage, run.seed, run.device, run.steps) == ("parabola1d", "exact", 3, "cpu", 30)
    assert run.completed and run.checkpoint_step == 30
    # 24 Adam steps, then L-BFGS steps of 2 iterations each: the step counter jumps by 2.
    assert run.training["step"].tolist() == list(range(1, 25)) + [26, 28, 30]
    assert run.training["phase"].tolist() == ["adam"] * 24 + ["lbfgs"] * 3
    assert set(run.losses) == {"pde", "dirichlet_u"}
    evaluated = run.training["step"][~np.isnan(run.training["l2_relative_error"])].tolist()
    assert evaluated == [8, 16, 24, 30]
    assert run.solution.x.shape == (64, 1) and run.solution.prediction.shape == (64, 1)
    np.testing.assert_allclose(run.solution.reference[:, 0], run.solution.x[:, 0] * (1 - run.solution.x[:, 0]))
    assert run.l2_relative_error == pytest.approx(
        np.linalg.norm(run.solution.error) / np.linalg.norm(run.solution.reference))
    np.testing.assert_allclose(run.predict(run.solution.x), run.solution.prediction, atol=1e-12)
    assert run.model_spec["init_kwargs"] == {"in_features": 1, "out_features": 1, "width": 8, "depth": 2,
                                             "activation": "tanh"}
    monitor = run.monitor()
    assert monitor.layers == ["blocks.0", "blocks.1", "blocks.2"] and len(monitor) == 27
    assert monitor.steps.tolist() == run.training["step"].tolist()
    assert monitor.config == {"rank": 2, "window": 32, "method": "three_sketch", "k": None, "s": None,
                              "sizing": "default", "operator": "gaussian", "error_size": 10, "normalize": False,
                              "step_sketch": 0, "step_operator": "srft",     # options newer than the fixture
                              "seed": 1, "dtype": "torch.float32"}
    np.testing.assert_allclose(monitor.norms().numpy(), np.stack(list(run.gradient_norms.values()), axis=1))
    state = load_checkpoint(path)
    assert state["format"] == "pinnsketch.TrainingState/1" and state["step"] == 30
    assert json.loads(run.attrs["config"])["problem"] == "parabola1d"
    assert run.model_state["blocks.0.weight"].shape == (8, 1)
    assert state["model"].keys() == run.model_state.keys()
    if version >= 2:
        assert run.attrs["status"] == "completed"


def test_checkpoint_is_compact_with_readable_names():
    with h5py.File(FIXTURE, "r") as f:
        checkpoint = f["checkpoint"]
        assert all(isinstance(node, h5py.Dataset) for node in checkpoint.values())     # flat: no subgroups
        names = set(checkpoint)
        assert {"structure", "model.blocks.0.weight", "points.base", "generator"} <= names
        assert not any(part.startswith("_") and part[1:].isdigit() for n in names for part in n.split("."))
        assert len(names) < 80
        assert all(isinstance(node, h5py.Dataset) for node in f["model/state"].values())


def test_files_written_now_have_the_fixture_structure(recorded_run):
    frozen, now = _structure(FIXTURE), _structure(recorded_run[0])
    assert sorted(frozen) == sorted(now), set(frozen) ^ set(now)
    for name in frozen:
        assert frozen[name] == now[name], name
    with h5py.File(FIXTURE, "r") as f, h5py.File(recorded_run[0], "r") as g:
        for key in set(f.attrs) - VOLATILE:
            assert f.attrs[key] == g.attrs[key], key
        assert set(f) == set(g) == set(GROUPS)
