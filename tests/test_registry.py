"""Dataset registry: the embedded mnist10k, folders of IDX files, lookup order and its errors."""

import hashlib
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from refsnn.data import registry
from refsnn.data.idx import write_idx
from refsnn.data.registry import Dataset, list_datasets, load_dataset, stratified_counts, subset
from refsnn.errors import ConfigError, DataError

README = Path(__file__).parent.parent / "data" / "README.md"
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def mnist10k():
    return load_dataset("mnist10k")


@pytest.fixture
def clean_lookup(tmp_path, monkeypatch):
    """No $REFSNN_DATA, an empty working directory, no Debian folder: nothing can be found."""
    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    return tmp_path


def tiny_set(folder, n_train=12, n_test=6, hw=(4, 5), n_classes=3, gz=True, channels=None, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shape = hw if channels is None else (channels,) + hw
    arrays = [rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
              (np.arange(n_train) % n_classes).astype(np.uint8),
              rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
              (np.arange(n_test) % n_classes).astype(np.uint8)]
    for name, arr in zip(FILES, arrays):
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


def test_mnist10k_sizes_classes_and_stratification(mnist10k):
    d = mnist10k
    assert (d.n_train, d.n_test, d.n_classes, d.shape) == (8000, 2000, 10, (1, 28, 28))
    assert d.train_x.dtype == np.uint8 and d.train_y.dtype == np.int64
    tr, te = np.bincount(d.train_y, minlength=10), np.bincount(d.test_y, minlength=10)
    total = tr + te
    assert total.sum() == 10000
    # 80/20 within each class: the test share is 2000 * N_c / 10000 rounded (largest remainder)
    np.testing.assert_array_equal(te, stratified_counts(np.repeat(np.arange(10), total), 2000, 10))
    assert np.all(np.abs(te - 0.2 * total) < 1)
    # no image in both splits (the 10,000 source images are all different)
    train_rows = {r.tobytes() for r in d.train_x}
    assert not any(r.tobytes() in train_rows for r in d.test_x)
    # stored shuffled, not sorted by class
    assert np.count_nonzero(np.diff(d.train_y[:100])) > 50
    # real digits: mean intensity near MNIST's 0.1307, every image has ink
    assert abs(d.train_x.mean() / 255 - 0.1307) < 0.005
    assert d.train_x.reshape(8000, -1).max(axis=1).min() > 100


def test_shipped_files_match_readme_sha256():
    text = README.read_text()
    folder = resources.files("refsnn.data") / "mnist10k"
    for name in FILES:
        m = re.search(r"\b([0-9a-f]{64})\b[^\n]*" + re.escape(name + ".gz"), text)
        assert m, f"data/README.md gives no sha256 for {name}.gz"
        assert hashlib.sha256((folder / (name + ".gz")).read_bytes()).hexdigest() == m.group(1)


def test_dataset_is_read_only_and_x01(mnist10k):
    with pytest.raises(ValueError):
        mnist10k.train_x[0, 0, 0] = 1
    x = mnist10k.x01("test", index=np.array([3, 1]), dtype=np.float32)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, 0], mnist10k.test_x[3].astype(np.float32) / np.float32(255))
    full = mnist10k.x01("train")
    assert full.shape == (8000, 1, 28, 28) and full.dtype == np.float64
    assert full.min() == 0.0 and full.max() <= 1.0
    with pytest.raises(ConfigError):
        mnist10k.x01("valid")


def test_folder_of_tiny_idx_files_loads(tmp_path):
    for gz in (True, False):
        folder = tmp_path / f"set-{gz}"
        a = tiny_set(folder, gz=gz)
        d = load_dataset(folder)
        assert (d.n_train, d.n_test, d.n_classes, d.shape) == (12, 6, 3, (1, 4, 5))
        np.testing.assert_array_equal(d.train_x, a[0])
        np.testing.assert_array_equal(d.test_y, a[3])
        assert d.train_y.dtype == np.int64
        assert load_dataset(str(folder)).n_train == 12


def test_folder_with_channels(tmp_path):
    tiny_set(tmp_path / "c", channels=3)
    d = load_dataset(tmp_path / "c")
    assert d.shape == (3, 4, 5) and d.x01("train").shape == (12, 3, 4, 5)


