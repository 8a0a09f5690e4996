"""Event files: N-MNIST (.bin), DVS128 Gesture (AEDAT 3.1 + labels CSV), CIFAR10-DVS (AEDAT 2.0),
SHD (HDF5). Readers return numpy structured arrays; every problem raises DataError naming the file.

Event records (one row per event, fields in this order):

``CAMERA_DTYPE``  x (uint16, column, 0 .. W-1), y (uint16, row, 0 .. H-1), p (uint8, 1 = ON =
                  brightness increase, 0 = OFF), t (int64, microseconds)
``AUDIO_DTYPE``   unit (uint16, channel 0 .. n_units-1), t (int64, microseconds)

Sensor sizes are given as (H, W). The layouts below follow docs/events.md, which cites the
sources (dataset pages, libcaer, jAER) for every field.

N-MNIST  one ``.bin`` per recording, no header, 5 bytes per event (``read_nmnist``):
         byte 0 x, byte 1 y, byte 2 bit 7 polarity and bits 6..0 timestamp bits 22..16, byte 3
         timestamp bits 15..8, byte 4 timestamp bits 7..0. Sensor 34 x 34. Values are the raw
         0-based ones (the Matlab reader adds 1). x or y >= 34 is rejected as corruption (the
         ATIS "y == 240 overflow marker" cannot occur in N-MNIST). Folder tree
         ``Train/<digit>/<id>.bin``, ``Test/<digit>/<id>.bin`` (``nmnist_tree``).
AEDAT 3.1  ASCII header lines ``#...\\r\\n`` from ``#!AER-DAT3.1`` to ``#!END-HEADER``, then
         packets: a 28-byte little-endian header (eventType int16, eventSource int16, eventSize,
         eventTSOffset, eventTSOverflow, eventCapacity, eventNumber, eventValid: int32) and
         eventCapacity * eventSize bytes. Polarity packets (type 1) hold 8-byte events: uint32 data
         (bit 0 valid, bit 1 polarity, bits 2..16 y, bits 17..31 x) and int32 timestamp; the full
         time is (eventTSOverflow << 31) | timestamp. Other packet types are skipped, invalid
         events dropped. Origin upper left (``read_aedat31``).
DVS Gesture labels  ``<trial>_labels.csv``: header ``class,startTime_usec,endTime_usec``, one row
         per gesture, class 1..11; a sample is the events with start <= t < end, label class - 1
         (``read_gesture_labels``, ``read_dvs_gesture``).
AEDAT 2.0 (CIFAR10-DVS)  ``#`` header lines, then big-endian pairs (uint32 address, uint32
         timestamp). DVS128 address: bit 15 external event (skipped), bits 14..8 y, bits 7..1 x,
         bit 0 polarity; bits 16..31 must be 0 (``read_cifar10_dvs``, ``mapping`` picks the
         orientation convention).
SHD      HDF5: ``spikes/times`` (vlen float, seconds), ``spikes/units`` (vlen int), ``labels``;
         read with h5py (``read_shd``). Times become integer microseconds (rounded).
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path

import numpy as np

from refsnn.errors import ConfigError, DataError

__all__ = [
    "CAMERA_DTYPE", "AUDIO_DTYPE", "NMNIST_SENSOR", "DVS128_SENSOR", "SHD_UNITS",
    "GESTURE_CLASSES", "CIFAR10_DVS_CLASSES", "FORMATS",
    "camera_events", "audio_events",
    "read_nmnist", "write_nmnist", "nmnist_tree",
    "read_aedat31", "write_aedat31", "read_gesture_labels", "read_dvs_gesture",
    "read_cifar10_dvs", "write_cifar10_dvs", "cifar10_dvs_tree",
    "read_shd", "write_shd", "guess_format",
]

CAMERA_DTYPE = np.dtype([("x", "<u2"), ("y", "<u2"), ("p", "u1"), ("t", "<i8")])
AUDIO_DTYPE = np.dtype([("unit", "<u2"), ("t", "<i8")])

NMNIST_SENSOR = (34, 34)          # (H, W)
DVS128_SENSOR = (128, 128)        # DVS Gesture and CIFAR10-DVS
SHD_UNITS = 700                   # cochlea channels of SHD / SSC
NMNIST_T_MAX = 2**23 - 1          # 23-bit timestamps

#: DVS128 Gesture classes by refsnn label (= CSV class - 1), from the dataset's README.
GESTURE_CLASSES = (
    "hand clapping", "right hand wave", "left hand wave", "right arm clockwise",
    "right arm counter clockwise", "left arm clockwise", "left arm counter clockwise",
    "arm roll", "air drums", "air guitar", "other gestures",
)
#: CIFAR10-DVS class folders by label (CIFAR-10 order).
CIFAR10_DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                       "horse", "ship", "truck")
#: --format names of `refsnn data inspect` and :func:`guess_format`.
FORMATS = ("nmnist", "aedat", "cifar10-dvs", "shd")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def camera_events(x, y, p, t) -> np.ndarray:
    """A CAMERA_DTYPE array from four equal-length sequences (values are checked, not clipped)."""
    cols = [np.asarray(v).ravel() for v in (x, y, p, t)]
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise DataError(f"camera_events: x, y, p, t have lengths {[len(c) for c in cols]}; "
                        f"they must be equal")
    for name, c, hi in (("x", cols[0], 2**16 - 1), ("y", cols[1], 2**16 - 1), ("p", cols[2], 1)):
        if n and (c.dtype.kind not in "iub" or c.min() < 0 or c.max() > hi):
            raise DataError(f"camera_events: {name} must hold integers in 0..{hi}")
    if n and cols[3].dtype.kind not in "iu":
        raise DataError("camera_events: t must hold integer microseconds")
    ev = np.empty(n, CAMERA_DTYPE)
    for name, c in zip(CAMERA_DTYPE.names, cols):
        ev[name] = c
    return ev


def audio_events(unit, t) -> np.ndarray:
    """An AUDIO_DTYPE array from two equal-length sequences."""
    unit, t = np.asarray(unit).ravel(), np.asarray(t).ravel()
    if len(unit) != len(t):
        raise DataError(f"audio_events: {len(unit)} units but {len(t)} times")
    ev = np.empty(len(t), AUDIO_DTYPE)
    ev["unit"], ev["t"] = unit, t
    return ev


# ---- shared helpers ---------------------------------------------------------------------------

def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected a {what} file") from None
    except OSError as err:
        raise DataError(f"cannot read {what} file {path}: {err.strerror or err}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_sensor(sensor, what="sensor") -> tuple:
    try:
        h, w = (int(s) for s in sensor)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be (H, W), got {sensor!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"{what} must be positive, got {sensor!r}")
    return h, w


def _check_in_sensor(path, x, y, sensor, where="") -> None:
    h, w = sensor
    bad = (x >= w) | (y >= h)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: event {i}{where} at x={int(x[i])}, y={int(y[i])} lies outside the "
            f"{w}x{h} sensor ({int(bad.sum())} such events); the file is corrupt or not of this "
            f"format"
        )


# ---- N-MNIST ----------------------------------------------------------------------------------

def read_nmnist(path, sensor=NMNIST_SENSOR) -> np.ndarray:
    """Events of one N-MNIST ``.bin`` file as a CAMERA_DTYPE array, in file order.

    Raises DataError for a file whose length is not a multiple of 5 (truncated) or with an event
    outside the ``sensor`` (H, W) = (34, 34). An empty file is a recording with no events.
    """
    path = Path(path)
    sensor = _check_sensor(sensor)
    raw = _read_bytes(path, "N-MNIST")
    if len(raw) % 5:
        raise DataError(
            f"{path}: {len(raw)} bytes is not a multiple of 5 (N-MNIST stores 5 bytes per event); "
            f"the file is truncated or not an N-MNIST .bin file"
        )
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 5)
    x, y = b[:, 0].astype(np.uint16), b[:, 1].astype(np.uint16)
    _check_in_sensor(path, x, y, sensor)
    ev = np.empty(len(b), CAMERA_DTYPE)
    ev["x"], ev["y"] = x, y
    ev["p"] = b[:, 2] >> 7
    ev["t"] = ((b[:, 2].astype(np.int64) & 0x7F) << 16) | (b[:, 3].astype(np.int64) << 8) | b[:, 4]
    return ev


def write_nmnist(path, events, sensor=NMNIST_SENSOR) -> None:
    """Write CAMERA_DTYPE ``events`` as an N-MNIST ``.bin`` file (atomically).

    Raises DataError for x, y outside ``sensor`` or t outside 0 .. 2**23 - 1 (the 23-bit field).
    """
    path = Path(path)
    h, w = _check_sensor(sensor)
    ev = np.asarray(events)
    if ev.dtype.names is None or not {"x", "y", "p", "t"} <= set(ev.dtype.names):
        raise DataError(f"cannot write {path}: events need fields x, y, p, t (CAMERA_DTYPE)")
    x, y, p, t = (ev[f].astype(np.int64) for f in ("x", "y", "p", "t"))
    for name, v, hi in (("x", x, w - 1), ("y", y, h - 1), ("p", p, 1), ("t", t, NMNIST_T_MAX)):
        if len(v) and (v.min() < 0 or v.max() > hi):
            raise DataError(f"cannot write {path}: {name} spans {v.min()}..{v.max()}, the N-MNIST "
                            f"format holds 0..{hi}")
    b = np.empty((len(ev), 5), np.uint8)
    b[:, 0], b[:, 1] = x, y
    b[:, 2] = (p << 7) | (t >> 16)
    b[:, 3] = (t >> 8) & 0xFF
    b[:, 4] = t & 0xFF
    _write_atomic(path, b.tobytes())


def nmnist_tree(root, split: str) -> list[tuple[Path, int]]:
    """(file, label) of every recording of ``split`` ("train" or "test") under an N-MNIST tree.

    The tree is ``root/Train/<digit>/<id>.bin`` and ``root/Test/<digit>/<id>.bin``; the label is
    the digit folder. Files are ordered by their numeric id (the sample's index in MNIST), then
    by digit. Raises DataError when the split folder is missing or holds no .bin file.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) / ("Train" if split == "train" else "Test")
    if not folder.is_dir():
        raise DataError(f"N-MNIST folder {folder} does not exist; an N-MNIST tree holds "
                        f"Train/<digit>/<id>.bin and Test/<digit>/<id>.bin")
    found = []
    for sub in sorted(folder.iterdir()):
        if not sub.is_dir():
            continue
        if not (sub.name.isdigit() and len(sub.name) == 1):
            raise DataError(f"{sub}: N-MNIST class folders are named 0 .. 9, found {sub.name!r}")
        for f in sub.glob("*.bin"):
            key = int(f.stem) if f.stem.isdigit() else -1
            found.append((key, f.stem, int(sub.name), f))
    if not found:
        raise DataError(f"no .bin file in {folder}/<digit>/; an N-MNIST tree holds "
                        f"Train/<digit>/<id>.bin and Test/<digit>/<id>.bin")
    found.sort(key=lambda r: (r[0], r[1], r[2]))
    return [(f, label) for _, _, label, f in found]


