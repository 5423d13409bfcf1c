"""pinnsketch.pinn: define a PDE as a `Problem`, call `solve`, get a checked `Result`."""

from . import geometry
from .conditions import Condition, Dirichlet, Initial, InitialVelocity, Neumann, Periodic, PointData, Robin
from ..training.distributed import Distributed
from .derivatives import AutogradDerivatives, DerivativeProvider, JetDerivatives
from .errors import DerivativeNameError, ProblemDefinitionError, TrainingDivergedError
from .fields import Field
from .causal import Causal
from .options import (LBFGS, RAR, SOAP, Adam, Constant, Cosine, Exponential, Factorized, Fourier, Network, Points,
                      Schedule, WarmupExponential)
from .problem import Parameter, Problem
from .result import Result
from .solver import DEFAULTS, loss_terms, solve
from .weighting import GradNormWeights
from .windows import TimeWindowNetwork, TimeWindows
from ..training import Callback, EarlyStopping, ProgressBar, TrainingState

__all__ = [
    "geometry",
    "Problem",
    "Parameter",
    "Field",
    "Condition",
    "Dirichlet",
    "Neumann",
    "Robin",
    "Periodic",
    "Initial",
    "InitialVelocity",
    "PointData",
    "solve",
    "Distributed",
    "loss_terms",
    "DEFAULTS",
    "Result",
    "Network",
    "Fourier",
    "Factorized",
    "Adam",
    "LBFGS",
    "SOAP",
    "GradNormWeights",
    "Causal",
    "TimeWindows",
    "TimeWindowNetwork",
    "Points",
    "RAR",
    "Schedule",
    "Constant",
    "Cosine",
    "Exponential",
    "WarmupExponential",
    "Callback",
    "TrainingState",
    "EarlyStopping",
    "ProgressBar",
    "DerivativeProvider",
    "JetDerivatives",
    "AutogradDerivatives",
    "ProblemDefinitionError",
    "DerivativeNameError",
    "TrainingDivergedError",
]
