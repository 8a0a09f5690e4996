"""CIFAR-10/100 binary reader on tiny files the tests write in the published layout."""

import io
import os
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refsnn.cli import main
from refsnn.data import list_datasets, load_dataset
from refsnn.data.cifar import read_cifar_bytes, read_cifar_file
from refsnn.errors import DataError

TMP_OK = [HealthCheck.function_scoped_fixture]
C10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]


def records(labels, images, coarse=None):
    """Records assembled by hand: [coarse byte] label byte, then R (1024), G (1024), B (1024)."""
    out = b""
    for i, (lab, img) in enumerate(zip(labels, images)):
        head = bytes([lab]) if coarse is None else bytes([coarse[i], lab])
        r, g, b = img[..., 0], img[..., 1], img[..., 2]       # img is (32, 32, 3), H W C
        out += head + r.tobytes() + g.tobytes() + b.tobytes()
    return out


def images_hwc(rng, n):
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_cifar10(folder, rng, per_batch=(2, 3, 1, 2, 2), n_test=3):
    """A fake cifar-10-batches-bin folder; returns (train imgs HWC, train labels, test ..)."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name, n in zip(C10_TRAIN, per_batch):
        x, y = images_hwc(rng, n), rng.integers(0, 10, n)
        (folder / name).write_bytes(records(y, x))
        xs.append(x)
        ys.append(y)
    tx, ty = images_hwc(rng, n_test), rng.integers(0, 10, n_test)
    (folder / "test_batch.bin").write_bytes(records(ty, tx))
    return np.concatenate(xs), np.concatenate(ys), tx, ty


def write_cifar100(folder, rng, n_train=4, n_test=2):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        x, fine, coarse = images_hwc(rng, n), rng.integers(0, 100, n), rng.integers(0, 20, n)
        (folder / name).write_bytes(records(fine, x, coarse))
        out += [x, fine]
    return out


def as_chw(x_hwc):
    return np.transpose(x_hwc, (0, 3, 1, 2))


def test_cifar10_folder_reads_in_batch_order_channel_major(tmp_path):
    rng = np.random.default_rng(0)
    trx, try_, tex, tey = write_cifar10(tmp_path / "cifar-10-batches-bin", rng)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.name == "cifar10" and ds.n_classes == 10 and ds.shape == (3, 32, 32)
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_x, as_chw(trx))
    np.testing.assert_array_equal(ds.train_y, try_)
    np.testing.assert_array_equal(ds.test_x, as_chw(tex))
    np.testing.assert_array_equal(ds.test_y, tey)
    # byte 1 of a record is the red pixel (0, 0), byte 1 + 1024 the green one (channel-major)
    raw = (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()
    assert ds.train_x[0, 0, 0, 0] == raw[1] and ds.train_x[0, 1, 0, 0] == raw[1 + 1024]
    assert ds.train_x[0, 2, 31, 31] == raw[3072]
    x = ds.x01("train", np.arange(2))
    assert x.shape == (2, 3, 32, 32) and x.max() <= 1.0


def test_cifar100_uses_the_fine_label(tmp_path):
    rng = np.random.default_rng(1)
    trx, trf, tex, tef = write_cifar100(tmp_path / "cifar100", rng)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.n_classes == 100
    np.testing.assert_array_equal(ds.train_y, trf)
    np.testing.assert_array_equal(ds.test_y, tef)
    np.testing.assert_array_equal(ds.train_x, as_chw(trx))


def tar_gz(members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_release_archive_is_read_without_unpacking(tmp_path, name):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    (write_cifar10 if name == "cifar10" else write_cifar100)(src, rng)
    inner = "cifar-10-batches-bin" if name == "cifar10" else "cifar-100-binary"
    archive = "cifar-10-binary.tar.gz" if name == "cifar10" else "cifar-100-binary.tar.gz"
    blob = tar_gz({f"{inner}/{p.name}": p.read_bytes() for p in sorted(src.iterdir())}
                  | {f"{inner}/readme.html": b"<html/>"})
    (tmp_path / "dl" / name).mkdir(parents=True)
    (tmp_path / "dl" / name / archive).write_bytes(blob)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    a = load_dataset(name, data_dir=tmp_path / "dl")
    b = load_dataset(str(src))
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    # a cut archive and an archive lacking a member
    path = tmp_path / "dl" / name / archive
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_dataset(name, data_dir=tmp_path / "dl")
    assert archive in str(err.value)
    first = sorted(src.iterdir())[0].name
    path.write_bytes(tar_gz({f"{inner}/{p.name}": p.read_bytes() for p in sorted(src.iterdir())
                             if p.name != first}))
    with pytest.raises(DataError, match=f"lacks {first}"):
        load_dataset(name, data_dir=tmp_path / "dl")


def test_lookup_order_env_and_cwd(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "data" / "cifar10" / "cifar-10-batches-bin", rng)
    assert load_dataset("cifar10").n_train == 10
    env = tmp_path / "env"
    write_cifar10(env / "cifar10", rng, per_batch=(1, 1, 1, 1, 1))
    monkeypatch.setenv("REFSNN_DATA", str(env))
    assert load_dataset("cifar10").n_train == 5                       # $REFSNN_DATA before ./data
    rows = {r.name: r for r in list_datasets()}
    assert rows["cifar10"].found and rows["cifar10"].location == str(env / "cifar10")
    assert not rows["cifar100"].found and "cifar-100-binary.tar.gz" in rows["cifar100"].how_to_get


def test_not_found_names_the_folders_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=tmp_path / "mine")
    msg = str(err.value)
    assert str(tmp_path / "mine") in msg and str(tmp_path / "mine" / "cifar10") in msg
    assert "./data/cifar10" in msg and "$REFSNN_DATA not set" in msg
    assert "cifar-10-binary.tar.gz" in msg and "--data-dir" in msg and "data_batch_1.bin" in msg


def test_the_python_release_is_refused_with_what_to_get_instead(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    py = tmp_path / "root" / "cifar-10-batches-py"                   # torchvision's folder
    py.mkdir(parents=True)
    for f in ("data_batch_1", "test_batch", "batches.meta"):
        (py / f).write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=tmp_path / "root")
    msg = str(err.value)
    assert "pickle" in msg and "runs code" in msg and "cifar-10-binary.tar.gz" in msg
    with pytest.raises(DataError, match="unpickl"):
        load_dataset(str(py))
    (tmp_path / "c100").mkdir()
    (tmp_path / "c100" / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="cifar-100-binary.tar.gz"):
        load_dataset("cifar100", data_dir=tmp_path / "c100")
    # a pickle renamed to a binary batch name
    (tmp_path / "p.bin").write_bytes(b"\x80\x02" + bytes(3071 * 2))
    with pytest.raises(DataError, match="pickle"):
        read_cifar_file(tmp_path / "p.bin")


def test_missing_batch_is_named(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "cifar10"
    write_cifar10(folder, rng)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "lacks data_batch_3.bin" in str(err.value) and str(folder) in str(err.value)
    with pytest.raises(DataError, match="lacks data_batch_3.bin"):
        load_dataset(str(folder))


def test_truncated_wrong_size_empty_and_label_out_of_range(tmp_path):
    rng = np.random.default_rng(5)
    good = records([1, 2, 3], images_hwc(rng, 3))
    p = tmp_path / "data_batch_1.bin"
    p.write_bytes(good[:-1])
    with pytest.raises(DataError, match="truncated") as err:
        read_cifar_file(p)
    msg = str(err.value)
    assert p.name in msg and "3073-byte records" in msg and "2 full record(s) and 3072" in msg
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_cifar_file(p)
    c100 = records([5, 99], images_hwc(rng, 2), coarse=[1, 19])
    p.write_bytes(c100)                                      # a CIFAR-100 file read as CIFAR-10
    with pytest.raises(DataError, match="is it a cifar100 file"):
        read_cifar_file(p, "cifar10")
    x, y = read_cifar_file(p, "cifar100")
    assert list(y) == [5, 99]
    bad = bytearray(good)
    bad[3073] = 10                                           # record 1's label
    p.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="record 1 .byte offset 3073. has label 10; cifar10 "
                                        "labels are 0..9"):
        read_cifar_file(p)
    bad = bytearray(c100)
    bad[0] = 20                                              # coarse label out of range
    p.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="coarse label 20"):
        read_cifar_file(p, "cifar100")
    bad[0], bad[3074 + 1] = 1, 100                           # fine label of record 1
    p.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="record 1 .byte offset 3075. has fine label 100"):
        read_cifar_file(p, "cifar100")
    with pytest.raises(DataError, match="does not exist"):
        read_cifar_file(tmp_path / "nope.bin")


@settings(deadline=None, max_examples=120, suppress_health_check=TMP_OK)
@given(name=st.sampled_from(["cifar10", "cifar100"]), data=st.data())
def test_random_damage_gives_the_records_or_a_data_error(tmp_path, name, data):
    """Flip, insert, delete or cut bytes: what the bytes say, or a DataError naming the file."""
    rng = np.random.default_rng(6)
    lb = 1 if name == "cifar10" else 2
    labels = [3, 0, 7]
    good = records(labels, images_hwc(rng, 3), coarse=None if lb == 1 else [2, 0, 19])
    blob = bytearray(good)
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
    path = tmp_path / "damaged.bin"
    path.write_bytes(bytes(blob))
    try:
        x, y = read_cifar_file(path, name)
    except DataError as err:
        assert path.name in str(err)
        return
    rec = lb + 3072                          # accepted: exactly what the (changed) bytes say
    assert len(blob) % rec == 0 and len(blob) > 0
    rows = np.frombuffer(bytes(blob), np.uint8).reshape(-1, rec)
    assert (rows[:, lb - 1] < (10 if lb == 1 else 100)).all()
    np.testing.assert_array_equal(y, rows[:, lb - 1])
    np.testing.assert_array_equal(x.reshape(len(rows), -1), rows[:, lb:])


def test_read_cifar_bytes_matches_file_reader(tmp_path):
    rng = np.random.default_rng(7)
    blob = records([9, 4], images_hwc(rng, 2))
    (tmp_path / "t.bin").write_bytes(blob)
    x1, y1 = read_cifar_bytes(blob)
    x2, y2 = read_cifar_file(tmp_path / "t.bin")
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and x1.flags.writeable


def test_cli_datasets_lists_cifar_with_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["datasets"])
    assert res.exit_code == 0, res.output
    assert "cifar10 " in res.output and "cifar100" in res.output
    assert "cifar-10-binary.tar.gz" in res.output and "./data/cifar10/" in res.output
    write_cifar10(tmp_path / "x" / "cifar10", np.random.default_rng(8))
    res = CliRunner().invoke(main, ["datasets", "--data-dir", str(tmp_path / "x")])
    assert res.exit_code == 0 and str(tmp_path / "x" / "cifar10") in res.output
    assert os.sep.join(["x", "cifar10"]) in res.output
