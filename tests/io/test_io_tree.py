"""write_tree / read_tree: nested containers of tensors round-trip exactly, nothing pickled."""

import math

import h5py
import numpy as np
import pytest
import torch

from pinnsketch.io import read_tree, write_tree


def _equal(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_every_kind_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(0)
    obj = {
        "tensors": [torch.randn(3, 4, generator=gen), torch.randn(5000, generator=gen, dtype=torch.float64),
                    torch.tensor(2.5), torch.arange(6).reshape(2, 3), torch.tensor([True, False]),
                    torch.randn(4, generator=gen).to(torch.bfloat16), torch.zeros(0, 3)],
        "array": np.linspace(0, 1, 7, dtype=np.float32),
        3: "int key", 2.5: "float key", None: "none key", True: "bool key",
        "a/b": "slash in key", "_private": 1, "": "empty key",
        "ints": [1, 2, -(2**62)], "floats": (0.5, math.inf, math.nan), "strs": ["adam", "lbfgs"],
        "mixed": [1, 2.0, "three", None, [4], (5,)], "empty": [], "empty_tuple": (),
        "scalars": {"i": 7, "f": -1.25, "b": False, "s": "text", "none": None, "big": 2**100, "bytes": b"\x00\xff"},
        "generator": gen.get_state(),
    }
    with h5py.File(tmp_path / "t.h5", "w") as f:
        write_tree(f, "obj", obj)
        write_tree(f, "obj", obj)          # rewriting replaces the node
    with h5py.File(tmp_path / "t.h5", "r") as f:
        back = read_tree(f["obj"])
        assert f["obj"].attrs["kind"] == "dict"
        assert f["obj/tensors/1"].compression == "gzip"     # large arrays are compressed
    _equal(obj, back)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    lambda p: torch.optim.LBFGS(p, lr=0.5, history_size=5, max_iter=1, line_search_fn="strong_wolfe"),
])
def test_optimizer_state_round_trip_continues_identically(tmp_path, make):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def train(model, opt, steps):
        for _ in range(steps):
            def closure():
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                return loss
            opt.step(closure)

    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x, y = x.double(), y.double()
    opt = make(model.parameters())
    train(model, opt, 4)
    with h5py.File(tmp_path / "o.h5", "w") as f:
        write_tree(f, "state", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    with h5py.File(tmp_path / "o.h5", "r") as f:
        saved = read_tree(f["state"])
    clone = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    clone.load_state_dict(saved["model"])
    clone_opt = make(clone.parameters())
    clone_opt.load_state_dict(saved["optimizer"])
    train(model, opt, 3)
    train(clone, clone_opt, 3)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_unsupported_objects_name_their_place(tmp_path):
    with h5py.File(tmp_path / "u.h5", "w") as f:
        with pytest.raises(TypeError, match=r"object at /x/inner/0"):
            write_tree(f, "x", {"inner": [object()]})
        assert "x" not in f
        with pytest.raises(TypeError, match="keys must be"):
            write_tree(f, "y", {(1, 2): 3})
