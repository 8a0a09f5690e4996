"""IDX reader/writer on tiny files the tests write: round trips, and every kind of broken file."""

import gzip
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refsnn.data.idx import read_idx, write_idx
from refsnn.errors import DataError

# (dtype code, numpy dtype): the six the IDX format defines
CODES = [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
         (0x0D, np.float32), (0x0E, np.float64)]


def idx_bytes(code, dims, payload):
    """An IDX file assembled by hand from the published layout (not by write_idx)."""
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


def mnist_like(tmp_path, name="x-idx3-ubyte", dims=(2, 3, 4), gz=False):
    arr = np.arange(np.prod(dims), dtype=np.uint8).reshape(dims)
    data = idx_bytes(0x08, dims, arr.tobytes())
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path, arr, data


@pytest.mark.parametrize("code, dtype", CODES)
@pytest.mark.parametrize("gz", [False, True])
def test_reads_hand_made_file_of_every_dtype(tmp_path, code, dtype, gz):
    arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    if np.dtype(dtype).kind == "u":
        arr = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    be = arr.astype(np.dtype(dtype).newbyteorder(">"))
    data = idx_bytes(code, arr.shape, be.tobytes())
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.flags.writeable
    np.testing.assert_array_equal(out, arr)


TMP_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is shared: examples overwrite files


@settings(deadline=None, max_examples=40, suppress_health_check=TMP_OK)
@given(
    dtype=st.sampled_from([d for _, d in CODES]),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
    gz=st.booleans(),
    data=st.data(),
)
def test_write_then_read_round_trip(tmp_path, dtype, shape, gz, data):
    arr = data.draw(arrays(dtype, shape))  # any values, NaN and inf included for floats
    path = tmp_path / ("r.gz" if gz else "r")
    write_idx(path, arr)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    assert out.tobytes() == np.ascontiguousarray(arr).tobytes()  # bit-exact, NaN payloads too
    if not gz:  # the writer follows the published layout byte for byte
        code = dict((np.dtype(d), c) for c, d in CODES)[np.dtype(dtype)]
        be = np.ascontiguousarray(arr).astype(np.dtype(dtype).newbyteorder(">"))
        assert path.read_bytes() == idx_bytes(code, shape, be.tobytes())


def test_write_is_reproducible_and_atomic(tmp_path):
    arr = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "a.gz", arr)
    first = (tmp_path / "a.gz").read_bytes()
    write_idx(tmp_path / "a.gz", arr)  # overwrite: same bytes (gzip mtime 0, no file name)
    assert (tmp_path / "a.gz").read_bytes() == first
    assert first[4:8] == b"\0\0\0\0" and not first[3] & 0x08  # MTIME 0, no FNAME flag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gz"]  # no temp file left


def test_write_failure_leaves_no_file(tmp_path):
    with pytest.raises(DataError, match="bool"):
        write_idx(tmp_path / "b.idx", np.zeros(3, dtype=bool))
    with pytest.raises(DataError, match="dimensions"):
        write_idx(tmp_path / "c.idx", np.float64(1.0))
    assert list(tmp_path.iterdir()) == []


def test_non_native_byte_order_is_written_correctly(tmp_path):
    arr = np.array([1, -2, 300], dtype=">i4")
    write_idx(tmp_path / "d", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "d"), [1, -2, 300])
    arr = np.array([1.5, -2.25], dtype="<f8")
    write_idx(tmp_path / "e", arr)
    assert (tmp_path / "e").read_bytes()[8:] == np.array([1.5, -2.25], ">f8").tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, gz):
    path, _, data = mnist_like(tmp_path, gz=gz)
    cut = data[:-1]
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DataError, match="truncated") as err:
        read_idx(path)
    msg = str(err.value)
    assert path.name in msg and "need 40 bytes" in msg and "found 39" in msg


def test_truncated_header(tmp_path):
    path = tmp_path / "h"
    for data in (b"", b"\0\0", b"\0\0\x08\x03\0\0\0\x02\0\0"):
        path.write_bytes(data)
        with pytest.raises(DataError, match="truncated") as err:
            read_idx(path)
        assert "h" in str(err.value)