# ---- AEDAT 3.1 (DVS128 Gesture) ----------------------------------------------------------------

_PACKET = np.dtype([("type", "<i2"), ("source", "<i2"), ("size", "<i4"), ("ts_offset", "<i4"),
                    ("ts_overflow", "<i4"), ("capacity", "<i4"), ("number", "<i4"),
                    ("valid", "<i4")])
_POLARITY = np.dtype([("data", "<u4"), ("ts", "<i4")])


def _split_header(raw: bytes, path: Path, version: bytes, end: bytes | None):
    """(header lines, offset of the body). AEDAT header lines start with '#', end with LF.

    With ``end`` the header runs to that line (AEDAT 3.1); without, to the first line that does
    not start with '#' (AEDAT 2.0).
    """
    lines, pos = [], 0
    while True:
        if end is None and raw[pos:pos + 1] != b"#":
            return lines, pos
        if pos >= len(raw):
            raise DataError(f"{path}: the header has no {end.decode()} line (file ends after "
                            f"{len(lines)} header lines); the file is truncated or corrupt")
        nl = raw.find(b"\n", pos)
        if nl < 0:
            raise DataError(f"{path}: header line {len(lines) + 1} is not terminated (no line "
                            f"feed before the end of the file); the file is truncated")
        line = raw[pos:nl].rstrip(b"\r")
        if not line.startswith(b"#"):
            raise DataError(f"{path}: header line {len(lines) + 1} does not start with '#' and "
                            f"no {end.decode()} line came before it; the header is corrupt")
        if not lines and not line.startswith(version):
            found = line[:20].decode("latin-1")
            hint = ""
            if line.startswith(b"#!AER-DAT4"):
                hint = " AEDAT 4.0 (compressed) is not supported; convert the file with dv tools."
            elif line.startswith(b"#!AER-DAT3"):
                hint = " It is AEDAT 3: read it with read_aedat31 (--format aedat)."
            elif line.startswith(b"#!AER-DAT2"):
                hint = " It is AEDAT 2.0: read it with read_cifar10_dvs (--format cifar10-dvs)."
            raise DataError(f"{path}: the first line is {found!r}, expected "
                            f"{version.decode()!r}.{hint}")
        lines.append(line)
        pos = nl + 1
        if end is not None and line == end:
            return lines, pos


