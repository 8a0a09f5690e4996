"""CIFAR-10 and CIFAR-100, read from their *binary* releases (never the pickled "python" one).

Layouts (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"; the CIFAR page's
"binary version"): a file is a plain run of fixed-size records, no header, nothing after the last
record. One record is the label byte(s), then 3072 pixel bytes: the 1024 red values of the 32x32
image row by row, then the 1024 green, then the 1024 blue (channel-major, so one record reshapes
to (3, 32, 32), the (C, H, W) layout refsnn's networks read, arch ``32x32x3-...``).

========== ==================================== ============================== ===========
set        record                               files                          labels
========== ==================================== ============================== ===========
cifar10    1 label byte + 3072 = 3073 bytes      data_batch_1.bin .. _5.bin     0..9
                                                test_batch.bin
cifar100   1 coarse + 1 fine byte + 3072 = 3074  train.bin, test.bin            fine 0..99
                                                                               (coarse 0..19)
========== ==================================== ============================== ===========

The release archives ``cifar-10-binary.tar.gz`` (unpacks to ``cifar-10-batches-bin/``) and
``cifar-100-binary.tar.gz`` (``cifar-100-binary/``) are read as they are, without unpacking to disk.
CIFAR-100 is loaded with its fine (100-class) label.

Every length is checked: a file that is empty, not a whole number of records, or holds a label
out of range, a missing batch, or a broken archive raises :class:`refsnn.errors.DataError`
naming the file, what was expected and what was found. The python release
(``cifar-10-batches-py``, ``cifar-100-python``) is refused with a message saying why (unpickling
a file can run code from it) and which archive to get instead.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refsnn.errors import DataError

__all__ = ["CIFAR_SETS", "PIXELS", "read_cifar_bytes", "read_cifar_file", "load_cifar",
           "load_cifar_folder", "locate_cifar", "cifar_search_dirs", "cifar_source",
           "python_release", "holds_cifar", "partial_note", "refuse_python_release"]

PIXELS = 3 * 32 * 32          # bytes of one image, channel-major R, G, B
SHAPE = (3, 32, 32)           # (C, H, W)
CIFAR_PAGE = "the CIFAR page of Alex Krizhevsky (www.cs.toronto.edu/~kriz/cifar.html)"


@dataclass(frozen=True)
class _Cifar:
    name: str
    description: str
    n_classes: int
    label_bytes: int                 # bytes before the pixels of a record
    label_names: tuple               # what each label byte is
    label_limits: tuple              # labels of that byte are 0 .. limit-1
    train_files: tuple
    test_files: tuple
    folder: str                      # what the archive unpacks to
    archive: str                     # the binary release
    python_folder: str               # what the python release unpacks to (refused)
    python_archive: str
    subfolders: tuple                # where the registry looks (registry.lookup_dirs)

    @property
    def record(self) -> int:
        return self.label_bytes + PIXELS

    @property
    def how_to_get(self) -> str:
        return (f"download the binary version {self.archive} from {CIFAR_PAGE} and put the "
                f"archive (or the folder {self.folder}/ it unpacks to) in ./data/{self.name}/ "
                f"or in a folder passed as --data-dir (see data/README.md)")


CIFAR_SETS = {
    "cifar10": _Cifar(
        "cifar10",
        "CIFAR-10 colour images, 10 classes, 50,000 train / 10,000 test (Krizhevsky 2009)",
        10, 1, ("label",), (10,),
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
        "cifar-10-batches-bin", "cifar-10-binary.tar.gz",
        "cifar-10-batches-py", "cifar-10-python.tar.gz",
        ("cifar10", "cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "CIFAR10",
         "cifar-10"),
    ),
    "cifar100": _Cifar(
        "cifar100", "CIFAR-100 colour images, 100 classes (fine labels), 50,000 train / 10,000 "
        "test (Krizhevsky 2009)",
        100, 2, ("coarse label", "fine label"), (20, 100),
        ("train.bin",), ("test.bin",),
        "cifar-100-binary", "cifar-100-binary.tar.gz",
        "cifar-100-python", "cifar-100-python.tar.gz",
        ("cifar100", "cifar-100-binary", "cifar100/cifar-100-binary", "CIFAR100", "cifar-100"),
    ),
}

_PICKLE_PROTO = b"\x80"   # a pickle of protocol 2+ starts with 0x80 and the protocol number


def _pickle_refusal(where: str, entry: _Cifar) -> DataError:
    return DataError(
        f"{where} is a Python pickle (the CIFAR 'python version'); refsnn does not unpickle "
        f"data files, because unpickling runs code the file may contain. Download the binary "
        f"version {entry.archive} from {CIFAR_PAGE} instead (same images, plain bytes)"
    )


def read_cifar_bytes(data: bytes, name: str = "cifar10", where: str = "<bytes>"):
    """Records of one binary CIFAR file held in ``data`` -> (images, labels).

    Parameters
    ----------
    data : bytes
        The whole file.
    name : "cifar10" or "cifar100"
    where : str
        How error messages name the file.

    Returns
    -------
    images : uint8 array (N, 3, 32, 32), channels R, G, B
    labels : int64 array (N,), the label (CIFAR-10) or the fine label (CIFAR-100)
    """
    entry = CIFAR_SETS[name]
    rec = entry.record
    n_bytes = len(data)
    if n_bytes >= 2 and data[:1] == _PICKLE_PROTO and 2 <= data[1] <= 5:
        raise _pickle_refusal(where, entry)
    if n_bytes == 0:
        raise DataError(f"{where} is empty; expected {name} records of {rec} bytes each "
                        f"({entry.label_bytes} label byte(s) + {PIXELS} pixels); fetch it again")
    n, extra = divmod(n_bytes, rec)
    if extra:
        other = next((o for o in CIFAR_SETS.values() if o.name != name
                      and n_bytes % o.record == 0), None)
        hint = (f"; its length is a whole number of {other.name} records ({other.record} "
                f"bytes): is it a {other.name} file?" if other else "")
        raise DataError(
            f"{where} is truncated or not a {name} binary file: {n_bytes} bytes is not a whole "
            f"number of {rec}-byte records ({entry.label_bytes} label byte(s) + {PIXELS} pixel "
            f"bytes): {n} full record(s) and {extra} byte(s) left over{hint}. Fetch "
            f"{entry.archive} again"
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(n, rec)
    for k, (what, limit) in enumerate(zip(entry.label_names, entry.label_limits)):
        bad = np.flatnonzero(arr[:, k] >= limit)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{where}: record {i} (byte offset {i * rec + k}) has {what} {int(arr[i, k])}; "
                f"{name} {what}s are 0..{limit - 1} ({bad.size} record(s) out of range). The "
                f"file is corrupt or not a {name} binary batch; fetch {entry.archive} again"
            )
    images = arr[:, entry.label_bytes:].reshape((n,) + SHAPE).copy()
    labels = arr[:, entry.label_bytes - 1].astype(np.int64)     # CIFAR-100: the fine byte
    return images, labels


def read_cifar_file(path, name: str = "cifar10"):
    """One binary CIFAR file (e.g. ``data_batch_1.bin``) -> (images, labels); see
    :func:`read_cifar_bytes`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name} file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected a {name} binary file") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return read_cifar_bytes(data, name, str(path))


