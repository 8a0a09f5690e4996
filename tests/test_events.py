"""Event file readers on tiny files the tests write in each real format, good and broken.

Files are assembled by hand from the published layouts (docs/events.md), not by refsnn's writers,
so a reader and writer that agree on a wrong layout would still fail here.
"""

import struct

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refsnn.cli_data import data
from refsnn.data.events import (
    CAMERA_DTYPE, camera_events, guess_format, nmnist_tree, read_aedat31, read_cifar10_dvs,
    read_dvs_gesture, read_gesture_labels, read_nmnist, read_shd, write_aedat31,
    write_cifar10_dvs, write_nmnist, write_shd, audio_events,
)
from refsnn.errors import DataError

TMP_OK = [HealthCheck.function_scoped_fixture]


# ---- hand-made files ---------------------------------------------------------------------------

def nmnist_record(x, y, p, t):
    """One 5-byte N-MNIST event: x, y, then p in bit 39-32.. as the dataset page lays it out."""
    word = (x << 32) | (y << 24) | (p << 23) | t          # the 40-bit word, most significant first
    return word.to_bytes(5, "big")


EVENTS = [(0, 0, 0, 0), (33, 5, 1, 654), (7, 33, 0, 2**16 + 3), (12, 20, 1, 2**23 - 1)]


def aedat31_header(version=b"#!AER-DAT3.1", end=True):
    lines = [version, b"#Format: RAW", b"#Source 1: DVS128",
             b"#Start-Time: 2017-01-01 10:00:00 (TZ+0100)"] + ([b"#!END-HEADER"] if end else [])
    return b"".join(ln + b"\r\n" for ln in lines)


def packet(etype, events, overflow=0, capacity=None, size=8, ts_offset=4):
    """A 28-byte AEDAT 3.1 packet header + events (each (data, ts)) + empty capacity slots."""
    cap = len(events) if capacity is None else capacity
    head = struct.pack("<hhiiiiii", etype, 1, size, ts_offset, overflow, cap, len(events),
                       len(events))
    body = b"".join(struct.pack("<Ii", d, ts).ljust(size, b"\0") for d, ts in events)
    return head + body + b"\xAB" * (size * (cap - len(events)))


def polarity_data(x, y, p, valid=1):
    return (x << 17) | (y << 2) | (p << 1) | valid


def aedat31_file():
    """Two polarity packets (the second with overflow 1 and spare capacity), a special packet."""
    p1 = packet(1, [(polarity_data(3, 4, 1), 10), (polarity_data(127, 0, 0), 20),
                    (polarity_data(5, 5, 1, valid=0), 25)])
    special = packet(0, [(0xFFFFFFFF, 30)])
    p2 = packet(1, [(polarity_data(0, 127, 1), 5)], overflow=1, capacity=3)
    return aedat31_header() + p1 + special + p2


def aedat2_file(records, header=b"#!AER-DAT2.0\r\n# created by hand\r\n"):
    return header + b"".join(struct.pack(">II", a, t) for a, t in records)


def dvs128_address(rx, ry, bit0, special=0):
    return (special << 15) | (ry << 8) | (rx << 1) | bit0


def shd_file(path, times, units, labels, times_dtype="f2"):
    with h5py.File(path, "w") as f:
        dt = f.create_dataset("spikes/times", (len(times),), dtype=h5py.vlen_dtype(times_dtype))
        du = f.create_dataset("spikes/units", (len(units),), dtype=h5py.vlen_dtype("u2"))
        for i, (t, u) in enumerate(zip(times, units)):
            dt[i], du[i] = np.asarray(t, times_dtype), np.asarray(u, "u2")
        f.create_dataset("labels", data=np.asarray(labels, "u2"))
        f.create_dataset("extra/keys", data=np.array([b"zero", b"one"]))


def corrupt(raw: bytes, edits, cut):
    b = bytearray(raw)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b[: max(0, len(b) - cut)])