def read_aedat31(path, sensor=DVS128_SENSOR) -> np.ndarray:
    """Polarity events of an AEDAT 3.1 file as a CAMERA_DTYPE array, in file order.

    Packets of other types are skipped; events whose valid bit is 0 are dropped. Raises
    DataError for a wrong version line, a missing ``#!END-HEADER``, a truncated packet header or
    body, inconsistent packet fields, a negative timestamp, or an event outside ``sensor``.
    """
    path = Path(path)
    sensor = _check_sensor(sensor)
    raw = _read_bytes(path, "AEDAT 3.1")
    _, pos = _split_header(raw, path, b"#!AER-DAT3.1", b"#!END-HEADER")
    parts, n = [], len(raw)
    k = 0
    while pos < n:
        if pos + _PACKET.itemsize > n:
            raise DataError(f"{path}: packet {k} header at byte {pos} is truncated ({n - pos} of "
                            f"28 bytes); the file is cut short")
        h = np.frombuffer(raw, _PACKET, count=1, offset=pos)[0]
        size, cap, num = int(h["size"]), int(h["capacity"]), int(h["number"])
        if size < 0 or cap < 0 or not 0 <= num <= cap:
            raise DataError(f"{path}: packet {k} at byte {pos} has eventSize {size}, "
                            f"eventCapacity {cap}, eventNumber {num}; need sizes >= 0 and "
                            f"0 <= eventNumber <= eventCapacity (corrupt packet header)")
        body = pos + _PACKET.itemsize
        end = body + cap * size
        if end > n:
            raise DataError(f"{path}: packet {k} at byte {pos} announces {cap} x {size} bytes of "
                            f"events but only {n - body} remain; the file is truncated")
        if int(h["type"]) == 1:
            if size != 8 or int(h["ts_offset"]) != 4:
                raise DataError(f"{path}: polarity packet {k} at byte {pos} has eventSize {size} "
                                f"and eventTSOffset {int(h['ts_offset'])}; AEDAT 3.1 polarity "
                                f"events are 8 bytes with the timestamp at offset 4")
            overflow = int(h["ts_overflow"])
            e = np.frombuffer(raw, _POLARITY, count=num, offset=body)
            if overflow < 0 or (num and int(e["ts"].min()) < 0):
                raise DataError(f"{path}: polarity packet {k} at byte {pos} holds a negative "
                                f"timestamp or overflow counter; the file is corrupt")
            e = e[(e["data"] & 1) == 1]                      # bit 0: valid mark
            d = e["data"]
            ev = np.empty(len(e), CAMERA_DTYPE)
            ev["x"] = (d >> 17) & 0x7FFF
            ev["y"] = (d >> 2) & 0x7FFF
            ev["p"] = (d >> 1) & 1
            ev["t"] = (np.int64(overflow) << 31) | e["ts"].astype(np.int64)
            _check_in_sensor(path, ev["x"], ev["y"], sensor, f" of packet {k}")
            parts.append(ev)
        pos, k = end, k + 1
    return np.concatenate(parts) if parts else np.empty(0, CAMERA_DTYPE)


