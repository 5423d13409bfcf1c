"""pinnsketch: physics-informed neural networks trained with sketched activation storage.

The public surface, by name. Subpackages hold the pieces:

- `pinnsketch.sketch`: randomized linear algebra (test operators, three-sketch, rank controllers)
- `pinnsketch.nn`: derivative jets, fused sketched layers, storage policies, models, memory meter
- `pinnsketch.training`: one optimizer step (`train_step`), callbacks and the `TrainingState`
- `pinnsketch.monitor`: gradient monitoring with streaming sketches
- `pinnsketch.io`: the HDF5 run file (write, load, checkpoint, inspect, plot)
- `pinnsketch.pinn`: problems, conditions, geometry, the `solve` loop and its `Result`
- `pinnsketch.data`: MNIST / CIFAR-10 / digits loaders, classifier training and the `bench` command
- `pinnsketch.problems`: the PDE library (one module per problem, with references)
- `pinnsketch.cli`: the `pinnsketch` command line

Layers, lowest first: _version -> sketch -> nn -> training -> monitor -> io, pinn, data -> problems -> cli -> __main__

A part imports only itself and the layers before its own; parts of one layer do not import each
other (`tests/test_layering.py` checks every import, including those inside functions). So run
files (`io`) are written and read without the PINN solver, the solver saves nothing itself
(`pinnsketch.save(result, path)` is `io.save_result`), and classifier training (`data`) shares
`training` with the solver without importing it. This root module re-exports the public surface
and sits above them all.
"""

from . import data, io, monitor, nn, pinn, sketch, training
from .io import RunFileError, load
from .io import save_result as save
from .monitor import GradientMonitor
from .nn import CNN, MLP, Jet, JetSpec, MemoryMeter, ModifiedMLP, PirateNet, ResidualMLP, make_storage
from .training import EarlyStopping, TrainingDivergedError
from .pinn import (
    LBFGS,
    RAR,
    Adam,
    SOAP,
    Callback,
    Causal,
    Constant,
    Cosine,
    Dirichlet,
    Distributed,
    Exponential,
    Factorized,
    Field,
    Fourier,
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
    TimeWindowNetwork,
    TimeWindows,
    TrainingState,
    WarmupExponential,
    geometry,
    solve,
)

from ._version import __version__

__all__ = [
    # subpackages
    "sketch", "nn", "training", "pinn", "monitor", "io", "data", "geometry",
    # defining and solving a PDE
    "Problem", "Parameter", "Field", "Dirichlet", "Neumann", "Robin", "Periodic", "Initial",
    "InitialVelocity", "PointData", "solve", "Distributed", "Result", "Network", "Fourier", "Factorized", "Adam",
    "LBFGS", "Points", "RAR", "Callback", "TrainingState", "EarlyStopping", "TrainingDivergedError",
    # training options
    "GradNormWeights", "Causal", "TimeWindows", "TimeWindowNetwork", "SOAP", "Constant", "Cosine", "Exponential",
    "WarmupExponential",
    # the sketched-layer core
    "MLP", "ResidualMLP", "ModifiedMLP", "PirateNet", "CNN", "Jet", "JetSpec", "make_storage", "MemoryMeter",
    # runs and monitoring
    "load", "save", "RunFileError", "GradientMonitor",
]