edits_st = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)


def valid_or_data_error(fn, path):
    try:
        out = fn(path)
    except DataError as err:
        assert str(path) in str(err)
        return None
    return out


# ---- N-MNIST -------------------------------------------------------------------------------------

def test_nmnist_reads_the_published_layout(tmp_path):
    f = tmp_path / "00001.bin"
    f.write_bytes(b"".join(nmnist_record(*e) for e in EVENTS))
    ev = read_nmnist(f)
    assert ev.dtype == CAMERA_DTYPE and len(ev) == 4
    for name, col in zip(("x", "y", "p", "t"), zip(*EVENTS)):
        np.testing.assert_array_equal(ev[name], col)


def test_nmnist_round_trip_and_empty_file(tmp_path):
    rng = np.random.default_rng(1)
    n = 500
    ev = camera_events(rng.integers(0, 34, n), rng.integers(0, 34, n), rng.integers(0, 2, n),
                       np.sort(rng.integers(0, 2**23, n)))
    write_nmnist(tmp_path / "a.bin", ev)
    assert (tmp_path / "a.bin").stat().st_size == 5 * n
    np.testing.assert_array_equal(read_nmnist(tmp_path / "a.bin"), ev)
    (tmp_path / "e.bin").write_bytes(b"")
    assert len(read_nmnist(tmp_path / "e.bin")) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("raw, words", [
    (b"".join(nmnist_record(*e) for e in EVENTS)[:-2], ["18 bytes", "multiple of 5"]),
    (nmnist_record(34, 0, 0, 5), ["x=34", "outside the 34x34"]),
    (nmnist_record(3, 240, 0, 5), ["y=240", "outside"]),
])
def test_nmnist_broken_files(tmp_path, raw, words):
    f = tmp_path / "bad.bin"
    f.write_bytes(raw)
    with pytest.raises(DataError) as err:
        read_nmnist(f)
    assert str(f) in str(err.value) and all(w in str(err.value) for w in words)


def test_nmnist_missing_file_and_writer_range(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_nmnist(tmp_path / "nope.bin")
    ev = camera_events([1], [1], [0], [2**23])
    with pytest.raises(DataError, match="t spans"):
        write_nmnist(tmp_path / "x.bin", ev)
    assert not (tmp_path / "x.bin").exists()


def test_nmnist_tree_labels_from_folders_in_id_order(tmp_path):
    for split, d, i in [("Train", 3, 2), ("Train", 1, 15), ("Train", 1, 1), ("Test", 7, 4)]:
        (tmp_path / split / str(d)).mkdir(parents=True, exist_ok=True)
        (tmp_path / split / str(d) / f"{i:05d}.bin").write_bytes(nmnist_record(d, i, 1, i))
    tr = nmnist_tree(tmp_path, "train")
    assert [(f.name, lab) for f, lab in tr] == [("00001.bin", 1), ("00002.bin", 3),
                                                ("00015.bin", 1)]
    assert [lab for _, lab in nmnist_tree(tmp_path, "test")] == [7]
    with pytest.raises(DataError, match="does not exist"):
        nmnist_tree(tmp_path / "none", "train")


@settings(deadline=None, max_examples=40, suppress_health_check=TMP_OK)
@given(edits=edits_st, cut=st.integers(0, 12))
def test_nmnist_random_corruption_is_valid_or_data_error(tmp_path, edits, cut):
    f = tmp_path / "c.bin"
    f.write_bytes(corrupt(b"".join(nmnist_record(*e) for e in EVENTS), edits, cut))
    ev = valid_or_data_error(read_nmnist, f)
    if ev is not None:
        assert len(ev) * 5 == f.stat().st_size
        assert ev["x"].max(initial=0) < 34 and ev["y"].max(initial=0) < 34


# ---- AEDAT 3.1 and DVS Gesture labels -----------------------------------------------------------

def test_aedat31_packets_validity_overflow_and_skipped_packets(tmp_path):
    f = tmp_path / "user01_led.aedat"
    f.write_bytes(aedat31_file())
    ev = read_aedat31(f)
    # packet 1: two valid events (the third has valid bit 0); special packet skipped;
    # packet 2: eventNumber 1 of capacity 3, timestamp (1 << 31) | 5
    assert ev["x"].tolist() == [3, 127, 0]
    assert ev["y"].tolist() == [4, 0, 127]
    assert ev["p"].tolist() == [1, 0, 1]
    assert ev["t"].tolist() == [10, 20, 2**31 + 5]


def test_aedat31_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    t = np.sort(rng.integers(0, 2**32, n))
    ev = camera_events(rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), t)
    write_aedat31(tmp_path / "a.aedat", ev, packet_size=64)
    np.testing.assert_array_equal(read_aedat31(tmp_path / "a.aedat"), ev)


