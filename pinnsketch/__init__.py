"""pinnsketch: physics-informed neural networks trained with sketched activation storage.

The public surface, by name. Subpackages hold the pieces:

- `pinnsketch.sketch`: randomized linear algebra (test operators, three-sketch, rank controllers)
- `pinnsketch.nn`: derivative jets, fused sketched layers, storage policies, models, memory meter
- `pinnsketch.pinn`: problems, conditions, geometry, the `solve` loop and its `Result`
- `pinnsketch.monitor`: gradient monitoring with streaming sketches
- `pinnsketch.io`: the HDF5 run file (write, load, checkpoint, inspect, plot)
- `pinnsketch.data`: MNIST / CIFAR-10 / digits loaders and classifier training
- `pinnsketch.problems`: the PDE library (one module per problem, with references)
"""

from . import data, io, monitor, nn, pinn, sketch
from .io import RunFileError, load
from .monitor import GradientMonitor
from .nn import CNN, MLP, Jet, JetSpec, MemoryMeter, ResidualMLP, make_storage
from .pinn import (
    LBFGS,
    RAR,
    Adam,
    SOAP,
    Callback,
    Causal,
    Dirichlet,
    Field,
    GradNormWeights,
    Initial,
    InitialVelocity,
    Network,
    Neumann,
    Parameter,
    Periodic,
    PointData,
    Points,
    Problem,
    Result,
    Robin,
    TrainingState,
    WarmupExponential,
    geometry,
    solve,
)

__version__ = "0.1.0"

__all__ = [
    # subpackages
    "sketch", "nn", "pinn", "monitor", "io", "data", "geometry",
    # defining and solving a PDE
    "Problem", "Parameter", "Field", "Dirichlet", "Neumann", "Robin", "Periodic", "Initial",
    "InitialVelocity", "PointData", "solve", "Result", "Network", "Adam", "LBFGS", "Points", "RAR",
    "Callback", "TrainingState",
    # training options
    "GradNormWeights", "Causal", "SOAP", "WarmupExponential",
    # the sketched-layer core
    "MLP", "ResidualMLP", "CNN", "Jet", "JetSpec", "make_storage", "MemoryMeter",
    # runs and monitoring
    "load", "RunFileError", "GradientMonitor",
]
