"""The run-file schema: version, group names, root attributes, model and monitor layouts.

See ``SCHEMA.md`` next to this file for the documented layout. Version 2 (version 1: the
checkpoint as a tree of groups, ``pinnsketch.io.tree``; still read).
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any

import h5py
import numpy as np
import torch

from .table import Table, read_table

__all__ = ["SCHEMA_VERSION", "GROUPS", "storage_spec", "model_spec", "build_model", "append_monitor_rows",
           "write_monitor_sketches", "read_monitor_state", "json_attr", "read_attrs"]

#: Version written to the root attribute ``schema_version``; readers accept files up to it.
SCHEMA_VERSION = 2

#: Top-level groups of a run file, in the order they are created.
GROUPS = ("training", "sketch", "gradients", "model", "solution", "checkpoint")

_MODEL_DTYPES = {"torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16,
                 "torch.float32": torch.float32, "torch.float64": torch.float64}


def json_attr(value: Any) -> str:
    """JSON text for an attribute (non-JSON objects fall back to their repr)."""
    return json.dumps(value, default=repr, allow_nan=True)


def read_attrs(node: h5py.HLObject) -> dict[str, Any]:
    """Attributes of ``node`` as plain Python values (strings decoded, numpy scalars unwrapped)."""
    out = {}
    for key, value in node.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    return out


# -- storage policies --------------------------------------------------------------------------
def storage_spec(policy) -> dict[str, Any]:
    """The configuration of a storage policy object: ``{"name", "options", "spec", "unrecorded"}``.

    ``options`` are the constructor's keyword arguments that differ from their defaults, read
    from the policy's ``config()`` when it has one, else from the same-named attribute (or
    ``fixed_<name>``); ``spec`` is the command-line form ``"name:key=value,..."``
    (``pinnsketch.data.bench.parse_storage``) when every argument could be read; ``unrecorded``
    names the arguments that could not (then give the policy as a spec string to record it).
    """
    import inspect

    from ..nn.policies import STORAGES

    name = next((n for n, cls in STORAGES.items() if type(policy) is cls), getattr(policy, "name", None))
    own = getattr(policy, "config", None)
    if callable(own):
        options, unrecorded = dict(own()), []
    else:
        options, unrecorded = {}, []
        for p in inspect.signature(type(policy).__init__).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            found = [a for a in (p.name, f"fixed_{p.name}") if a in vars(policy)]
            if not found:
                unrecorded.append(p.name)
                continue
            value = vars(policy)[found[0]]
            if p.default is p.empty or value != p.default:
                options[p.name] = value
    plain = all(isinstance(v, (int, float, str, bool)) or v is None for v in options.values())
    spec = None
    if name in STORAGES and not unrecorded and plain:
        spec = name + (":" + ",".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in options.items()) if options else "")
    return {"name": name, "options": options, "spec": spec, "unrecorded": unrecorded}


# -- model -----------------------------------------------------------------------------------
def model_spec(model: torch.nn.Module) -> dict[str, Any]:
    """What is needed to rebuild ``model``: class path, constructor kwargs (None when unknown), dtype."""
    cls = type(model)
    param = next(model.parameters(), None)
    spec = {"class": f"{cls.__module__}.{cls.__qualname__}", "init_kwargs": _init_kwargs(model),
            "dtype": str(param.dtype) if param is not None else "torch.float32",
            "device": str(param.device) if param is not None else "cpu",
            "parameters": sum(p.numel() for p in model.parameters())}
    storages = getattr(model, "storages", None)
    if storages is not None:
        spec["storage"] = [getattr(s, "name", type(s).__name__) for s in storages]
    return spec


def _init_kwargs(model: torch.nn.Module) -> dict | None:
    """Constructor keyword arguments of the pinnsketch.nn models (storage rebuilt as 'exact').

    A model provides its own through an ``init_kwargs`` attribute (a JSON-able dict): the
    MLPs and gated networks of `pinnsketch.nn` do, with their embedding, factorization and
    architecture options; the weights (Fourier matrices included) come from the state dict.
    """
    own = getattr(model, "init_kwargs", None)
    if isinstance(own, dict):
        return dict(own)
    from ..nn import CNN

    if isinstance(model, CNN):
        convs = (model.features[0], model.features[3])
        return {"channels": [convs[0].out_channels, convs[1].out_channels], "hidden": model.blocks[0].out_features,
                "num_classes": model.blocks[1].out_features, "in_channels": model.image_shape[0],
                "image_size": model.image_shape[1]}
    return None


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    """A fresh (untrained) model from :func:`model_spec` output, on the CPU; load weights into it."""
    path = spec.get("class", "")
    kwargs = spec.get("init_kwargs")
    if kwargs is None:
        raise ValueError(f"the run file does not record how to construct its model {path!r} (only "
                         "pinnsketch.nn models and models with an `init_kwargs` dict are rebuilt); build the "
                         "module yourself and call run.load_weights(module)")
    module_name, _, qualname = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the model class {path!r} recorded in the run file ({err}); "
                         "build the module yourself and call run.load_weights(module)") from None
    dtype = _MODEL_DTYPES.get(spec.get("dtype"), torch.float32)
    model = cls(**kwargs)
    return model.to(dtype)


# -- gradient monitor ------------------------------------------------------------------------
def _column(name: str) -> str:
    return name.replace("/", ".") or "_"


def append_monitor_rows(table: Table, monitor, written: int) -> int:
    """Append the monitor's steps ``written:`` (step and exact per-layer norms) to ``table``; returns its length."""
    steps = monitor.steps.tolist()
    if len(steps) > written:
        norms = monitor.norms()[written:].tolist()
        names = [f"norms/{_column(n)}" for n in monitor.layers]
        for step, row in zip(steps[written:], norms):
            table.append({"step": step, **dict(zip(names, row))})
        table.flush()
    return len(steps)