@pytest.mark.parametrize("mutate, words", [
    (lambda raw: raw.replace(b"#!END-HEADER\r\n", b""), ["#!END-HEADER"]),
    (lambda raw: raw.replace(b"#!AER-DAT3.1", b"#!AER-DAT2.0"), ["first line", "AEDAT 2.0"]),
    (lambda raw: raw.replace(b"#!AER-DAT3.1", b"#!AER-DAT4.0"), ["not supported"]),
    (lambda raw: raw[:len(aedat31_header()) + 20], ["packet 0", "truncated"]),
    (lambda raw: raw[:-4], ["packet 2", "truncated"]),
    (lambda raw: raw + packet(1, [(polarity_data(200, 3, 1), 9)]),
     ["x=200", "outside the 128x128"]),
    (lambda raw: raw + packet(1, [(polarity_data(2, 3, 1), 9)], size=12), ["eventSize 12"]),
    (lambda raw: raw + packet(1, [(polarity_data(2, 3, 1), -9)]), ["negative timestamp"]),
    (lambda raw: raw[:len(aedat31_header())] + struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 1, 2, 2)
     + b"\0" * 8, ["eventNumber 2"]),
])
def test_aedat31_broken_files(tmp_path, mutate, words):
    f = tmp_path / "bad.aedat"
    f.write_bytes(mutate(aedat31_file()))
    with pytest.raises(DataError) as err:
        read_aedat31(f)
    assert str(f) in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


@settings(deadline=None, max_examples=40, suppress_health_check=TMP_OK)
@given(edits=edits_st, cut=st.integers(0, 40))
def test_aedat31_random_corruption_is_valid_or_data_error(tmp_path, edits, cut):
    f = tmp_path / "c.aedat"
    f.write_bytes(corrupt(aedat31_file(), edits, cut))
    ev = valid_or_data_error(read_aedat31, f)
    if ev is not None:
        assert ev["x"].max(initial=0) < 128 and ev["y"].max(initial=0) < 128
        assert ev["t"].min(initial=0) >= 0


LABELS_CSV = ("class,startTime_usec,endTime_usec\r\n"
              "8,10,25\r\n8,20,40\r\n1,2147483650,2147483700\r\n")


def test_gesture_labels_keep_repeats_and_overlaps_and_split_the_trial(tmp_path):
    (tmp_path / "user01_led.aedat").write_bytes(aedat31_file())
    (tmp_path / "user01_led_labels.csv").write_text(LABELS_CSV)
    rows = read_gesture_labels(tmp_path / "user01_led_labels.csv")
    assert rows["label"].tolist() == [7, 7, 0]
    assert rows["start"].tolist() == [10, 20, 2147483650]
    samples = read_dvs_gesture(tmp_path / "user01_led.aedat")
    # events at t = 10, 20, 2**31 + 5; windows [10, 25), [20, 40), [2**31 + 2, 2**31 + 52)
    assert [len(ev) for ev, _ in samples] == [2, 1, 1]
    assert [lab for _, lab in samples] == [7, 7, 0]
    assert samples[0][0]["t"].tolist() == [0, 10]           # relative to the window start
    assert samples[2][0]["t"].tolist() == [3]