def write_aedat31(path, events, packet_size: int = 4096, extra_packets=()) -> None:
    """Write CAMERA_DTYPE ``events`` as an AEDAT 3.1 file of polarity packets (for tests/tools).

    Timestamps are split as (t >> 31) into eventTSOverflow per packet; events of one packet must
    share it (a new packet is started when it changes). ``extra_packets`` are raw byte strings
    appended after the polarity packets (e.g. a special-event packet).
    """
    ev = np.asarray(events)
    out = [b"#!AER-DAT3.1\r\n", b"#Format: RAW\r\n", b"#Source 1: DVS128\r\n",
           b"#Start-Time: 2017-01-01 00:00:00 (TZ+0000)\r\n", b"#!END-HEADER\r\n"]
    t = ev["t"].astype(np.int64)
    over = t >> 31
    start = 0
    while start < len(ev):
        stop = min(start + packet_size, len(ev))
        same = np.flatnonzero(over[start:stop] != over[start])
        if len(same):
            stop = start + int(same[0])
        e = ev[start:stop]
        body = np.empty(len(e), _POLARITY)
        body["data"] = ((e["x"].astype(np.uint32) << 17) | (e["y"].astype(np.uint32) << 2)
                        | (e["p"].astype(np.uint32) << 1) | 1)
        body["ts"] = (t[start:stop] & 0x7FFFFFFF).astype(np.int32)
        head = np.array([(1, 1, 8, 4, int(over[start]), len(e), len(e), len(e))], _PACKET)
        out += [head.tobytes(), body.tobytes()]
        start = stop
    out += list(extra_packets)
    _write_atomic(Path(path), b"".join(out))


