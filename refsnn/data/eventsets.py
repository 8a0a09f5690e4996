"""Event datasets: N-MNIST, the generated ``nmnist-synth``, DVS128 Gesture, CIFAR10-DVS, SHD.

An :class:`EventDataset` holds every recording of both splits in memory (compactly: one
structured array per split plus offsets) and bins a mini-batch on demand into time-major frames
``(T, B, *shape)`` (:meth:`EventDataset.frames`); ``temporal = True`` tells the training loop to
use those frames as the network input instead of encoding images. ``shape`` is what the network
reads at one step, e.g. (2, 34, 34) for N-MNIST (arch ``34x34x2-...`` or ``2312-...``).

Where a set is looked for, in this order (first folder that holds it wins; registry.py does the
same for image sets):

1. ``data_dir`` (``--data-dir``) itself, then ``data_dir/<subfolder>``;
2. ``$REFSNN_DATA/<subfolder>``;
3. ``./data/<subfolder>``;
4. ``nmnist-synth`` only: ``<cache>/nmnist-synth`` with ``<cache>`` = ``$REFSNN_DATA`` if set,
   else ``~/.cache/refsnn``; when it is found nowhere it is generated there from ``mnist10k``
   (once, about a minute; :mod:`refsnn.data.synth`).

docs/events.md tells how to get each real set and what the default binning of each is.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refsnn.data.binning import NMNIST_BINNINGS, FrameSpec
from refsnn.data.events import (
    CIFAR10_DVS_CLASSES, DVS128_SENSOR, GESTURE_CLASSES, NMNIST_SENSOR, SHD_UNITS, nmnist_tree,
    read_cifar10_dvs, read_dvs_gesture, read_nmnist, read_shd, cifar10_dvs_tree,
)
from refsnn.errors import ConfigError, DataError

__all__ = ["EventDataset", "EVENT_SETS", "load_event_dataset", "locate_event_dataset",
           "event_search_dirs", "synth_cache_dir", "load_nmnist_tree", "arch_for_dataset"]

ENV_VAR = "REFSNN_DATA"
NMNIST_SPAN_US = 315_000          # three 105-ms saccades


@dataclass(frozen=True)
class _EventEntry:
    description: str
    n_classes: int
    subfolders: tuple
    spec: FrameSpec
    how_to_get: str


EVENT_SETS = {
    "nmnist-synth": _EventEntry(
        "N-MNIST-like events made from mnist10k by refsnn's camera model (8,000 / 2,000)",
        10, ("nmnist-synth",), FrameSpec(NMNIST_SENSOR, span_us=NMNIST_SPAN_US),
        "it is generated from mnist10k on first use, or by `refsnn data synth-events DIR`",
    ),
    "nmnist": _EventEntry(
        "N-MNIST, MNIST seen by an ATIS camera, 60,000 / 10,000 (Orchard et al. 2015)",
        10, ("nmnist", "NMNIST", "N-MNIST"), FrameSpec(NMNIST_SENSOR, span_us=NMNIST_SPAN_US),
        "download Train.zip and Test.zip from the N-MNIST page (Mendeley Data "
        "10.17632/468j46mzdv.1, linked from garrickorchard.com/datasets/n-mnist), unzip both "
        "into one folder holding Train/ and Test/, and pass it as --data-dir or put it in "
        "./data/nmnist/ (see docs/events.md)",
    ),
    "dvs-gesture": _EventEntry(
        "DVS128 Gesture, 11 hand and arm gestures, 29 subjects (Amir et al. 2017)",
        11, ("dvs-gesture", "DvsGesture"), FrameSpec(DVS128_SENSOR, span_us=None, downsample=4),
        "download DvsGesture.tar.gz from IBM Research's DVS128 Gesture page, unpack it (the "
        "userNN_*.aedat files with their _labels.csv and trials_to_train.txt / "
        "trials_to_test.txt) and pass the folder as --data-dir or put it in "
        "./data/dvs-gesture/ (see docs/events.md)",
    ),
    "cifar10-dvs": _EventEntry(
        "CIFAR10-DVS, 10,000 CIFAR-10 images moved before a DVS128 (Li et al. 2017)",
        10, ("cifar10-dvs", "CIFAR10-DVS", "CIFAR10DVS"),
        FrameSpec(DVS128_SENSOR, span_us=None, downsample=4),
        "download the ten class archives of the original (AEDAT 2.0) release (figshare, "
        "doi 10.6084/m9.figshare.4724671), unpack them into <folder>/airplane/*.aedat ... "
        "<folder>/truck/*.aedat and pass <folder> as --data-dir or put it in "
        "./data/cifar10-dvs/ (see docs/events.md)",
    ),
    "shd": _EventEntry(
        "Spiking Heidelberg Digits, 20 spoken digits, 700 channels (Cramer et al. 2022)",
        20, ("shd", "SHD"), FrameSpec((SHD_UNITS,), span_us=1_400_000),
        "download shd_train.h5.gz and shd_test.h5.gz from the Zenke lab's SHD page "
        "(zenkelab.org/resources/spiking-heidelberg-datasets-shd), gunzip them into one "
        "folder and pass it as --data-dir or put it in ./data/shd/ (see docs/events.md)",
    ),
}


# ---- compact storage -------------------------------------------------------------------------

def _compact_dtype(recs, audio: bool) -> np.dtype:
    tmin = min((int(r["t"].min()) for r in recs if len(r)), default=0)
    tmax = max((int(r["t"].max()) for r in recs if len(r)), default=0)
    tt = "<u4" if 0 <= tmin and tmax < 2**32 else "<i8"
    if audio:
        return np.dtype([("unit", "<u2"), ("t", tt)])
    xmax = max((max(int(r["x"].max()), int(r["y"].max())) for r in recs if len(r)), default=0)
    xy = "u1" if xmax < 256 else "<u2"
    return np.dtype([("x", xy), ("y", xy), ("p", "u1"), ("t", tt)])


class _Recordings:
    """Many recordings in one structured array: recording i is events[offsets[i]:offsets[i+1]]."""

    def __init__(self, events: np.ndarray, offsets: np.ndarray):
        self.events, self.offsets = events, offsets
        for a in (self.events, self.offsets):
            a.setflags(write=False)

    @classmethod
    def from_list(cls, recs, audio: bool) -> "_Recordings":
        dt = _compact_dtype(recs, audio)
        offsets = np.zeros(len(recs) + 1, np.int64)
        offsets[1:] = np.cumsum([len(r) for r in recs])
        events = np.empty(int(offsets[-1]), dt)
        for i, r in enumerate(recs):
            seg = events[offsets[i]:offsets[i + 1]]
            for name in dt.names:
                seg[name] = r[name]
        return cls(events, offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i) -> np.ndarray:
        return self.events[self.offsets[i]:self.offsets[i + 1]]

    def take(self, index) -> "_Recordings":
        return _Recordings.from_list([self[int(i)] for i in index],
                                     audio="unit" in self.events.dtype.names)


class EventDataset:
    """A classification set of event recordings, binned into frames per mini-batch.

    Attributes
    ----------
    name : str
    train_y, test_y : int64 arrays (N,), labels 0 .. n_classes-1 (read-only)
    n_classes : int
    spec : FrameSpec, the default binning (span, 0/1 or counts, polarity, down-sampling)
    shape : tuple, what the network reads at one step (``spec.shape``)
    temporal : True: the input already has a time axis; use :meth:`frames`, not an encoding.
    """

    temporal = True

    def __init__(self, name, train, train_y, test, test_y, n_classes, spec: FrameSpec,
                 classes=None):
        self.name, self.n_classes, self.spec = name, int(n_classes), spec
        self.classes = tuple(classes) if classes is not None else None
        self._rec = {"train": train, "test": test}
        ys = {}
        for split, rec, y in (("train", train, train_y), ("test", test, test_y)):
            y = np.asarray(y)
            if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(rec):
                raise DataError(f"dataset {name!r}: {len(rec)} {split} recordings but labels of "
                                f"shape {y.shape} ({y.dtype}); need one integer label each")
            if len(y) == 0:
                raise DataError(f"dataset {name!r}: the {split} split is empty")
            if y.min() < 0 or y.max() >= self.n_classes:
                raise DataError(f"dataset {name!r}: {split} labels span {y.min()}..{y.max()}; "
                                f"expected 0..{self.n_classes - 1}")
            y = y.astype(np.int64)
            y.setflags(write=False)
            ys[split] = y
        self.train_y, self.test_y = ys["train"], ys["test"]

    @property
    def shape(self) -> tuple:
        return self.spec.shape

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    def _split(self, split):
        if split not in self._rec:
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        return self._rec[split]

    def recording(self, split: str, i: int) -> np.ndarray:
        """The events of recording ``i`` of ``split`` (fields x, y, p, t or unit, t)."""
        return self._split(split)[i]

    def n_events(self, split: str) -> np.ndarray:
        return np.diff(self._split(split).offsets)

    def frames(self, split: str = "train", index=None, T: int = 30, dtype=np.float64,
               binning: str | None = None) -> np.ndarray:
        """Input of a mini-batch, time-major: (T, B, *shape).

        index : int array, slice or boolean mask selecting recordings (None: all of them)
        binning : None (or "") for the dataset's ``spec``; or, for N-MNIST-like sets, one of
            NMNIST_BINNINGS ("hm2bp", "tsslbp", "stbp"): the spec's own binning with its bin
            width and T steps (refsnn.data.binning); "name:W" sets the bin width to W us
            (e.g. "stbp:1000", the 1-ms bins of stbp's ``nmnist-mlp`` preset).
        """
        rec = self._split(split)
        idx = np.arange(len(rec))
        if index is not None:
            idx = idx[index]
        idx = np.atleast_1d(idx)
        dt = np.dtype(dtype)
        if dt.kind != "f":
            raise ConfigError(f"frames are float32 or float64, got dtype {dt}")
        if not binning:
            return self.spec.batch([rec[int(i)] for i in idx], T, dt)
        name, _, window = str(binning).partition(":")
        if name not in NMNIST_BINNINGS or (window and not window.isdigit()) or window == "0":
            raise ConfigError(f"unknown binning {binning!r}; valid: "
                              f"{', '.join(NMNIST_BINNINGS)}, each optionally with ':<window in "
                              f"us>' (e.g. 'stbp:1000'), or None for the dataset's own")
        if tuple(self.spec.sensor) != NMNIST_SENSOR:
            raise ConfigError(f"binning {binning!r} is the N-MNIST binning of its spec; dataset "
                              f"{self.name!r} is not N-MNIST-like")
        fn = NMNIST_BINNINGS[name]
        kw = {"window_us": int(window)} if window else {}
        out = np.stack([fn(rec[int(i)], T, **kw) for i in idx], axis=1)
        return out.astype(dt)

    def x01(self, *args, **kwargs):
        raise ConfigError(f"dataset {self.name!r} holds event recordings, not images: its input "
                          f"is EventDataset.frames(split, index, T) (already time-major)")

    def subset(self, n_train=None, n_test=None, rng=None) -> "EventDataset":
        """A stratified subset, as refsnn.data.subset does for image sets."""
        from refsnn.data.registry import _stratified_index

        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        parts = {}
        for split, n, y in (("train", n_train, self.train_y), ("test", n_test, self.test_y)):
            rec = self._rec[split]
            if n is None:
                parts[split] = (rec, y)
                continue
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(y):
                raise ConfigError(f"subset of {self.name!r}: n_{split} must be an int in "
                                  f"1..{len(y)}, got {n!r}")
            idx = _stratified_index(y, int(n), self.n_classes, rng)
            parts[split] = (rec.take(idx), y[idx])
        (trr, trl), (ter, tel) = parts["train"], parts["test"]
        return EventDataset(self.name, trr, trl, ter, tel, self.n_classes, self.spec,
                            self.classes)

    def __repr__(self):
        return (f"EventDataset({self.name!r}, train={self.n_train}, test={self.n_test}, "
                f"shape={self.shape}, n_classes={self.n_classes})")


# ---- readers of whole sets -------------------------------------------------------------------

_NMNIST_COMPACT = np.dtype([("x", "u1"), ("y", "u1"), ("p", "u1"), ("t", "<u4")])


def _nmnist_recordings(files) -> _Recordings:
    """N-MNIST files read straight into one compact array (sized from the file lengths), so the
    peak memory is the set itself plus one recording."""
    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size // 5)
        except OSError as err:
            raise DataError(f"cannot read N-MNIST file {f}: {err.strerror or err}") from None
    offsets = np.zeros(len(files) + 1, np.int64)
    offsets[1:] = np.cumsum(sizes)
    events = np.empty(int(offsets[-1]), _NMNIST_COMPACT)
    for i, f in enumerate(files):
        ev = read_nmnist(f)                     # validates: whole records, x and y < 34
        if len(ev) != offsets[i + 1] - offsets[i]:
            raise DataError(f"{f} changed while it was being read; read the set again")
        seg = events[offsets[i]:offsets[i + 1]]
        for name in _NMNIST_COMPACT.names:
            seg[name] = ev[name]
    return _Recordings(events, offsets)


def load_nmnist_tree(name: str, root, spec: FrameSpec | None = None) -> EventDataset:
    """An EventDataset from an N-MNIST tree (Train/<digit>/<id>.bin, Test/...)."""
    root = Path(root)
    parts = {}
    for split in ("train", "test"):
        files = nmnist_tree(root, split)
        parts[split] = (_nmnist_recordings([f for f, _ in files]),
                        np.array([lab for _, lab in files], np.int64))
    spec = spec or FrameSpec(NMNIST_SENSOR, span_us=NMNIST_SPAN_US)
    return EventDataset(name, *parts["train"], *parts["test"], 10, spec)


def _trial_lists(root: Path):
    lists = {}
    for split, fname in (("train", "trials_to_train.txt"), ("test", "trials_to_test.txt")):
        f = root / fname
        if f.is_file():
            names = [ln.strip() for ln in f.read_text(errors="replace").splitlines()]
            lists[split] = [root / n for n in names if n]
    if len(lists) == 2:
        return lists
    trials = sorted(root.glob("user*.aedat"))           # README: users 1-23 train, 24-29 test

    def user(p):
        digits = "".join(ch for ch in p.name[4:6] if ch.isdigit())
        return int(digits) if digits else 0
    return {"train": [p for p in trials if user(p) <= 23],
            "test": [p for p in trials if user(p) > 23]}


def _load_gesture(root: Path, spec: FrameSpec) -> EventDataset:
    parts = {}
    for split, trials in _trial_lists(root).items():
        recs, labels = [], []
        for trial in trials:
            for ev, label in read_dvs_gesture(trial):
                recs.append(ev)
                labels.append(label)
        if not recs:
            raise DataError(f"DVS Gesture folder {root}: no {split} trial found")
        parts[split] = (_Recordings.from_list(recs, False), np.array(labels, np.int64))
    return EventDataset("dvs-gesture", *parts["train"], *parts["test"], 11, spec,
                        GESTURE_CLASSES)


def _load_cifar10_dvs(root: Path, spec: FrameSpec) -> EventDataset:
    """Per class, files in name order: the first 90 % train, the rest test (no official split)."""
    files = cifar10_dvs_tree(root)
    parts = {"train": ([], []), "test": ([], [])}
    for label in range(len(CIFAR10_DVS_CLASSES)):
        mine = [f for f, lab in files if lab == label]
        n_train = (9 * len(mine)) // 10
        for j, f in enumerate(mine):
            recs, labs = parts["train" if j < n_train else "test"]
            recs.append(read_cifar10_dvs(f))
            labs.append(label)
    out = {s: (_Recordings.from_list(r, False), np.array(l, np.int64))
           for s, (r, l) in parts.items()}
    return EventDataset("cifar10-dvs", *out["train"], *out["test"], 10, spec,
                        CIFAR10_DVS_CLASSES)


def _load_shd(root: Path, spec: FrameSpec) -> EventDataset:
    parts = {}
    for split in ("train", "test"):
        samples, labels = read_shd(root / f"shd_{split}.h5")
        parts[split] = (_Recordings.from_list(samples, True), labels)
    n_classes = int(max(parts["train"][1].max(), parts["test"][1].max())) + 1
    return EventDataset("shd", *parts["train"], *parts["test"], max(n_classes, 20), spec)


def _holds(name: str, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if name in ("nmnist", "nmnist-synth"):
        ok = (folder / "Train").is_dir() and (folder / "Test").is_dir()
        return ok and (name == "nmnist" or (folder / "nmnist-synth.json").is_file())
    if name == "dvs-gesture":
        return any(folder.glob("user*.aedat"))
    if name == "cifar10-dvs":
        return any(any((folder / c).glob("*.aedat")) for c in CIFAR10_DVS_CLASSES)
    if name == "shd":
        return (folder / "shd_train.h5").is_file() and (folder / "shd_test.h5").is_file()
    return False


def synth_cache_dir() -> Path:
    """Where ``nmnist-synth`` is generated: $REFSNN_DATA/nmnist-synth or ~/.cache/refsnn/..."""
    env = os.environ.get(ENV_VAR)
    base = Path(env) if env else Path.home() / ".cache" / "refsnn"
    return base / "nmnist-synth"


def event_search_dirs(name: str, data_dir=None) -> list[tuple[Path, str]]:
    from refsnn.data.registry import lookup_dirs
    dirs = lookup_dirs(EVENT_SETS[name].subfolders, data_dir)
    if name == "nmnist-synth":
        dirs.append((synth_cache_dir(), "cache"))
    return dirs


def locate_event_dataset(name: str, data_dir=None) -> Path | None:
    for folder, _ in event_search_dirs(name, data_dir):
        if _holds(name, folder):
            return folder
    return None


def _generate_synth(folder: Path) -> Path:
    from refsnn.data.registry import load_dataset
    from refsnn.data.synth import write_nmnist_synth

    src = load_dataset("mnist10k")
    n = src.n_train + src.n_test
    print(f"refsnn: generating nmnist-synth ({n:,} recordings from mnist10k, once) in {folder}",
          file=sys.stderr, flush=True)
    try:
        write_nmnist_synth(folder, (src.train_x, src.train_y), (src.test_x, src.test_y), seed=0)
    except OSError as err:
        if _holds("nmnist-synth", folder):                    # another process made it first
            return folder
        raise DataError(f"cannot write nmnist-synth into {folder} ({err.strerror or err}); set "
                        f"${ENV_VAR} to a writable folder or run `refsnn data synth-events DIR` "
                        f"and pass --data-dir DIR") from None
    return folder


def load_event_dataset(name: str, data_dir=None) -> EventDataset:
    """Load the event set ``name`` (a key of EVENT_SETS); see the module docstring for where."""
    entry = EVENT_SETS[name]
    folder = locate_event_dataset(name, data_dir)
    if folder is None and name == "nmnist-synth":
        folder = _generate_synth(synth_cache_dir())
    if folder is None:
        tried = ", ".join(f"./{d.as_posix()}" if why == "./data" else f"{d} ({why})"
                          for d, why in event_search_dirs(name, data_dir))
        notes = [f"${ENV_VAR} not set"] if not os.environ.get(ENV_VAR) else []
        notes += ["no --data-dir given"] if data_dir is None else []
        note = f" ({', '.join(notes)})" if notes else ""
        raise DataError(f"dataset {name!r} not found: looked in {tried}{note}. To get it: "
                        f"{entry.how_to_get}")
    if name in ("nmnist", "nmnist-synth"):
        if name == "nmnist-synth":
            _check_marker(folder)
        return load_nmnist_tree(name, folder, entry.spec)
    if name == "dvs-gesture":
        return _load_gesture(folder, entry.spec)
    if name == "cifar10-dvs":
        return _load_cifar10_dvs(folder, entry.spec)
    return _load_shd(folder, entry.spec)


def _check_marker(folder: Path) -> None:
    from refsnn.data.synth import MARKER, SYNTH_VERSION

    try:
        meta = json.loads((folder / MARKER).read_text())
        version = int(meta["version"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{folder / MARKER} is unreadable; delete {folder} and it is generated "
                        f"again") from None
    if version != SYNTH_VERSION:
        raise DataError(f"{folder} was generated by nmnist-synth version {version}, this refsnn "
                        f"makes version {SYNTH_VERSION}; delete the folder to regenerate it")


def arch_for_dataset(arch: str, dataset: str) -> str:
    """A default ``arch`` whose input token is made to read the event set ``dataset``.

    For a method's default architecture (written for 28x28 images) run on an event set: the first
    token becomes the set's per-step input, flattened (``784-400-10`` -> ``2312-400-10`` for
    N-MNIST) when the next layer is dense, ``HxWxC`` (``34x34x2-...``) when it is a conv layer.
    Any other name, or an arch that cannot read the set (a conv net on SHD), is returned as it is,
    so the trainer's shape check explains the mismatch.
    """
    if dataset not in EVENT_SETS:
        return arch
    shape = EVENT_SETS[dataset].spec.shape
    tokens = str(arch).split("-")
    if len(tokens) < 2:
        return arch
    if tokens[1].strip().isdigit():
        tokens[0] = str(int(np.prod(shape)))
    elif len(shape) == 3:
        c, h, w = shape
        tokens[0] = f"{h}x{w}x{c}"
    return "-".join(tokens)
