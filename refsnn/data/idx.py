"""IDX files (the MNIST format): read and write, raw or gzipped, validating every byte.

Layout (big-endian, as published with MNIST):

    byte 0, 1     0x00 0x00                     magic
    byte 2        dtype code                    0x08 uint8, 0x09 int8, 0x0B int16,
                                                0x0C int32, 0x0D float32, 0x0E float64
    byte 3        ndim (number of dimensions)
    4 * ndim      dims, each an unsigned 32-bit big-endian integer
    payload       prod(dims) items of the dtype, big-endian, C order; nothing after it

A file whose name ends in ``.gz`` is a gzip stream holding exactly that layout.

Every problem (short header, wrong magic, unknown dtype code, zero dimensions, payload shorter or
longer than the dims say, a broken gzip stream) raises :class:`refsnn.errors.DataError` naming
the file and what was expected against what was found.
"""

from __future__ import annotations

import gzip
import os
import uuid
import zlib
from pathlib import Path

import numpy as np

from refsnn.errors import DataError

__all__ = ["read_idx", "write_idx", "IDX_DTYPES"]

#: dtype code -> big-endian numpy dtype of the payload.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}  # native -> code
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIM = 2**32 - 1


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _read_bytes(path: Path) -> bytes:
    """The IDX bytes of ``path``: the file itself, or its gzip stream decompressed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected an IDX file") from None
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err.strerror or err}") from None
    if not _is_gz(path):
        if raw[:2] == _GZIP_MAGIC:
            raise DataError(
                f"{path} is gzip-compressed but its name does not end in .gz: rename it to "
                f"{path.name}.gz (expected a raw IDX file starting with 0x00 0x00)"
            )
        return raw
    if raw[:2] != _GZIP_MAGIC:
        raise DataError(
            f"{path} is named .gz but is not gzip data (expected bytes 0x1f 0x8b, found "
            f"{_hex(raw[:2])}); if it is a raw IDX file, remove the .gz from its name"
        )
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        # BadGzipFile (an OSError), a cut stream (EOFError), a bad CRC or deflate block
        raise DataError(
            f"{path} is a corrupt or truncated gzip file ({err}); fetch it again"
        ) from None


def _hex(b: bytes) -> str:
    return " ".join(f"0x{x:02x}" for x in b) if b else "nothing"


def read_idx(path) -> np.ndarray:
    """Read one IDX file (raw, or gzipped when the name ends in ``.gz``).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    numpy.ndarray
        A new, writable array in native byte order with the file's dtype and dims.

    Raises
    ------
    DataError
        If the file is missing, not gzip when named .gz, or its header or payload length does not
        follow the layout in the module docstring; the message names the file, what was expected
        and what was found.
    """
    path = Path(path)
    data = _read_bytes(path)
    where = f"{path}" + (" (after gunzip)" if _is_gz(path) else "")
    if len(data) < 4:
        raise DataError(
            f"{where} is truncated: expected a 4-byte IDX header (0x00 0x00 dtype ndim), "
            f"found {len(data)} byte(s)"
        )
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{where} is not an IDX file: expected magic bytes 0x00 0x00, found {_hex(data[:2])}"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X} {IDX_DTYPES[c].name}" for c in IDX_DTYPES)
        raise DataError(f"{where} has unknown IDX dtype code 0x{code:02X}; expected one of {valid}")
    if ndim == 0:
        raise DataError(f"{where} declares 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{where} is truncated in its header: {ndim} dimension(s) need {header} header bytes, "
            f"found {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    n_items = 1
    for d in dims:
        n_items *= d
    expected = header + n_items * dtype.itemsize
    if len(data) != expected:
        what = ("truncated" if len(data) < expected
                else "longer than its header says (trailing bytes)")
        raise DataError(
            f"{where} is {what}: dims {dims} of {dtype.name} need {expected} bytes "
            f"({header} header + {n_items} x {dtype.itemsize}), found {len(data)}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=n_items, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _code_of(arr: np.ndarray, path: Path) -> int:
    dt = arr.dtype.newbyteorder("=")
    for known, code in _CODE_OF.items():
        if dt == known:
            return code
    valid = ", ".join(dt.name for dt in IDX_DTYPES.values())
    raise DataError(
        f"cannot write {path}: IDX holds {valid}, not {arr.dtype}; convert first, e.g. "
        f"array.astype(np.uint8) or array.astype(np.float32)"
    )


def write_idx(path, array) -> None:
    """Write ``array`` as one IDX file, atomically; gzipped when ``path`` ends in ``.gz``.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over ``path`` (``os.replace``), so a reader never sees a half-written file and a
    failure leaves no file behind. The gzip header has mtime 0 and no file name, so the same array
    gives the same bytes (for a given zlib).

    Raises
    ------
    DataError
        If the dtype has no IDX code, the array has 0 or more than 255 dimensions, or a dimension
        does not fit in 32 bits.
    """
    path = Path(path)
    arr = np.asarray(array)
    code = _code_of(arr, path)
    if not 1 <= arr.ndim <= 255:
        raise DataError(f"cannot write {path}: IDX needs 1 to 255 dimensions, got {arr.ndim}")
    if any(d > _MAX_DIM for d in arr.shape):
        raise DataError(f"cannot write {path}: dims {arr.shape} do not fit in 32 bits each")
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 lets the umask decide the permissions, as for any new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if _is_gz(path):
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                    gz.write(header)
                    gz.write(payload)
            else:
                f.write(header)
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