def _concat(parts):
    xs, ys = zip(*parts)
    return np.concatenate(xs), np.concatenate(ys)


def _files_in(folder: Path, entry: _Cifar) -> dict:
    """{file name: path} of the release's files present in ``folder``."""
    return {f: folder / f for f in entry.train_files + entry.test_files if (folder / f).is_file()}


def python_release(folder: Path, name: str) -> Path | None:
    """The python (pickle) release of ``name`` in or at ``folder``, if there is one."""
    entry = CIFAR_SETS[name]
    folder = Path(folder)
    for cand in (folder / entry.python_archive, folder / entry.python_folder):
        if cand.exists():
            return cand
    pickled = ("data_batch_1", "test_batch") if name == "cifar10" else ("train", "test")
    if folder.is_dir() and all((folder / f).is_file() for f in pickled):
        return folder
    return None


def cifar_source(folder: Path, name: str) -> tuple[str, Path] | None:
    """("files", folder) when ``folder`` holds every binary file of ``name``, ("archive", path)
    when it holds the release archive, else None."""
    entry = CIFAR_SETS[name]
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if len(_files_in(folder, entry)) == len(entry.train_files + entry.test_files):
        return ("files", folder)
    if (folder / entry.archive).is_file():
        return ("archive", folder / entry.archive)
    return None


def holds_cifar(folder: Path) -> str | None:
    """The CIFAR set whose binary release ``folder`` holds (files or archive), else None."""
    for name in CIFAR_SETS:
        if cifar_source(folder, name) is not None:
            return name
    return None


def partial_note(folder: Path, name: str) -> str | None:
    """A sentence about a folder holding some but not all of the binary files, else None."""
    entry = CIFAR_SETS[name]
    have = _files_in(Path(folder), entry)
    want = entry.train_files + entry.test_files
    if not have or len(have) == len(want):
        return None
    missing = [f for f in want if f not in have]
    return (f"{folder} holds {', '.join(sorted(have))} but lacks {', '.join(missing)} "
            f"(unpack {entry.archive} again, or put the archive itself there)")


