"""Datasets by name (embedded ``mnist10k``, full ``mnist`` and ``fashion-mnist``) or by folder.

Every dataset is four IDX files with the MNIST names (raw or ``.gz``)::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

Where a full set is looked for, in this order (the first folder holding all four files wins):

1. ``data_dir`` (the CLI's ``--data-dir``): the folder itself, then ``data_dir/<subfolder>``;
2. ``$REFSNN_DATA/<subfolder>``;
3. ``./data/<subfolder>`` (relative to the working directory);
4. for ``fashion-mnist`` only: ``/usr/share/datasets/fashion-mnist``, where Debian's package
   ``dataset-fashion-mnist`` installs it.

``<subfolder>`` is the dataset's name (``mnist``, ``fashion-mnist``) or the layout torchvision
writes (``MNIST/raw``, ``FashionMNIST/raw``). data/README.md of the source tree says how to get
each set.
Event sets (``nmnist``, ``nmnist-synth``, ``dvs-gesture``, ``cifar10-dvs``, ``shd``) are loaded
by refsnn/data/eventsets.py as EventDatasets (``temporal = True``), same lookup order.
``cifar10`` and ``cifar100`` are read from their binary releases by refsnn/data/cifar.py (same
lookup order; a folder given by path that holds one loads too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from refsnn.data.idx import read_idx
from refsnn.errors import ConfigError, DataError

__all__ = [
    "Dataset",
    "DatasetInfo",
    "load_dataset",
    "list_datasets",
    "subset",
    "stratified_counts",
    "IDX_FILES",
    "DEBIAN_FASHION_MNIST",
]

#: split -> (images file, labels file), without the optional ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Install folder of Debian's package dataset-fashion-mnist (`dpkg -L dataset-fashion-mnist`).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "REFSNN_DATA"


@dataclass(frozen=True)
class _Entry:
    description: str
    n_classes: int
    subfolders: tuple[str, ...]
    how_to_get: str


_EMBEDDED = "mnist10k"
_REGISTRY = {
    _EMBEDDED: _Entry(
        "10,000 MNIST digits shipped with refsnn (8,000 train / 2,000 test, stratified)",
        10, (), "it ships with refsnn; reinstall the package if it is missing",
    ),
    "mnist": _Entry(
        "MNIST handwritten digits, 60,000 train / 10,000 test (LeCun, Cortes, Burges)",
        10, ("mnist", "MNIST/raw"),
        "put the four MNIST files (train-images-idx3-ubyte.gz, ...) in ./data/mnist/ or in a "
        "folder passed as --data-dir (see data/README.md)",
    ),
    "fashion-mnist": _Entry(
        "Fashion-MNIST clothing images, 60,000 train / 10,000 test (Zalando Research)",
        10, ("fashion-mnist", "FashionMNIST/raw"),
        "on Debian or Ubuntu run `apt-get install dataset-fashion-mnist`, or put the four "
        "Fashion-MNIST files in ./data/fashion-mnist/ or in a folder passed as --data-dir "
        "(see data/README.md)",
    ),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held as stored: uint8 images and int64 labels, read-only.

    Attributes
    ----------
    name : str
    train_x, test_x : numpy.ndarray of uint8, shape (N, H, W) or (N, C, H, W), as stored
    train_y, test_y : numpy.ndarray of int64, shape (N,), labels in 0 .. n_classes-1
    n_classes : int
    shape : tuple of int
        Per-sample shape the network reads: (1, H, W) for (N, H, W) images, (C, H, W) otherwise.

    Use :meth:`x01` for float pixels in [0, 1]; it converts only what is asked for, so no second
    copy of the set is kept.
    """

    temporal = False  # images, encoded per step by the trainer (EventDataset: already (T, ...))

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    n_classes: int
    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _validate(self)
        for field in ("train_x", "train_y", "test_x", "test_y"):
            view = getattr(self, field).view()  # read-only view; the caller's array keeps its flags
            view.setflags(write=False)
            object.__setattr__(self, field, view)

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    def x01(self, split: str = "train", index=None, dtype=np.float64) -> np.ndarray:
        """Images of ``split`` ("train" or "test") as floats pixel/255 in [0, 1], shape (n, *shape).

        ``index`` (optional) selects samples first (an int array, a slice or a boolean mask), so a
        mini-batch costs only its own conversion.
        """
        if split not in IDX_FILES:
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        x = self.train_x if split == "train" else self.test_x
        if index is not None:
            x = x[index]
        if np.dtype(dtype).kind != "f":
            raise ConfigError(f"x01 returns floats: dtype must be float32 or float64: {dtype!r}")
        out = x.reshape((-1,) + self.shape).astype(dtype)
        out /= 255.0
        return out

    def __repr__(self):
        return (
            f"Dataset({self.name!r}, train={self.n_train}, test={self.n_test}, "
            f"shape={tuple(self.shape)}, n_classes={self.n_classes})"
        )


