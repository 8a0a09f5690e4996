"""refsnn.checkpoint: round trip, atomic write, and clear errors for damaged or foreign files."""

import functools
import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from refsnn import checkpoint
from refsnn.checkpoint import (FORMAT_VERSION, load_checkpoint, load_into,
                               network_from_checkpoint, save_checkpoint)
from refsnn.config import TrainConfig
from refsnn.errors import CheckpointError
from refsnn.network import Network
from refsnn.optim import make_optimizer

CFG = TrainConfig(arch="12-7-3", T=4, optimizer="adam", params={"v_th": 0.4})


def small_run(seed=0, dtype=np.float64, steps=2):
    """A tiny STBP network after a few Adam steps, with its optimizer and generator."""
    rng = np.random.default_rng(seed)
    net = Network.build(CFG.arch, "stbp", CFG.params, rng=rng, dtype=dtype)
    opt = make_optimizer(CFG, net.params())
    for _ in range(steps):
        x = (rng.random((4, 3, 12)) < 0.5).astype(dtype)
        _, grads, _ = net.loss_and_grads(x, net.make_target(rng.integers(0, 3, 3), 4))
        opt.step(net.params(), grads, 1e-2)
    return net, opt, rng


def test_round_trip_restores_every_array_and_the_run_state(tmp_path):
    net, opt, rng = small_run()
    hist = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.625}]
    path = save_checkpoint(tmp_path / "c.h5", net, CFG, optimizer=opt, rng=rng, epoch=2,
                           history=hist, best=hist[1], last=hist[1], elapsed_s=12.5)
    ck = load_checkpoint(path)
    assert (ck.method, ck.arch, ck.dtype, ck.epoch) == ("stbp", "12-7-3", "float64", 2)
    assert ck.history == hist and ck.best == hist[1] and ck.elapsed_s == 12.5
    assert set(ck.params) == set(net.p.as_dict()) and ck.params["v_th"] == 0.4
    assert TrainConfig.from_dict(ck.config).lr == CFG.lr
    net2 = network_from_checkpoint(ck)
    for a, b in zip(net.params(), net2.params()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    opt2 = make_optimizer(CFG, net2.params())
    opt2.load_state_dict(ck.optimizer)
    assert opt2.k == opt.k == 2
    for name in ("m", "v"):
        for a, b in zip(opt.buffers[name], opt2.buffers[name]):
            assert np.array_equal(a, b)
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = ck.rng_state
    assert np.array_equal(rng.random(5), rng2.random(5))


def test_float32_network_keeps_its_dtype(tmp_path):
    net, opt, rng = small_run(dtype=np.float32)
    save_checkpoint(tmp_path / "c.h5", net, CFG, optimizer=opt, rng=rng, epoch=1)
    net2 = network_from_checkpoint(load_checkpoint(tmp_path / "c.h5"))
    assert net2.dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in zip(net.params(), net2.params()))


def test_schema_attributes_are_readable_with_plain_h5py(tmp_path):
    net, opt, rng = small_run()
    save_checkpoint(tmp_path / "c.h5", net, CFG, optimizer=opt, rng=rng, epoch=1)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["format"] == "refsnn-checkpoint"
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert json.loads(f.attrs["config"])["arch"] == "12-7-3"
        assert f["params"].attrs["v_th"] == 0.4
        assert np.array_equal(f["layers/0/W"][()], net.layers[0].params[0])
        assert f["optimizer"].attrs["k"] == 2 and "m" in f["optimizer"]


def test_a_failure_during_the_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    net, opt, rng = small_run()
    path = tmp_path / "checkpoint.h5"
    save_checkpoint(path, net, CFG, optimizer=opt, rng=rng, epoch=1)
    before = path.read_bytes()
    calls = {"n": 0}
    real = h5py.Group.create_dataset

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:                                  # mid-write: some arrays written
            raise OSError("No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    for a in net.params():
        a += 1.0
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, net, CFG, optimizer=opt, rng=rng, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).epoch == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5"]  # no temp file left behind


def test_missing_truncated_and_foreign_files_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.h5")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)
    net, opt, rng = small_run()
    good = save_checkpoint(tmp_path / "c.h5", net, CFG, optimizer=opt, rng=rng, epoch=1)
    data = good.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.h5 is damaged"):
        load_checkpoint(tmp_path / "trunc.h5")
    (tmp_path / "text.h5").write_text("not hdf5 at all\n")
    with pytest.raises(CheckpointError, match="not a refsnn checkpoint"):
        load_checkpoint(tmp_path / "text.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(CheckpointError, match="not a refsnn checkpoint"):
        load_checkpoint(tmp_path / "foreign.h5")


def test_newer_version_damage_and_missing_arrays_are_named(tmp_path):
    net, opt, rng = small_run()
    p = save_checkpoint(tmp_path / "c.h5", net, CFG, optimizer=opt, rng=rng, epoch=1)
    raw = p.read_bytes()
    assert raw.startswith(b"refsnn-checkpoint\nformat_version 1\nsha256 ")
    p.write_bytes(raw.replace(b"format_version 1", b"format_version 9", 1))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(p)
    # an edit behind the header's back (here: an attribute changed with h5py) is refused
    p = save_checkpoint(tmp_path / "d.h5", net, CFG, optimizer=opt, rng=rng, epoch=1)
    with h5py.File(p, "a") as f:
        f.attrs["epoch"] = 5
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(p)
    # a sealed file that lacks an array: the schema check names it
    p = save_checkpoint(tmp_path / "e.h5", net, CFG, optimizer=opt, rng=rng, epoch=1)
    with h5py.File(p, "a") as f:
        del f["layers/1/W"]
    checkpoint._seal(p)
    with pytest.raises(CheckpointError, match="layer 1 lacks"):
        load_checkpoint(p)


def test_a_checkpoint_of_another_architecture_does_not_load_into_a_network(tmp_path):
    net, opt, rng = small_run()
    ck = load_checkpoint(save_checkpoint(tmp_path / "c.h5", net, CFG, epoch=1))
    other = Network.build("12-5-3", "stbp", rng=np.random.default_rng(0))
    with pytest.raises(CheckpointError, match="shape"):
        load_into(other, ck)


@functools.lru_cache(maxsize=1)
def good_file():
    """The bytes of a good checkpoint and the weights it holds."""
    net, opt, rng = small_run()
    with tempfile.TemporaryDirectory() as d:
        p = save_checkpoint(Path(d) / "c.h5", net, CFG, optimizer=opt, rng=rng, epoch=1)
        return p.read_bytes(), [a.copy() for a in net.params()]


@settings(deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_bytes_never_leak_a_raw_exception_or_wrong_weights(tmp_path, data):
    # any damage is either harmless (the user block's padding) or a CheckpointError raised
    # before HDF5 parses the file: a file that loads holds the saved weights
    raw, weights = good_file()
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255).filter(lambda v, i=i: v != buf[i]))
    path = tmp_path / "damaged.h5"
    path.write_bytes(bytes(buf))
    try:
        ck = load_checkpoint(path)
    except CheckpointError as err:
        assert "damaged.h5" in str(err)
        return
    arrays = [a for layer in ck.layers for a in layer["params"]]
    for a, b in zip(arrays, weights):
        assert np.array_equal(a, b)