_GESTURE_LABELS = np.dtype([("label", "<i8"), ("start", "<i8"), ("end", "<i8")])


def read_gesture_labels(path, n_classes: int = len(GESTURE_CLASSES)) -> np.ndarray:
    """Rows of a DVS Gesture ``*_labels.csv``: structured array (label, start, end).

    label = class - 1 (classes 1..11), start and end in microseconds (the clock of the events).
    Repeated classes and overlapping windows are kept as they are (known quirks of the data set).
    Raises DataError for a wrong header, a row that is not three integers, a class out of range
    or end <= start.
    """
    path = Path(path)
    raw = _read_bytes(path, "DVS Gesture labels")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (labels CSV expected)") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    want = ["class", "startTime_usec", "endTime_usec"]
    if not rows or [c.strip() for c in rows[0]] != want:
        got = rows[0] if rows else "nothing"
        raise DataError(f"{path}: the first line must be {','.join(want)}, found {got!r}")
    out = np.empty(len(rows) - 1, _GESTURE_LABELS)
    for i, r in enumerate(rows[1:]):
        try:
            c, s, e = (int(v) for v in r)
        except ValueError:
            raise DataError(f"{path}: row {i + 2} {r!r} is not three integers "
                            f"class,startTime_usec,endTime_usec") from None
        if not 1 <= c <= n_classes:
            raise DataError(f"{path}: row {i + 2} has class {c}; classes are 1..{n_classes}")
        if s < 0 or e <= s:
            raise DataError(f"{path}: row {i + 2} has start {s} and end {e} us; need "
                            f"0 <= start < end")
        out[i] = (c - 1, s, e)
    return out


def read_dvs_gesture(path, labels_path=None, sensor=DVS128_SENSOR) -> list:
    """One DVS Gesture trial: [(events, label)] per row of its labels CSV.

    ``labels_path`` defaults to ``<trial>_labels.csv`` beside ``<trial>.aedat``. A sample holds
    the events with start <= t < end, with t made relative to start (t - start).
    """
    path = Path(path)
    labels_path = Path(labels_path) if labels_path is not None else \
        path.with_name(path.stem + "_labels.csv")
    ev = read_aedat31(path, sensor)
    rows = read_gesture_labels(labels_path)
    out = []
    for label, start, end in rows:
        sel = ev[(ev["t"] >= start) & (ev["t"] < end)].copy()
        sel["t"] -= start
        out.append((sel, int(label)))
    return out


# ---- AEDAT 2.0 (CIFAR10-DVS) -------------------------------------------------------------------

_MAPPINGS = ("jaer", "raw")