@pytest.mark.parametrize("text, words", [
    ("cls,start,end\n1,2,3\n", ["first line"]),
    ("class,startTime_usec,endTime_usec\n12,2,3\n", ["class 12"]),
    ("class,startTime_usec,endTime_usec\n1,5,5\n", ["start 5 and end 5"]),
    ("class,startTime_usec,endTime_usec\n1,a,5\n", ["not three integers"]),
])
def test_gesture_labels_broken(tmp_path, text, words):
    f = tmp_path / "x_labels.csv"
    f.write_text(text)
    with pytest.raises(DataError) as err:
        read_gesture_labels(f)
    assert str(f) in str(err.value) and all(w in str(err.value) for w in words)


# ---- AEDAT 2.0 (CIFAR10-DVS) ------------------------------------------------------------------

RECORDS = [(dvs128_address(0, 5, 0), 100), (dvs128_address(127, 0, 1), 200),
           (dvs128_address(3, 3, 0, special=1), 250), (dvs128_address(10, 127, 1), 300)]


def test_cifar10_dvs_both_mappings_and_special_events(tmp_path):
    f = tmp_path / "cifar10_cat_0.aedat"
    f.write_bytes(aedat2_file(RECORDS))
    raw = read_cifar10_dvs(f, mapping="raw")
    assert raw["x"].tolist() == [0, 127, 10] and raw["y"].tolist() == [5, 0, 127]
    assert raw["p"].tolist() == [0, 1, 1] and raw["t"].tolist() == [100, 200, 300]
    jaer = read_cifar10_dvs(f)                    # x = 127 - raw_x, y = raw_y, p = 1 - bit0
    assert jaer["x"].tolist() == [127, 0, 117] and jaer["y"].tolist() == [5, 0, 127]
    assert jaer["p"].tolist() == [1, 0, 0]
    write_cifar10_dvs(tmp_path / "w.aedat", jaer)
    np.testing.assert_array_equal(read_cifar10_dvs(tmp_path / "w.aedat"), jaer)


@pytest.mark.parametrize("raw, words", [
    (aedat2_file(RECORDS)[:-4], ["not a whole number of 8-byte"]),
    (aedat2_file(RECORDS, header=b"#!AER-DAT3.1\r\n"), ["first line", "read_aedat31"]),
    (aedat2_file([(1 << 20, 5)]), ["bits 16..31"]),
    (b"#!AER-DAT2.0\r\n#unterminated", ["not terminated"]),
])
def test_cifar10_dvs_broken_files(tmp_path, raw, words):
    f = tmp_path / "bad.aedat"
    f.write_bytes(raw)
    with pytest.raises(DataError) as err:
        read_cifar10_dvs(f)
    assert str(f) in str(err.value) and all(w in str(err.value) for w in words)


@settings(deadline=None, max_examples=40, suppress_health_check=TMP_OK)
@given(edits=edits_st, cut=st.integers(0, 20))
def test_cifar10_dvs_random_corruption_is_valid_or_data_error(tmp_path, edits, cut):
    f = tmp_path / "c.aedat"
    f.write_bytes(corrupt(aedat2_file(RECORDS), edits, cut))
    ev = valid_or_data_error(read_cifar10_dvs, f)
    if ev is not None:
        assert ev["x"].max(initial=0) < 128 and ev["y"].max(initial=0) < 128


# ---- SHD -----------------------------------------------------------------------------------------