def _validate(ds: Dataset) -> None:
    name = ds.name
    if not isinstance(ds.n_classes, (int, np.integer)) or ds.n_classes < 1:
        raise DataError(f"dataset {name!r}: n_classes must be a positive int, got {ds.n_classes!r}")
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            raise DataError(
                f"dataset {name!r}: {split} images must be a uint8 array (bytes 0..255), got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.ndim not in (3, 4):
            raise DataError(
                f"dataset {name!r}: {split} images have shape {x.shape}; expected (N, H, W) or "
                f"(N, C, H, W)"
            )
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
            raise DataError(
                f"dataset {name!r}: {split} labels must be a 1-D int64 array, got "
                f"{getattr(y, 'dtype', type(y).__name__)} of shape {getattr(y, 'shape', '?')}"
            )
        if len(y) == 0:
            raise DataError(f"dataset {name!r}: the {split} split is empty")
        if x.shape[0] != len(y):
            raise DataError(
                f"dataset {name!r}: {x.shape[0]} {split} images but {len(y)} {split} labels; "
                f"the counts must be equal"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= ds.n_classes:
            raise DataError(
                f"dataset {name!r}: {split} labels span {lo}..{hi}; expected 0..{ds.n_classes - 1}"
            )
    if ds.train_x.shape[1:] != ds.test_x.shape[1:]:
        raise DataError(
            f"dataset {name!r}: train images are {ds.train_x.shape[1:]} but test images are "
            f"{ds.test_x.shape[1:]}; both splits must have the same image dims"
        )
    x = ds.train_x
    per_sample = (1,) + x.shape[1:] if x.ndim == 3 else x.shape[1:]
    if ds.shape != per_sample:
        raise DataError(
            f"dataset {name!r}: shape {ds.shape} does not match images of shape {x.shape} "
            f"(per sample {per_sample})"
        )


def _find_file(folder: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some unpackers write train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def _idx_files(folder: Path) -> dict | None:
    """{split: (images path, labels path)} if ``folder`` holds all four files, else None."""
    found = {}
    for split, stems in IDX_FILES.items():
        paths = tuple(_find_file(folder, s) for s in stems)
        if None in paths:
            return None
        found[split] = paths
    return found


def _load_folder(name: str, folder: Path, n_classes: int | None) -> Dataset:
    files = _idx_files(folder)
    if files is None:
        stems = [s for pair in IDX_FILES.values() for s in pair]
        missing = [s for s in stems if _find_file(folder, s) is None]
        raise DataError(
            f"folder {folder} lacks {', '.join(m + '[.gz]' for m in missing)}; a dataset folder "
            f"holds the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz)"
        )
    arrays = {}
    for split, (ximg, ylab) in files.items():
        x, y = read_idx(ximg), read_idx(ylab)
        if x.dtype != np.uint8:
            raise DataError(f"{ximg}: images must be uint8 (IDX code 0x08), found {x.dtype}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(
                f"{ylab}: labels must be a 1-D integer IDX array, found {y.dtype} {y.shape}"
            )
        if x.ndim not in (3, 4):
            raise DataError(
                f"{ximg}: images have dims {x.shape}; expected (N, H, W) or (N, C, H, W)"
            )
        if len(x) != len(y):
            raise DataError(
                f"{split} split of {folder}: {len(x)} images in {ximg.name} but {len(y)} labels in "
                f"{ylab.name}; the counts must be equal"
            )
        arrays[split] = (x, y.astype(np.int64))
    (trx, try_), (tex, tey) = arrays["train"], arrays["test"]
    if n_classes is None:  # a plain folder: classes 0 .. largest label
        if len(try_) == 0 or len(tey) == 0:
            empty = "train" if len(try_) == 0 else "test"
            raise DataError(f"dataset folder {folder}: the {empty} split is empty")
        n_classes = max(int(try_.max()), int(tey.max())) + 1
    shape = (1,) + trx.shape[1:] if trx.ndim == 3 else trx.shape[1:]
    return Dataset(name, trx, try_, tex, tey, int(n_classes), tuple(int(s) for s in shape))


def lookup_dirs(subfolders, data_dir) -> list[tuple[Path, str]]:
    """[(folder, why it is looked at)]: --data-dir itself and its subfolders, then
    $REFSNN_DATA/<sub>, then ./data/<sub> (the order every dataset, image or event, follows)."""
    dirs = []
    if data_dir is not None:
        d = Path(data_dir)
        dirs.append((d, "--data-dir"))
        dirs += [(d / s, "--data-dir") for s in subfolders]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [(Path(env) / s, f"${ENV_VAR}") for s in subfolders]
    dirs += [(Path("data") / s, "./data") for s in subfolders]
    return dirs


def _search_dirs(name: str, data_dir) -> list[tuple[Path, str]]:
    """[(folder, why it is looked at)] in lookup order."""
    dirs = lookup_dirs(_REGISTRY[name].subfolders, data_dir)
    if name == "fashion-mnist":
        dirs.append((DEBIAN_FASHION_MNIST, "Debian package dataset-fashion-mnist"))
    return dirs


def _locate(name: str, data_dir=None) -> Path | None:
    for folder, _ in _search_dirs(name, data_dir):
        if _idx_files(folder) is not None:
            return folder
    return None


def _load_embedded() -> Dataset:
    root = resources.files("refsnn.data") / _EMBEDDED
    with resources.as_file(root) as folder:
        if _idx_files(Path(folder)) is None:
            raise DataError(
                f"the embedded dataset {_EMBEDDED} is missing from the installed package "
                f"(looked in {folder}); reinstall refsnn (pip install -e . from the source tree)"
            )
        return _load_folder(_EMBEDDED, Path(folder), 10)


def load_dataset(name_or_folder, data_dir=None) -> Dataset:
    """Load a dataset by name (``mnist10k``, ``mnist``, ``fashion-mnist``) or from a folder.

    Parameters
    ----------
    name_or_folder : str or os.PathLike
        A registered name, or a folder holding the four IDX files (raw or .gz). A folder's
        ``n_classes`` is its largest label (train or test) + 1.
    data_dir : str or os.PathLike, optional
        Where to look first for a full set (see the module docstring for the lookup order).

    Raises
    ------
    ConfigError
        For a name that is neither registered nor a path.
    DataError
        When a dataset cannot be found (the message lists the folders tried and how to get it)
        or its files are invalid.
    """
    from refsnn.data.cifar import (CIFAR_SETS, holds_cifar, load_cifar, load_cifar_folder,
                                   refuse_python_release)
    from refsnn.data.eventsets import EVENT_SETS, load_event_dataset

    if isinstance(name_or_folder, str) and name_or_folder in EVENT_SETS:
        return load_event_dataset(name_or_folder, data_dir)  # events: refsnn/data/eventsets.py
    if isinstance(name_or_folder, str) and name_or_folder in CIFAR_SETS:
        return load_cifar(name_or_folder, data_dir)          # refsnn/data/cifar.py
    if isinstance(name_or_folder, str) and name_or_folder in _REGISTRY:
        name = name_or_folder
        if name == _EMBEDDED:
            return _load_embedded()
        folder = _locate(name, data_dir)
        if folder is None:
            tried = ", ".join(
                f"./{d.as_posix()}" if why == "./data" else f"{d} ({why})"
                for d, why in _search_dirs(name, data_dir)
            )
            notes = [f"${ENV_VAR} not set"] if not os.environ.get(ENV_VAR) else []
            notes += ["no --data-dir given"] if data_dir is None else []
            note = f" ({', '.join(notes)})" if notes else ""
            raise DataError(
                f"dataset {name!r} not found: looked for its four IDX files in {tried}{note}. "
                f"To get it: {_REGISTRY[name].how_to_get}"
            )
        return _load_folder(name, folder, _REGISTRY[name].n_classes)
    path = Path(name_or_folder)
    looks_like_path = not isinstance(name_or_folder, str) or os.sep in name_or_folder or (
        os.altsep is not None and os.altsep in name_or_folder
    ) or name_or_folder.startswith(".")
    if path.is_dir():
        cifar = holds_cifar(path) if _idx_files(path) is None else None
        if cifar is not None:
            return load_cifar_folder(path, cifar, label=str(path))
        if _idx_files(path) is None:
            refuse_python_release(path)          # a CIFAR pickle folder: say why, what instead
        return _load_folder(str(path), path, None)
    if looks_like_path:
        raise DataError(
            f"dataset folder {path} does not exist; pass a folder holding the four IDX files, or "
            f"one of the names {', '.join(list(_REGISTRY) + list(CIFAR_SETS) + list(EVENT_SETS))}"
        )
    raise ConfigError(
        f"unknown dataset {name_or_folder!r}; valid names: "
        f"{', '.join(list(_REGISTRY) + list(CIFAR_SETS) + list(EVENT_SETS))}, or a path to "
        f"a folder holding the four IDX files"
    )


@dataclass(frozen=True)
class DatasetInfo:
    """One row of :func:`list_datasets`."""

    name: str
    description: str
    found: bool
    location: str | None  # the folder it would be loaded from, or None
    how_to_get: str | None = None  # where to put the files, when not found


def list_datasets(data_dir=None) -> list[DatasetInfo]:
    """Every registered dataset with a one-line description and whether it is found here."""
    rows = []
    for name, entry in _REGISTRY.items():
        if name == _EMBEDDED:
            folder = resources.files("refsnn.data") / _EMBEDDED
            found = all(
                (folder / (s + ".gz")).is_file() for stems in IDX_FILES.values() for s in stems
            )
            where = "(embedded)" if found else None
            rows.append(DatasetInfo(name, entry.description, found, where))
        else:
            folder = _locate(name, data_dir)
            rows.append(DatasetInfo(name, entry.description, folder is not None,
                                    None if folder is None else str(folder)))
    from refsnn.data.cifar import CIFAR_SETS, locate_cifar

    for name, c_entry in CIFAR_SETS.items():
        folder = locate_cifar(name, data_dir)
        rows.append(DatasetInfo(name, c_entry.description, folder is not None,
                                None if folder is None else str(folder), c_entry.how_to_get))
    from refsnn.data.eventsets import EVENT_SETS, locate_event_dataset

    for name, ev_entry in EVENT_SETS.items():
        folder = locate_event_dataset(name, data_dir)
        if folder is None and name == "nmnist-synth":
            rows.append(DatasetInfo(name, ev_entry.description, True, "(generated on first use)"))
            continue
        rows.append(DatasetInfo(name, ev_entry.description, folder is not None,
                                None if folder is None else str(folder)))
    return rows


def stratified_counts(labels: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """How many samples of each class a stratified draw of ``n`` from ``labels`` takes.

    Each class c gets floor(n * N_c / N); the remaining samples go one each to the classes with
    the largest fractional parts n * N_c / N - floor(...), ties to the lower class index
    (largest-remainder rounding), so the counts sum to ``n`` and never exceed N_c.
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.int64)
    N = int(counts.sum())
    exact = counts * n  # n * N_c, compared as integers: no float ties
    base = exact // N
    rem = exact - base * N
    short = n - int(base.sum())
    order = sorted(range(n_classes), key=lambda c: (-int(rem[c]), c))
    for c in order[:short]:
        base[c] += 1
    return base


def _stratified_index(y, n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    take = stratified_counts(y, n, n_classes)
    picked = []
    for c in range(n_classes):  # class by class, ascending: the rng order is fixed
        members = np.flatnonzero(y == c)
        picked.append(members[rng.permutation(len(members))[: take[c]]])
    return np.sort(np.concatenate(picked))


def subset(dataset: Dataset, n_train=None, n_test=None, rng=None) -> Dataset:
    """A stratified subset for quick runs and tests: each split keeps its class proportions.

    Parameters
    ----------
    n_train, n_test : int or None
        Samples to keep from each split (None keeps the whole split).
    rng : numpy.random.Generator or int or None
        The random source (an int is a seed). The kept samples stay in their stored order.

    Class counts follow :func:`stratified_counts`; the samples of a class are a uniform draw
    without replacement. The name is kept, so a checkpoint still names the dataset it came from.
    """
    if getattr(dataset, "temporal", False):  # an EventDataset subsets its recordings
        return dataset.subset(n_train, n_test, rng)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    parts = {}
    for split, n, x, y in (("train", n_train, dataset.train_x, dataset.train_y),
                           ("test", n_test, dataset.test_x, dataset.test_y)):
        if n is None:
            parts[split] = (x, y)
            continue
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(y):
            raise ConfigError(
                f"subset of {dataset.name!r}: n_{split} must be an int in 1..{len(y)}, got {n!r}"
            )
        idx = _stratified_index(y, int(n), dataset.n_classes, rng)
        parts[split] = (x[idx], y[idx])
    (trx, try_), (tex, tey) = parts["train"], parts["test"]
    return Dataset(dataset.name, trx, try_, tex, tey, dataset.n_classes, dataset.shape)
