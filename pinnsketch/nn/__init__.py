"""pinnsketch.nn: fused dense blocks on derivative jets, storage policies, models, memory meter."""

from .activations import ACTIVATIONS, Activation, get_activation
from .codecs import BFloat16Codec, ExactCodec, IntCodec, make_codec
from .ema import EMAStorage
from .block import DenseBlock
from .fused import FusedDense
from .jet import Jet, JetSpec
from .lowrank import LowRankStorage
from .memory import MemoryMeter, ResidentPeak
from .models import CNN, MLP, ResidualMLP
from .gated import ModifiedMLP, PirateNet
from .embeddings import FourierFeatures, PeriodicEmbedding
from .policies import STORAGES, make_storage
from .projection import ProjectionStorage
from .storage import AbstractStorage, CheckpointStorage, ExactStorage, StorageError, Stored

__all__ = [
    "Jet",
    "JetSpec",
    "Activation",
    "ACTIVATIONS",
    "get_activation",
    "MLP",
    "ResidualMLP",
    "ModifiedMLP",
    "PirateNet",
    "FourierFeatures",
    "PeriodicEmbedding",
    "CNN",
    "DenseBlock",
    "FusedDense",
    "MemoryMeter",
    "ResidentPeak",
    "AbstractStorage",
    "Stored",
    "StorageError",
    "ExactStorage",
    "CheckpointStorage",
    "ProjectionStorage",
    "EMAStorage",
    "LowRankStorage",
    "STORAGES",
    "make_storage",
    "ExactCodec",
    "BFloat16Codec",
    "IntCodec",
    "make_codec",
]