def test_shd_reads_vlen_half_precision_file(tmp_path):
    f = tmp_path / "shd_test.h5"
    shd_file(f, [[0.5, 0.001, 1.25], []], [[0, 699, 3], []], [1, 0])
    samples, labels = read_shd(f)
    assert labels.tolist() == [1, 0] and labels.dtype == np.int64
    assert samples[0]["unit"].tolist() == [0, 699, 3]
    # float16 holds 0.5, 1.25 exactly and 0.001 as 0.0010004...: microseconds rounded
    assert samples[0]["t"].tolist() == [500000, round(float(np.float16(0.001)) * 1e6), 1250000]
    assert len(samples[1]) == 0
    write_shd(tmp_path / "w.h5", samples, labels)
    s2, l2 = read_shd(tmp_path / "w.h5")
    assert l2.tolist() == [1, 0] and s2[0].tolist() == samples[0].tolist()


@pytest.mark.parametrize("times, units, labels, words", [
    ([[0.1]], [[700]], [0], ["unit 700", "0..699"]),
    ([[0.1, 0.2]], [[1]], [0], ["2 times but 1 units"]),
    ([[0.1], [0.2]], [[1], [2]], [0], ["the counts must be equal"]),
    ([[-0.1]], [[1]], [0], ["outside 0"]),
])
def test_shd_broken_contents(tmp_path, times, units, labels, words):
    f = tmp_path / "bad.h5"
    shd_file(f, times, units, labels)
    with pytest.raises(DataError) as err:
        read_shd(f)
    assert str(f) in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_shd_missing_dataset_and_not_hdf5(tmp_path):
    f = tmp_path / "nolabels.h5"
    with h5py.File(f, "w") as h:
        h.create_dataset("spikes/times", data=np.zeros(1))
    with pytest.raises(DataError, match="'spikes/units'"):
        read_shd(f)
    h = tmp_path / "scalar.h5"
    with h5py.File(h, "w") as f5:
        for key in ("spikes/times", "spikes/units", "labels"):
            f5.create_dataset(key, data=1)
    with pytest.raises(DataError, match="found scalars"):
        read_shd(h)
    g = tmp_path / "text.h5"
    g.write_text("hello")
    with pytest.raises(DataError, match="not a readable HDF5"):
        read_shd(g)


@settings(deadline=None, max_examples=25, suppress_health_check=TMP_OK)
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                      max_size=4), cut=st.sampled_from([0, 0, 1, 100, 1000]))
def test_shd_random_corruption_is_valid_or_data_error(tmp_path, edits, cut):
    good = tmp_path / "good.h5"
    if not good.exists():
        shd_file(good, [[0.5, 0.25], [0.125]], [[1, 2], [3]], [0, 1])
    f = tmp_path / "c.h5"
    f.write_bytes(corrupt(good.read_bytes(), edits, cut))
    out = valid_or_data_error(read_shd, f)
    if out is not None:
        samples, labels = out
        assert len(samples) == len(labels)
        assert all(s["unit"].max(initial=0) < 700 for s in samples)


# ---- format guess and `refsnn data inspect` ----------------------------------------------------

def test_guess_format(tmp_path):
    files = {"a.bin": nmnist_record(1, 2, 0, 3), "b.aedat": aedat31_file(),
             "c.aedat": aedat2_file(RECORDS)}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    shd_file(tmp_path / "d.h5", [[0.1]], [[1]], [0])
    assert [guess_format(tmp_path / n) for n in ("a.bin", "b.aedat", "c.aedat", "d.h5")] == \
        ["nmnist", "aedat", "cifar10-dvs", "shd"]
    (tmp_path / "e.dat").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="--format"):
        guess_format(tmp_path / "e.dat")


