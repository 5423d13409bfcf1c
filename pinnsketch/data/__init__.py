"""pinnsketch.data: MNIST / CIFAR-10 loaders (real formats, offline fallbacks), classifier
training through the sketched-layer core, and the `pinnsketch bench` comparison."""

from .bench import BENCH_DEFAULTS, DEFAULT_STORAGES, format_table, parse_storage, run_bench
from .cifar import CIFAR10_CLASSES, CIFAR10_FILES, load_cifar10, read_cifar_batch
from .classify import MINIBATCH_OPTIONS, ClassifierResult, evaluate, make_classifier, minibatch_storage, train_classifier
from .dataset import DataDirectoryError, DataFormatError, ImageDataset
from .digits import load_digits
from .idx import read_idx
from .loaders import DATASETS, load_dataset
from .mnist import MNIST_FILES, load_mnist, load_mnist_subset, stratified_split
from .preprocess import Standardizer

__all__ = [
    # data
    "DATASETS",
    "ImageDataset",
    "DataDirectoryError",
    "DataFormatError",
    "load_dataset",
    "load_mnist",
    "load_mnist_subset",
    "load_cifar10",
    "load_digits",
    "read_idx",
    "read_cifar_batch",
    "stratified_split",
    "MNIST_FILES",
    "CIFAR10_FILES",
    "CIFAR10_CLASSES",
    # training
    "Standardizer",
    "make_classifier",
    "minibatch_storage",
    "MINIBATCH_OPTIONS",
    "train_classifier",
    "evaluate",
    "ClassifierResult",
    # benchmark
    "run_bench",
    "format_table",
    "parse_storage",
    "BENCH_DEFAULTS",
    "DEFAULT_STORAGES",
]
