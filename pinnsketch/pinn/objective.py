"""The PINN loss: named mean-square terms from the residual and the conditions.

`Objective.discover` runs the residual once on a few points with fields that
record which derivatives are read (computed by the run's derivative
provider, so the values are real), validates the residual's shape and term names, and fixes the JetSpec
of the training passes. Each loss evaluation then stacks the
interior and condition points and carries the union of their specs: one
network pass (and one storage-policy pack per layer) per loss evaluation.
"""

from __future__ import annotations

import inspect

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..nn.jet import JetSpec
from .causal import CausalWeights
from .conditions import Condition, as_column
from .derivatives import DerivativeProvider, discover_fields, fields_of
from .errors import ProblemDefinitionError
from .problem import Layout, Problem
from .sampling import CollocationPoints

__all__ = ["Objective"]

MultiIndex = tuple[int, ...]
_PROBE_POINTS = 8


def _residual_terms(out, n: int, kind: str) -> dict[str, torch.Tensor]:
    """Normalize residual output to {term: (n,) tensor}."""
    if isinstance(out, Mapping):
        items = list(out.items())
        bad = [k for k, _ in items if not isinstance(k, str) or not k]
        if bad:
            raise ProblemDefinitionError(f"{kind}.residual returned a dict with non-string keys {bad}; use term names")
    elif isinstance(out, (tuple, list)):
        if not out:
            raise ProblemDefinitionError(f"{kind}.residual returned an empty {type(out).__name__}; return at least one term")
        items = [(f"pde_{i}", v) for i, v in enumerate(out)] if len(out) > 1 else [("pde", out[0])]
    else:
        items = [("pde", out)]
    terms = {}
    for name, value in items:
        if value is None or not hasattr(value, "shape"):
            raise ProblemDefinitionError(
                f"{kind}.residual term {name!r} is {value!r}; return an (N,) tensor per term"
            )
        terms[name] = as_column(getattr(value, "value", value), n, f"{kind}.residual term {name!r}")
    return terms