def read_cifar10_dvs(path, mapping: str = "jaer") -> np.ndarray:
    """Events of one CIFAR10-DVS recording (jAER AEDAT 2.0, DVS128) as a CAMERA_DTYPE array.

    mapping : "jaer" (default) x = 127 - raw_x, y = raw_y, p = 1 - bit0 (the convention of jAER's
        DVS128 extractor, which wrote the files; y counts from the bottom), or "raw": x = raw_x,
        y = raw_y, p = bit0, as stored. Classification does not depend on the choice.

    Addresses with bit 15 set (external events) are skipped. Raises DataError for a version line
    other than AEDAT 2.0, a body that is not whole 8-byte records, or an address with any of bits
    16..31 set (not a DVS128 address).
    """
    path = Path(path)
    if mapping not in _MAPPINGS:
        raise ConfigError(f"mapping must be one of {', '.join(_MAPPINGS)}, got {mapping!r}")
    raw = _read_bytes(path, "AEDAT 2.0")
    if raw.startswith(b"#!AER-DAT"):
        _, pos = _split_header(raw, path, b"#!AER-DAT2.0", None)
    else:
        _, pos = _split_header(raw, path, b"#", None)
    body = len(raw) - pos
    if body % 8:
        raise DataError(f"{path}: {body} bytes after the header is not a whole number of 8-byte "
                        f"(address, timestamp) records; the file is truncated")
    rec = np.frombuffer(raw, dtype=">u4", offset=pos).reshape(-1, 2)
    addr, ts = rec[:, 0], rec[:, 1]
    high = addr >> 16
    if high.any():
        i = int(np.flatnonzero(high)[0])
        raise DataError(f"{path}: record {i} has address 0x{int(addr[i]):08x} with bits 16..31 "
                        f"set, which is not a DVS128 address; the file is corrupt or from "
                        f"another sensor")
    keep = (addr & 0x8000) == 0                                  # bit 15: external event
    addr, ts = addr[keep], ts[keep]
    rx, ry, bit0 = (addr >> 1) & 0x7F, (addr >> 8) & 0x7F, addr & 1
    ev = np.empty(len(addr), CAMERA_DTYPE)
    if mapping == "jaer":
        ev["x"], ev["y"], ev["p"] = 127 - rx, ry, 1 - bit0
    else:
        ev["x"], ev["y"], ev["p"] = rx, ry, bit0
    ev["t"] = ts
    return ev


def write_cifar10_dvs(path, events, mapping: str = "jaer", extra_records=()) -> None:
    """Write CAMERA_DTYPE ``events`` (128x128) as a jAER AEDAT 2.0 file; inverse of the reader.

    ``extra_records``: (address, timestamp) pairs appended as they are (e.g. external events).
    """
    if mapping not in _MAPPINGS:
        raise ConfigError(f"mapping must be one of {', '.join(_MAPPINGS)}, got {mapping!r}")
    ev = np.asarray(events)
    x, y, p = (ev[f].astype(np.uint32) for f in ("x", "y", "p"))
    if mapping == "jaer":
        x, p = 127 - x, 1 - p
    rec = np.empty((len(ev), 2), ">u4")
    rec[:, 0] = (y << 8) | (x << 1) | p
    rec[:, 1] = ev["t"]
    extra = np.asarray(list(extra_records), ">u4").reshape(-1, 2)
    head = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n"
    _write_atomic(Path(path), head + rec.tobytes() + extra.tobytes())


def cifar10_dvs_tree(root) -> list[tuple[Path, int]]:
    """(file, label) of every ``root/<class>/*.aedat``, classes in CIFAR-10 order."""
    root = Path(root)
    found = []
    for label, name in enumerate(CIFAR10_DVS_CLASSES):
        found += [(f, label) for f in sorted((root / name).glob("*.aedat"))]
    if not found:
        raise DataError(f"no .aedat file in {root}/<class>/ (classes "
                        f"{', '.join(CIFAR10_DVS_CLASSES)})")
    return found


# ---- SHD (HDF5) --------------------------------------------------------------------------------