def test_folder_errors(tmp_path):
    tiny_set(tmp_path / "a")
    (tmp_path / "a" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset(tmp_path / "a")
    # unequal counts of images and labels
    tiny_set(tmp_path / "b")
    write_idx(tmp_path / "b" / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(DataError, match="12 images .* 11 labels"):
        load_dataset(tmp_path / "b")
    # train and test image dims differ
    tiny_set(tmp_path / "c")
    write_idx(tmp_path / "c" / "t10k-images-idx3-ubyte.gz", np.zeros((6, 5, 4), np.uint8))
    with pytest.raises(DataError, match="same image dims"):
        load_dataset(tmp_path / "c")
    # empty split
    tiny_set(tmp_path / "d")
    write_idx(tmp_path / "d" / "t10k-images-idx3-ubyte.gz", np.zeros((0, 4, 5), np.uint8))
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "d")
    # images that are not uint8
    tiny_set(tmp_path / "e")
    write_idx(tmp_path / "e" / "train-images-idx3-ubyte.gz", np.zeros((12, 4, 5), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(tmp_path / "e")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_labels_out_of_range_for_a_named_set(tmp_path, clean_lookup):
    tiny_set(tmp_path / "data" / "mnist", n_classes=11, n_train=22)
    with pytest.raises(DataError, match=r"labels span 0\.\.10; expected 0\.\.9"):
        load_dataset("mnist")


def test_lookup_order(tmp_path, clean_lookup, monkeypatch):
    tiny_set(tmp_path / "data" / "mnist", seed=1)              # ./data/mnist
    tiny_set(tmp_path / "env" / "mnist", seed=2)               # $REFSNN_DATA/mnist
    tiny_set(tmp_path / "arg" / "MNIST" / "raw", seed=3)       # --data-dir, torchvision layout
    tiny_set(tmp_path / "direct", seed=4)                      # --data-dir holding the files
    where = [(1, "data/mnist"), (2, "env/mnist"), (3, "arg/MNIST/raw"), (4, "direct")]
    first = {s: load_dataset(tmp_path / name).train_x for s, name in where}
    np.testing.assert_array_equal(load_dataset("mnist").train_x, first[1])
    monkeypatch.setenv("REFSNN_DATA", str(tmp_path / "env"))
    np.testing.assert_array_equal(load_dataset("mnist").train_x, first[2])
    for s, arg in [(3, "arg"), (4, "direct")]:
        got = load_dataset("mnist", data_dir=tmp_path / arg).train_x
        np.testing.assert_array_equal(got, first[s])
    assert load_dataset("mnist").name == "mnist"


def test_missing_dataset_names_folders_and_fix(tmp_path, clean_lookup):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "mine")
    msg = str(err.value)
    assert str(tmp_path / "mine") in msg and str(tmp_path / "mine" / "fashion-mnist") in msg
    assert "./data/fashion-mnist" in msg and str(tmp_path / "no-debian") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "$REFSNN_DATA not set" in msg
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    rows = {r.name: r for r in list_datasets()}
    assert rows["mnist10k"].found and not rows["mnist"].found and not rows["fashion-mnist"].found
    assert all(r.description for r in rows.values())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load_dataset("imagenet")
    for name in ("mnist10k", "mnist", "fashion-mnist", "cifar10", "cifar100"):
        assert name in str(err.value)


def test_dataset_validation():
    x = np.zeros((4, 2, 2), np.uint8)
    y = np.array([0, 1, 0, 1], np.int64)
    Dataset("ok", x, y, x, y, 2, (1, 2, 2))
    with pytest.raises(DataError, match="labels span"):
        Dataset("bad", x, y, x, y + 1, 2, (1, 2, 2))
    with pytest.raises(DataError, match="counts must be equal"):
        Dataset("bad", x, y[:3], x, y, 2, (1, 2, 2))
    with pytest.raises(DataError, match="uint8"):
        Dataset("bad", x.astype(np.float32), y, x, y, 2, (1, 2, 2))
    with pytest.raises(DataError, match="does not match"):
        Dataset("bad", x, y, x, y, 2, (2, 2))
    assert x.flags.writeable  # the caller's arrays keep their flags


def test_subset_is_stratified_and_seeded(mnist10k):
    s1 = subset(mnist10k, 500, 100, np.random.default_rng(7))
    s2 = subset(mnist10k, 500, 100, 7)
    assert (s1.n_train, s1.n_test) == (500, 100)
    np.testing.assert_array_equal(s1.train_x, s2.train_x)
    full = np.bincount(mnist10k.train_y, minlength=10)
    got = np.bincount(s1.train_y, minlength=10)
    assert np.all(np.abs(got - 500 * full / full.sum()) < 1)
    # every kept sample is a sample of the parent with its own label
    parent = {r.tobytes(): lab for r, lab in zip(mnist10k.train_x, mnist10k.train_y)}
    assert all(parent[r.tobytes()] == lab for r, lab in zip(s1.train_x, s1.train_y))
    s3 = subset(mnist10k, 500, None, 8)
    assert s3.n_test == 2000 and not np.array_equal(s3.train_x, s1.train_x)
    with pytest.raises(ConfigError):
        subset(mnist10k, 0, 10, 0)
    with pytest.raises(ConfigError):
        subset(mnist10k, 10, 2001, 0)


def test_stratified_counts_sum_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 6))
        y = rng.integers(0, k, int(rng.integers(1, 40)))
        n = int(rng.integers(1, len(y) + 1))
        c = stratified_counts(y, n, k)
        share = n * np.bincount(y, minlength=k) / len(y)
        assert c.sum() == n and np.all(c <= np.bincount(y, minlength=k))
        assert np.all(np.abs(c - share) < 1)


@pytest.mark.skipif(not all((DEBIAN / (f + ".gz")).is_file() for f in FILES),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian(monkeypatch, tmp_path):
    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    d = load_dataset("fashion-mnist")
    assert (d.n_train, d.n_test, d.n_classes, d.shape) == (60000, 10000, 10, (1, 28, 28))
    np.testing.assert_array_equal(np.bincount(d.train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(d.test_y), [1000] * 10)
    row = {r.name: r for r in list_datasets()}["fashion-mnist"]
    assert row.found and row.location == str(DEBIAN)
