"""Tests for jaxdp.data: IDX parsing and its errors, the shared MNIST folder, synthetic sets."""

from __future__ import annotations

import gzip
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxdp import data
from jaxdp.data import Dataset

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
  header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> None:
  if gz:
    path = path.with_name(path.name + ".gz")
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    path.write_bytes(payload)


def _make_folder(folder: Path, gz: bool = True, n_train: int = 7, n_test: int = 5, seed: int = 0):
  rng = np.random.default_rng(seed)
  arrays = {
    "train_images": rng.integers(0, 256, size=(n_train, 4, 3), dtype=np.uint8),
    "train_labels": rng.integers(0, 10, size=(n_train,), dtype=np.uint8),
    "test_images": rng.integers(0, 256, size=(n_test, 4, 3), dtype=np.uint8),
    "test_labels": rng.integers(0, 10, size=(n_test,), dtype=np.uint8),
  }
  arrays["train_labels"][0] = 9  # the largest label the 10 classes allow
  folder.mkdir(parents=True, exist_ok=True)
  for key, stem in data.IDX_FILES.items():
    magic = 2051 if key.endswith("images") else 2049
    _write(folder / stem, _idx_bytes(arrays[key], magic), gz)
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
  arrays = _make_folder(tmp_path, gz=gz)
  train, test = data.load_idx_folder(tmp_path, name="toy", num_classes=10)
  for ds, split in ((train, "train"), (test, "test")):
    expected = arrays[f"{split}_images"].astype(np.float32)[..., None] / np.float32(255)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, expected)
    np.testing.assert_array_equal(ds.labels, arrays[f"{split}_labels"])
    assert ds.num_classes == 10
    assert ds.name == f"toy/{split}"
  assert len(train) == 7 and len(test) == 5
  assert train.image_shape == (4, 3, 1)


def test_idx_mixed_raw_and_gz(tmp_path):
  arrays = _make_folder(tmp_path, gz=True)
  gz_file = tmp_path / "t10k-images-idx3-ubyte.gz"
  gz_file.unlink()
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(arrays["test_images"], 2051))
  _, test = data.load_idx_folder(tmp_path, num_classes=10)
  np.testing.assert_array_equal(np.round(test.images[..., 0] * 255), arrays["test_images"])


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="--data-dir / JAXDP_DATA_DIR"):
    data.load_idx_folder(tmp_path / "nope", num_classes=10)


def test_missing_file(tmp_path):
  _make_folder(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    data.load_idx_folder(tmp_path, num_classes=10)


def test_wrong_magic(tmp_path):
  arrays = _make_folder(tmp_path, gz=False)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(arrays["train_labels"], 2051))
  with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
    data.load_idx_folder(tmp_path, num_classes=10)


@pytest.mark.parametrize("cut", [1, 10, 30])
def test_truncated_raw_file(tmp_path, cut):
  _make_folder(tmp_path, gz=False)
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-cut])
  with pytest.raises(ValueError, match="truncated"):
    data.load_idx_folder(tmp_path, num_classes=10)


def test_truncated_gz_file(tmp_path):
  _make_folder(tmp_path, gz=True)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-12])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    data.load_idx_folder(tmp_path, num_classes=10)


def test_too_long_file(tmp_path):
  _make_folder(tmp_path, gz=False)
  path = tmp_path / "t10k-labels-idx1-ubyte"
  path.write_bytes(path.read_bytes() + b"\x00")
  with pytest.raises(ValueError, match="longer than its header"):
    data.load_idx_folder(tmp_path, num_classes=10)


def test_count_mismatch(tmp_path):
  _make_folder(tmp_path, gz=True)
  labels = np.zeros(6, np.uint8)  # 7 train images
  _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels, 2049), gz=True)
  with pytest.raises(ValueError, match=r"7 images but .* 6 labels"):
    data.load_idx_folder(tmp_path, num_classes=10)


def test_load_dataset_paths(tmp_path, monkeypatch):
  _make_folder(tmp_path)
  train, _ = data.load_dataset("mnist", data_dir=tmp_path)
  assert train.name == "mnist/train" and len(train) == 7
  monkeypatch.setenv("JAXDP_DATA_DIR", str(tmp_path))
  train_env, _ = data.load_dataset("fashion_mnist")
  np.testing.assert_array_equal(train_env.images, train.images)
  with pytest.raises(ValueError, match="dataset must be one of mnist, fashion_mnist"):
    data.load_dataset("cifar10", data_dir=tmp_path)


def test_load_dataset_without_tfds_says_how_to_fix(monkeypatch):
  monkeypatch.delenv("JAXDP_DATA_DIR", raising=False)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
  with pytest.raises(RuntimeError, match="--data-dir or set JAXDP_DATA_DIR"):
    data.load_dataset("mnist")


def test_load_dataset_offline_tfds_says_how_to_fix(monkeypatch):
  def offline_load(*args, **kwargs):
    raise ConnectionError("Failed to resolve storage.googleapis.com")

  fake = types.SimpleNamespace(load=offline_load, as_numpy=lambda x: x)
  monkeypatch.delenv("JAXDP_DATA_DIR", raising=False)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  with pytest.raises(RuntimeError, match=r"offline\? Failed to resolve.*--data-dir"):
    data.load_dataset("fashion_mnist")