@pytest.mark.parametrize("gz", [False, True])
def test_trailing_bytes(tmp_path, gz):
    path, _, data = mnist_like(tmp_path, gz=gz)
    longer = data + b"\0"
    path.write_bytes(gzip.compress(longer) if gz else longer)
    with pytest.raises(DataError, match="trailing bytes") as err:
        read_idx(path)
    assert path.name in str(err.value) and "found 41" in str(err.value)


def test_wrong_magic(tmp_path):
    path, _, data = mnist_like(tmp_path)
    path.write_bytes(b"\x01" + data[1:])
    with pytest.raises(DataError, match="magic") as err:
        read_idx(path)
    assert path.name in str(err.value) and "0x01 0x00" in str(err.value)


def test_bad_dtype_code(tmp_path):
    path, _, data = mnist_like(tmp_path)
    path.write_bytes(data[:2] + b"\x0a" + data[3:])
    with pytest.raises(DataError, match="dtype code 0x0A") as err:
        read_idx(path)
    assert path.name in str(err.value)


def test_zero_dimensions(tmp_path):
    path = tmp_path / "z"
    path.write_bytes(b"\0\0\x08\0")
    with pytest.raises(DataError, match="0 dimensions"):
        read_idx(path)


def test_corrupt_gzip(tmp_path):
    path, _, data = mnist_like(tmp_path, gz=True)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip one byte inside the deflate stream or CRC
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert path.name in str(err.value)
    # a cut gzip stream
    path.write_bytes(gzip.compress(data)[:-5])
    with pytest.raises(DataError, match="gzip") as err:
        read_idx(path)
    assert path.name in str(err.value)


def test_gzip_without_gz_name_and_gz_name_without_gzip(tmp_path):
    _, _, data = mnist_like(tmp_path)
    (tmp_path / "plain").write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="rename it to plain.gz"):
        read_idx(tmp_path / "plain")
    (tmp_path / "fake.gz").write_bytes(data)
    with pytest.raises(DataError, match="not gzip"):
        read_idx(tmp_path / "fake.gz")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope.gz")
    with pytest.raises(DataError, match="folder"):
        read_idx(tmp_path)


@settings(deadline=None, max_examples=150, suppress_health_check=TMP_OK)
@given(gz=st.booleans(), data=st.data())
def test_random_damage_gives_the_array_or_a_data_error(tmp_path, gz, data):
    """Flip, insert, delete or cut bytes at random: either a correct read or a DataError."""
    dims = (3, 2, 2)
    arr = np.arange(12, dtype=np.int16).reshape(dims) * 37 - 100
    good = idx_bytes(0x0B, dims, arr.astype(">i2").tobytes())
    blob = bytearray(gzip.compress(good, mtime=0) if gz else good)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            blob[pos:pos] = bytes([data.draw(st.integers(0, 255))])
        elif kind == "delete" and blob:
            del blob[pos]
        else:
            del blob[pos:]
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(bytes(blob))
    try:
        out = read_idx(path)
    except DataError as err:
        assert path.name in str(err)
        return
    # Accepted: then it must be exactly what the (possibly changed) bytes say.
    plain = gzip.decompress(bytes(blob)) if gz else bytes(blob)
    if plain == good:
        np.testing.assert_array_equal(out, arr)
    else:  # damage the layout cannot see (a payload byte, or a consistent header change)
        code, ndim = plain[2], plain[3]
        shape = struct.unpack(f">{ndim}I", plain[4:4 + 4 * ndim])
        dt = dict((c, np.dtype(d).newbyteorder(">")) for c, d in CODES)[code]
        expect = np.frombuffer(plain, dtype=dt, offset=4 + 4 * ndim).reshape(shape)
        assert out.shape == shape
        assert out.tobytes() == expect.astype(dt.newbyteorder("=")).tobytes()