class Objective:
    """Loss terms of a problem on the run's collocation points.

    Args:
        problem, layout: the problem and its validated layout.
        network: the model; provider: how derivatives are computed.
        points: the run's CollocationPoints; dtype, device: of the tensors.
        loss_weights: None or {term: weight}; multiplies the conditions' own weights.
        causal: None or a `CausalWeights`: the residual terms become causally weighted
            mean squares over time chunks (`causal.py`).

    `weights` (n_terms,) are the weights of `total`; gradient-norm balancing
    (`weighting.py`) replaces them during training.
    """

    def __init__(self, problem: Problem, layout: Layout, network: torch.nn.Module, provider: DerivativeProvider,
                 points: CollocationPoints, dtype: torch.dtype, device: torch.device,
                 loss_weights: Mapping[str, float] | None = None, causal: CausalWeights | None = None):
        self.causal = causal
        self.problem, self.layout, self.network, self.provider = problem, layout, network, provider
        self.points, self.dtype, self.device = points, dtype, device
        self.transform = getattr(problem, "output_transform", None)
        self.conditions: list[Condition] = list(points.conditions)
        self.residual_spec, self.residual_terms = self.discover()
        self.condition_spec = JetSpec(
            layout.dim, set().union(*(c.derivatives(layout) for c in self.conditions))
        )
        # one pass over all points carries the union (conditions rarely need more than the residual)
        self.spec = JetSpec(layout.dim, [*self.residual_spec.indices, *self.condition_spec.indices])
        names = [c.term_name(layout) for c in self.conditions]
        self.condition_terms = _unique(names, taken=self.residual_terms)
        self.term_names = [*self.residual_terms, *self.condition_terms]
        self.weights = self._weights(loss_weights)
        # multi-process runs (`distributed.Group.shard_sets`): this rank's rows of each point set;
        # term_scale (n_terms,) is each term's share of its set, so the ranks' terms sum to the global ones
        self.shard = None
        self.term_scale: torch.Tensor | None = None
        self._version = -1

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Evaluate in `dtype` from now on (the point tensors are rebuilt at the next evaluation)."""
        self.dtype = dtype
        self.weights = self.weights.to(dtype)
        if self.term_scale is not None:
            self.term_scale = self.term_scale.to(dtype)
        self._version = -1

    # --- set-up -------------------------------------------------------------------------
    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=self.dtype).to(self.device)

    def discover(self) -> tuple[JetSpec, list[str]]:
        """Run the residual once on a few points; return its JetSpec and term names."""
        x = self._tensor(self.points.domain[:_PROBE_POINTS])
        fields, requested = discover_fields(
            self.provider, self.network, x, self.layout.input_names, self.layout.output_names, self.transform
        )
        kind = type(self.problem).__name__
        try:
            inspect.signature(self.problem.residual).bind(x, *fields)
        except TypeError:
            raise ProblemDefinitionError(
                f"{kind}.residual must take (x, {', '.join(self.layout.output_names)}): x and one field per "
                f"output name; its signature is {inspect.signature(self.problem.residual)}"
            ) from None
        out = self.problem.residual(x, *fields)
        terms = _residual_terms(out, len(x), kind)
        return JetSpec(self.layout.dim, requested), list(terms)

    def _weights(self, loss_weights) -> torch.Tensor:
        given = dict(loss_weights or {})
        unknown = sorted(set(given) - set(self.term_names))
        if unknown:
            raise ValueError(f"loss_weights has unknown terms {unknown}; the terms are {self.term_names}")
        for name, w in given.items():
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"loss_weights[{name!r}]={w!r} must be a number >= 0")
        own = [1.0] * len(self.residual_terms) + [c.weight for c in self.conditions]
        return torch.tensor([o * float(given.get(n, 1.0)) for o, n in zip(own, self.term_names)],
                            dtype=self.dtype, device=self.device)

    def _refresh(self) -> None:
        """Rebuild the stacked point tensor when the point sets changed.

        All points go through the network in one pass: interior points first, then
        each condition's points; `self.slices[0]` is the interior, then one slice
        per condition.
        """
        if self._version == self.points.version:
            return
        cps = self.points.conditions_points
        parts = [self.points.domain, *(cp.x for cp in cps)]
        extras = [cp.extras for cp in cps]
        if self.shard is not None:
            paired = [False] + [c.kind == "periodic" for c in self.conditions]  # Periodic: n points, then images
            parts, extras, shares = self.shard(parts, extras, paired)
            scale = [shares[0]] * len(self.residual_terms) + list(shares[1:])
            self.term_scale = torch.tensor(scale, dtype=self.dtype, device=self.device)
        self.x_all = self._tensor(np.concatenate(parts))
        self.x_parts = [self._tensor(p) for p in parts]  # the compiled step's inputs (`compiled.py`)
        bounds = np.cumsum([0] + [len(p) for p in parts])
        self.slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.extras = [{k: self._tensor(v) for k, v in extra.items()} for extra in extras]
        self._version = self.points.version

    # --- evaluation ---------------------------------------------------------------------
    def _fields(self, jet, what: str):
        return fields_of(jet, self.layout.input_names, self.layout.output_names, what)

    def _residual_terms_at(self, x: torch.Tensor, fields) -> dict[str, torch.Tensor]:
        terms = _residual_terms(self.problem.residual(x, *fields), len(x), type(self.problem).__name__)
        if list(terms) != self.residual_terms:
            raise ProblemDefinitionError(
                f"residual returned terms {list(terms)} but {self.residual_terms} on its first call; "
                "return the same terms every time"
            )
        return terms

    def residuals(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The residual terms at x (N, d), each (N,)."""
        jet = self.provider(self.network, x, self.residual_spec, self.transform)
        return self._residual_terms_at(x, self._fields(jet, f"{type(self.problem).__name__}.residual"))

    def terms(self) -> torch.Tensor:
        """Unweighted mean-square loss of every term, (n_terms,) in `term_names` order."""
        self._refresh()
        x = self.x_all
        jet = self.provider(self.network, x, self.spec, self.transform)
        return self.terms_of(x, jet, self.slices, self.extras)

    def terms_of(self, x: torch.Tensor, jet, slices: Sequence[slice], extras: Sequence[dict]) -> torch.Tensor:
        """The terms from the jet of all points x (N, d): `slices[0]` the interior, then one per condition."""
        inner = slices[0]
        fields = self._fields(jet[inner], f"{type(self.problem).__name__}.residual")
        residuals = list(self._residual_terms_at(x[inner], fields).values())
        if self.causal is not None:
            losses = self.causal.reduce(x[inner], residuals)
        else:
            losses = [r.square().mean() for r in residuals]
        for cond, rows, extra in zip(self.conditions, slices[1:], extras):
            column = self.layout.field_index(cond.field, type(cond).__name__)
            u = self._fields(jet[rows], "a condition")[column]
            # user-supplied values were shape-checked inside the condition
            losses.append(cond.residual(x[rows], u, extra, self.layout).square().mean())
        return torch.stack(losses)

    def total(self, terms: torch.Tensor) -> torch.Tensor:
        return (self.weights * terms).sum()

    @torch.no_grad()
    def pointwise(self, x: np.ndarray, batch: int = 8192) -> np.ndarray:
        """Sum over residual terms of |r|^2 at x (M, d) (for refinement), (M,)."""
        out = []
        for start in range(0, len(x), batch):
            xb = self._tensor(x[start:start + batch])
            terms = self.residuals(xb)
            out.append(sum(r.square() for r in terms.values()).double().cpu().numpy())
        return np.concatenate(out)


def _unique(names: Sequence[str], taken: Sequence[str]) -> list[str]:
    """Make term names unique: a repeated name gets a suffix _2, _3, ..."""
    seen = set(taken)
    out = []
    for name in names:
        candidate, k = name, 2
        while candidate in seen:
            candidate, k = f"{name}_{k}", k + 1
        seen.add(candidate)
        out.append(candidate)
    return out