def read_shd(path, n_units: int = SHD_UNITS) -> tuple[list, np.ndarray]:
    """Samples of an SHD/SSC HDF5 file: ([AUDIO_DTYPE array per sample], labels int64).

    Spike times (seconds) become integer microseconds, round(t * 1e6). Raises DataError for a
    file that is not HDF5, lacks ``spikes/times``, ``spikes/units`` or ``labels``, has unequal
    counts, a sample whose times and units differ in length, a unit outside 0 .. n_units-1, a
    negative or non-finite time, or a negative or non-integer label.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"SHD file {path} does not exist" if not path.exists()
                        else f"{path} is a folder, expected an SHD .h5 file")
    try:
        with h5py.File(path, "r") as f:
            for key in ("spikes/times", "spikes/units", "labels"):
                if key not in f:
                    raise DataError(f"{path}: no dataset {key!r}; an SHD file holds spikes/times, "
                                    f"spikes/units and labels")
            times, units, labels = f["spikes/times"][()], f["spikes/units"][()], f["labels"][()]
    except DataError:
        raise
    except Exception as err:   # h5py reports corrupt files as OSError, KeyError, ValueError, ...
        raise DataError(f"{path}: not a readable HDF5 file ({type(err).__name__}: {err})") from None
    labels = np.asarray(labels)
    if np.ndim(times) < 1 or np.ndim(units) < 1:
        raise DataError(f"{path}: spikes/times and spikes/units must hold one row per sample, "
                        f"found scalars")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be a 1-D integer dataset, found {labels.dtype} "
                        f"{labels.shape}")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {labels.min()}")
    if not (len(times) == len(units) == len(labels)):
        raise DataError(f"{path}: {len(times)} spike-time rows, {len(units)} unit rows and "
                        f"{len(labels)} labels; the counts must be equal")
    samples = []
    for i, (tm, un) in enumerate(zip(times, units)):
        tm, un = np.asarray(tm).ravel(), np.asarray(un).ravel()
        if len(tm) != len(un):
            raise DataError(f"{path}: sample {i} has {len(tm)} times but {len(un)} units")
        if tm.dtype.kind not in "fiu" or un.dtype.kind not in "iu":
            raise DataError(f"{path}: sample {i}: times must be numbers and units integers, "
                            f"found {tm.dtype} and {un.dtype}")
        tm = tm.astype(np.float64)
        if len(tm) and (not np.isfinite(tm).all() or tm.min() < 0 or tm.max() > 1e6):
            raise DataError(f"{path}: sample {i} has spike times outside 0 .. 1e6 s or not "
                            f"finite; the file is corrupt")
        if len(un) and (un.min() < 0 or un.max() >= n_units):
            bad = int(un.max()) if un.max() >= n_units else int(un.min())
            raise DataError(f"{path}: sample {i} has unit {bad}; units are 0..{n_units - 1}")
        samples.append(audio_events(un.astype(np.uint16), np.rint(tm * 1e6).astype(np.int64)))
    return samples, labels.astype(np.int64)


def write_shd(path, samples, labels) -> None:
    """Write samples (AUDIO_DTYPE arrays, t in microseconds) and labels in the SHD layout.

    Times are stored as float64 seconds, units as uint16 (vlen datasets), labels as uint16.
    """
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            ft = h5py.vlen_dtype(np.dtype("f8"))
            ut = h5py.vlen_dtype(np.dtype("u2"))
            dt = f.create_dataset("spikes/times", (len(samples),), dtype=ft)
            du = f.create_dataset("spikes/units", (len(samples),), dtype=ut)
            for i, s in enumerate(samples):
                dt[i] = np.asarray(s["t"], np.float64) / 1e6
                du[i] = np.asarray(s["unit"], np.uint16)
            f.create_dataset("labels", data=np.asarray(labels, np.uint16))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- format guess --------------------------------------------------------------------------------

def guess_format(path) -> str:
    """One of FORMATS from the file's first bytes (and, for N-MNIST, its .bin suffix)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected an event file") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if head.startswith(_HDF5_SIGNATURE):
        return "shd"
    if head.startswith(b"#!AER-DAT3"):
        return "aedat"
    if head.startswith(b"#!AER-DAT2") or head.startswith(b"#"):
        return "cifar10-dvs"
    if path.suffix.lower() == ".bin":
        return "nmnist"
    raise DataError(f"cannot tell the format of {path} from its first bytes or its name; pass "
                    f"--format with one of {', '.join(FORMATS)}")
