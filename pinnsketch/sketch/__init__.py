"""pinnsketch.sketch: randomized linear algebra on torch tensors (no torch.nn).

Test operators with E[S^T S] = I, the streaming three-sketch of Tropp et al.
(2019) with a-posteriori error estimates, low-rank factors, rank controllers,
the randomized range finder / SVD, and a subspace tracked through Gram matrices.
"""

from .factors import LowRankFactors
from .operators import (
    OPERATORS,
    AbstractSketchOperator,
    GaussianOperator,
    SparseSignOperator,
    SRFTOperator,
    make_operator,
)
from .randomized import randomized_range_finder, randomized_svd
from .rank import AbstractRankController, AdaptiveRank, FixedRank
from .seeding import derive_seed, make_generator
from .subspace import SubspaceRequest, TrackedSubspace, track_many
from .three_sketch import SIZINGS, ThreeSketch, sketch_sizes

__all__ = [
    "AbstractSketchOperator",
    "GaussianOperator",
    "SparseSignOperator",
    "SRFTOperator",
    "OPERATORS",
    "make_operator",
    "ThreeSketch",
    "SIZINGS",
    "sketch_sizes",
    "LowRankFactors",
    "AbstractRankController",
    "FixedRank",
    "AdaptiveRank",
    "randomized_range_finder",
    "randomized_svd",
    "TrackedSubspace",
    "SubspaceRequest",
    "track_many",
    "derive_seed",
    "make_generator",
]