def test_load_dataset_tfds_arrays_are_converted(monkeypatch):
  rng = np.random.default_rng(0)
  splits = [
    (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n)) for n in (6, 4)
  ]
  calls = []

  def load(name, **kwargs):
    calls.append((name, kwargs))
    return splits

  fake = types.SimpleNamespace(load=load, as_numpy=lambda x: x)
  monkeypatch.delenv("JAXDP_DATA_DIR", raising=False)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  train, test = data.load_dataset("mnist")
  assert calls[0][0] == "mnist" and calls[0][1]["split"] == ["train", "test"]
  assert train.images.shape == (6, 28, 28, 1) and len(test) == 4
  assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
  np.testing.assert_array_equal(train.images, splits[0][0] / np.float32(255))
  assert train.name == "mnist/train" and test.name == "mnist/test"


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST folder not present")
def test_shared_mnist():
  train, test = data.load_dataset("mnist", data_dir=SHARED_MNIST)
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  for ds in (train, test):
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert set(np.unique(ds.labels)) == set(range(10))
  assert train.num_classes == 10
  assert np.bincount(train.labels).min() > 5000


def test_dataset_validation_and_subset():
  images = np.zeros((4, 2, 2, 1), np.float32)
  labels = np.array([0, 1, 2, 1], np.int32)
  ds = Dataset(images, labels, 3, "x")
  sub = ds.subset([3, 0])
  np.testing.assert_array_equal(sub.labels, [1, 0])
  assert len(sub) == 2 and sub.name == "x"
  assert len(ds.subset(np.array([], np.int64))) == 0
  with pytest.raises(ValueError, match="float32"):
    Dataset(images.astype(np.float64), labels, 3, "x")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    Dataset(images + 2, labels, 3, "x")
  with pytest.raises(ValueError, match="int32"):
    Dataset(images, labels.astype(np.int64), 3, "x")
  with pytest.raises(ValueError, match="labels must be in"):
    Dataset(images, labels, 2, "x")
  with pytest.raises(ValueError, match="shape"):
    Dataset(images[..., 0], labels, 3, "x")


def test_synthetic_is_deterministic_and_well_formed():
  a = data.synthetic_dataset(50, num_classes=5, image_size=8, seed=3)
  b = data.synthetic_dataset(50, num_classes=5, image_size=8, seed=3)
  c = data.synthetic_dataset(50, num_classes=5, image_size=8, seed=4)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.images, c.images)
  assert a.images.shape == (50, 8, 8, 1) and a.images.dtype == np.float32
  assert a.labels.shape == (50,) and a.labels.dtype == np.int32
  assert a.images.min() >= 0.0 and a.images.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(a.labels), [10] * 5)
  train, test = data.synthetic_splits(50, 20, num_classes=5, image_size=8, seed=3)
  np.testing.assert_array_equal(train.images, a.images)
  assert not np.array_equal(test.images[:20], train.images[:20])
  assert len(test) == 20 and test.name == "synthetic/test"


def test_synthetic_classes_are_distinguishable():
  train, test = data.synthetic_splits(500, 500)
  assert train.images.shape == (500, 28, 28, 1)
  means = np.stack([train.images[train.labels == c].mean(0).ravel() for c in range(10)])
  x = test.images.reshape(len(test), -1)
  pred = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
  assert (pred == test.labels).mean() > 0.95


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"num_examples": 0}, "num_examples"),
    ({"num_examples": 10, "num_classes": 0}, "num_classes"),
    ({"num_examples": 10, "image_size": 0}, "image_size"),
    ({"num_examples": 10, "noise": -0.1}, "noise"),
    ({"num_examples": 10, "seed": -1}, "seed"),
  ],
)
def test_synthetic_bad_args(kwargs, name):
  with pytest.raises(ValueError, match=name):
    data.synthetic_dataset(**kwargs)


def test_train_validation_split():
  ds = data.synthetic_dataset(40, num_classes=4, image_size=6)
  train, val = data.train_validation_split(ds, 10, seed=1)
  assert len(train) == 30 and len(val) == 10
  # Disjoint and together everything: identify examples by their (unique) images.
  keys = lambda d: {img.tobytes() for img in d.images}
  assert keys(train).isdisjoint(keys(val))
  assert keys(train) | keys(val) == keys(ds)
  _, val2 = data.train_validation_split(ds, 10, seed=1)
  np.testing.assert_array_equal(val.images, val2.images)
  for bad in (0, 40, 41, 2.5):
    with pytest.raises(ValueError, match="validation_size"):
      data.train_validation_split(ds, bad)


def test_num_classes_is_the_datasets_public_constant(tmp_path):
  """Never inferred from the private labels: a training set without the digits 5-9 still
  has 10 classes, an unknown dataset needs num_classes, and a label beyond it is refused."""
  _make_folder(tmp_path, n_train=6, n_test=4)
  folder = tmp_path
  for split, n in (("train", 6), ("test", 4)):
    labels = np.arange(n, dtype=np.uint8) % 5  # only the classes 0-4 occur
    _write(folder / data.IDX_FILES[f"{split}_labels"], _idx_bytes(labels, 2049), True)
  train, test = data.load_idx_folder(folder, name="mnist")
  assert train.num_classes == test.num_classes == data.NUM_CLASSES["mnist"] == 10
  with pytest.raises(ValueError, match="num_classes must be given"):
    data.load_idx_folder(folder, name="toy")
  with pytest.raises(ValueError, match="has 3 classes"):
    data.load_idx_folder(folder, name="toy", num_classes=3)