def _read_archive(path: Path, entry: _Cifar) -> dict:
    """{file name: bytes} of the release files inside the .tar.gz ``path`` (read in memory)."""
    want = set(entry.train_files + entry.test_files)
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base in want and member.isfile():
                    fh = tar.extractfile(member)
                    out[base] = fh.read()
                if base in ("data_batch_1", "train") and member.isfile() and base not in want:
                    raise _pickle_refusal(f"{path} (member {member.name})", entry)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(f"{path} is a corrupt or truncated .tar.gz archive ({err}); download "
                        f"{entry.archive} again") from None
    missing = sorted(want - set(out))
    if missing:
        raise DataError(f"archive {path} lacks {', '.join(missing)}; expected the binary "
                        f"release {entry.archive} (folder {entry.folder}/ inside); download it "
                        f"again")
    return out


def load_cifar_folder(folder, name: str, label: str | None = None):
    """Load ``name`` from ``folder`` (its binary files, or its release archive in it).

    Returns a :class:`refsnn.data.registry.Dataset` with images (N, 3, 32, 32) uint8.
    """
    from refsnn.data.registry import Dataset

    entry = CIFAR_SETS[name]
    folder = Path(folder)
    src = cifar_source(folder, name)
    if src is None:
        py = python_release(folder, name)
        if py is not None:
            raise _pickle_refusal(str(py), entry)
        note = partial_note(folder, name)
        raise DataError(note or (
            f"folder {folder} holds neither the {name} binary files "
            f"({', '.join(entry.train_files + entry.test_files)}) nor {entry.archive}; "
            f"{entry.how_to_get}"))
    kind, where = src
    if kind == "files":
        blobs = {f: (folder / f) for f in entry.train_files + entry.test_files}
        read = {f: read_cifar_file(p, name) for f, p in blobs.items()}
    else:
        raw = _read_archive(where, entry)
        read = {f: read_cifar_bytes(b, name, f"{where} (member {f})") for f, b in raw.items()}
    trx, try_ = _concat([read[f] for f in entry.train_files])
    tex, tey = _concat([read[f] for f in entry.test_files])
    return Dataset(label or name, trx, try_, tex, tey, entry.n_classes, SHAPE)


def cifar_search_dirs(name: str, data_dir=None) -> list[tuple[Path, str]]:
    """[(folder, why)] in the registry's lookup order (--data-dir, $REFSNN_DATA, ./data)."""
    from refsnn.data.registry import lookup_dirs
    seen, out = set(), []
    for folder, why in lookup_dirs(CIFAR_SETS[name].subfolders, data_dir):
        if folder not in seen:
            seen.add(folder)
            out.append((folder, why))
    return out


def locate_cifar(name: str, data_dir=None) -> Path | None:
    """The first folder of :func:`cifar_search_dirs` holding the binary release, else None."""
    for folder, _ in cifar_search_dirs(name, data_dir):
        if cifar_source(folder, name) is not None:
            return folder
    return None


def load_cifar(name: str, data_dir=None):
    """Load the registered set ``name`` (cifar10 or cifar100) from the first folder holding it.

    Raises DataError naming every folder looked in, any python release or partial folder seen
    on the way, and where to get the files.
    """
    import os

    from refsnn.data.registry import ENV_VAR

    entry = CIFAR_SETS[name]
    folder = locate_cifar(name, data_dir)
    if folder is not None:
        return load_cifar_folder(folder, name)
    dirs = cifar_search_dirs(name, data_dir)
    notes = []
    for d, _ in dirs:
        py = python_release(d, name)
        if py is not None:
            notes.append(f"{py} is the python (pickle) release, which refsnn does not read "
                         f"(unpickling runs code the file may contain); get {entry.archive} "
                         f"instead")
        part = partial_note(d, name)
        if part:
            notes.append(part)
    tried = ", ".join(f"./{d.as_posix()}" if why == "./data" else f"{d} ({why})"
                      for d, why in dirs)
    unset = [f"${ENV_VAR} not set"] if not os.environ.get(ENV_VAR) else []
    unset += ["no --data-dir given"] if data_dir is None else []
    raise DataError(
        f"dataset {name!r} not found: looked for {', '.join(entry.train_files + entry.test_files)}"
        f" or {entry.archive} in {tried}" + (f" ({', '.join(unset)})" if unset else "") + ". "
        + "".join(n + ". " for n in notes) + f"To get it: {entry.how_to_get}"
    )


def refuse_python_release(folder) -> None:
    """Raise a DataError if ``folder`` holds a CIFAR python release (the pickle refusal) or only
    part of a binary release (naming what is missing); else return."""
    for name, entry in CIFAR_SETS.items():
        py = python_release(Path(folder), name)
        if py is not None:
            raise _pickle_refusal(str(py), entry)
        note = partial_note(Path(folder), name)
        if note:
            raise DataError(f"{note}; {name} needs all of "
                            f"{', '.join(entry.train_files + entry.test_files)}")