def test_inspect_good_files(tmp_path):
    d = tmp_path / "Train" / "4"
    d.mkdir(parents=True)
    (d / "00009.bin").write_bytes(b"".join(nmnist_record(*e) for e in EVENTS))
    res = CliRunner().invoke(data, ["inspect", str(d / "00009.bin")])
    assert res.exit_code == 0, res.output
    assert res.output.count("\n") == 1
    line = res.output.strip()
    assert "nmnist, 4 events, sensor 34x34, t 0..8388607 us" in line and "label 4" in line
    (tmp_path / "u_labels.csv").write_text(LABELS_CSV)
    (tmp_path / "u.aedat").write_bytes(aedat31_file())
    res = CliRunner().invoke(data, ["inspect", str(tmp_path / "u.aedat")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 0 and len(lines) == 3
    assert "aedat, 2 events" in lines[0] and "label 7 (arm roll)" in lines[0]
    shd_file(tmp_path / "s.h5", [[0.5, 0.25], []], [[1, 2], []], [3, 1])
    res = CliRunner().invoke(data, ["inspect", str(tmp_path / "s.h5"), "--format", "shd"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 0 and len(lines) == 2
    assert "shd, 2 spikes, 700 units, t 250000..500000 us" in lines[0] and "label 3" in lines[0]
    assert "0 spikes" in lines[1] and "label 1" in lines[1]


@pytest.mark.parametrize("name, raw, fmt", [
    ("bad.bin", b"\x01\x02\x03", None),
    ("bad.aedat", aedat31_header(end=False), None),
    ("good.bin", b"".join(nmnist_record(*e) for e in EVENTS), "aedat"),
])
def test_inspect_broken_file_exits_2_with_one_error_line(tmp_path, name, raw, fmt):
    f = tmp_path / name
    f.write_bytes(raw)
    args = ["inspect", str(f)] + (["--format", fmt] if fmt else [])
    res = CliRunner().invoke(data, args)
    assert res.exit_code == 2
    out = res.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("Error: ") and str(f) in out[0]
    assert "Traceback" not in res.output


def test_audio_events_and_camera_events_check_their_inputs():
    assert audio_events([1, 2], [3, 4])["unit"].tolist() == [1, 2]
    with pytest.raises(DataError):
        audio_events([1], [3, 4])
    with pytest.raises(DataError):
        camera_events([1], [1], [2], [0])


# ---- whole sets from tiny folders in the real layouts ------------------------------------------

def test_real_event_sets_load_from_tiny_folders(tmp_path, monkeypatch):
    from refsnn.data import load_dataset

    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    g = tmp_path / "DvsGesture"
    g.mkdir()
    for trial in ("user01_led", "user24_lab"):
        (g / f"{trial}.aedat").write_bytes(aedat31_file())
        (g / f"{trial}_labels.csv").write_text(LABELS_CSV)
    ds = load_dataset("dvs-gesture", data_dir=tmp_path)
    assert (ds.n_train, ds.n_test, ds.n_classes, ds.shape) == (3, 3, 11, (2, 32, 32))
    x = ds.frames("train", [0, 2], T=4)
    assert x.shape == (4, 2, 2, 32, 32) and x[:, 0].sum() == 2 and x[:, 1].sum() == 1

    c = tmp_path / "cifar"
    for name in ("airplane", "truck"):
        (c / name).mkdir(parents=True)
        for i in range(10):
            (c / name / f"cifar10_{name}_{i}.aedat").write_bytes(aedat2_file(RECORDS))
    ds = load_dataset("cifar10-dvs", data_dir=c)
    assert (ds.n_train, ds.n_test) == (18, 2) and ds.test_y.tolist() == [0, 9]
    assert ds.frames("test", None, T=3).shape == (3, 2, 2, 32, 32)

    s = tmp_path / "shd"
    s.mkdir()
    shd_file(s / "shd_train.h5", [[0.5, 0.25], [0.1]], [[1, 2], [3]], [0, 19])
    shd_file(s / "shd_test.h5", [[0.5]], [[699]], [4])
    ds = load_dataset("shd", data_dir=tmp_path)
    assert (ds.n_train, ds.n_test, ds.n_classes, ds.shape) == (2, 1, 20, (700,))
    x = ds.frames("test", [0], T=7)                      # 1.4 s in 7 bins of 200 ms
    assert x.shape == (7, 1, 700) and x[2, 0, 699] == 1 and x.sum() == 1