def write_monitor_sketches(group: h5py.Group, monitor, compression: str | None) -> None:
    """(Re)write the monitor's sketches and metadata (attributes) into ``group`` (/gradients)."""
    state = monitor.state_dict()
    names = state["layers"]
    report = monitor.memory_report()
    group.attrs.update(config=json_attr(state["config"]), layers=json_attr(names), sizes=json_attr(state["sizes"]),
                       itemsize=state["itemsize"], windows=len(state["windows"]),
                       monitor_bytes=report["monitor_bytes"], full_history_bytes=report["full_history_bytes"],
                       memory_reduction=report["memory_reduction"])
    if "sketches" in group:
        del group["sketches"]
    sketches = group.create_group("sketches")
    sketches.attrs["description"] = ("per window w and layer, of the (params x steps) gradient history G: "
                                     "three_sketch: Y = G Omega^T, X = Upsilon G, Z = Phi G Psi^T; isvd: "
                                     "G ~ V diag(S) U^T (filled = rank in use, count = columns); both: "
                                     "error sketch W = Theta G; with a step sketch: step_sketch (window x m), "
                                     "row t = Omega g_t")
    for w, window in enumerate(state["windows"]):
        wg = sketches.create_group(f"window_{w:05d}")
        for name, tensors in zip(names, window):
            lg = wg.create_group(_column(name))
            for key, value in tensors.items():
                data = value.numpy()
                big = data.size >= 4096 and compression
                lg.create_dataset(key, data=data, **(dict(chunks=True, compression=compression) if big else {}))


def read_monitor_state(group: h5py.Group) -> dict[str, Any]:
    """The ``GradientMonitor.state_dict()`` stored by :func:`append_monitor_rows` and :func:`write_monitor_sketches`."""
    attrs = read_attrs(group)
    names = json.loads(attrs["layers"])
    table = read_table(group)
    steps = torch.as_tensor(table.get("step", np.zeros(0, dtype=np.int64)), dtype=torch.int64)
    norms = np.stack([table[f"norms/{_column(n)}"] for n in names], axis=1) if len(steps) else \
        np.zeros((0, len(names)))
    windows = []
    for w in range(int(attrs["windows"])):
        wg = group["sketches"][f"window_{w:05d}"]
        windows.append([{key: torch.from_numpy(np.array(ds[()])) for key, ds in wg[_column(n)].items()}
                        for n in names])
    return {"config": json.loads(attrs["config"]), "layers": names, "sizes": json.loads(attrs["sizes"]),
            "itemsize": int(attrs["itemsize"]), "steps": steps,
            "norms": torch.as_tensor(norms, dtype=torch.float64), "windows": windows}


def finite_or_none(value) -> float | None:
    """``value`` as a float, or None when it is missing or NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value
