"""Augmentation (crop, flip), per-channel normalisation, per-layer-group lr; their place in the
training loop (determinism, bit-identical resume) and in the CIFAR presets."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import refsnn.train as T
from refsnn.cli import main
from refsnn.config import TrainConfig
from refsnn.data import load_dataset
from refsnn.data.augment import (
    Augment, augment_batch, check_norm, crop, crop_offsets, flip_mask, hflip, images01,
    normalize, parse_augment,
)
from refsnn.data.registry import Dataset
from refsnn.errors import ConfigError
from refsnn.methods import get_method
from refsnn.network import Network
from refsnn.optim import SGD, Adam

from test_cifar import write_cifar10
from test_train import assert_same_run

batches = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7))


def naive_crop(x, offsets, pad):
    """The definition, loop by loop: out[b, c, i, j] = x[b, c, i + oy - P, j + ox - P] or 0."""
    B, C, H, W = x.shape
    out = np.zeros_like(x)
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    si, sj = i + offsets[b, 0] - pad, j + offsets[b, 1] - pad
                    if 0 <= si < H and 0 <= sj < W:
                        out[b, c, i, j] = x[b, c, si, sj]
    return out


def test_parse_augment():
    assert parse_augment("crop4,flip") == Augment(4, True)
    assert parse_augment(" flip , CROP2 ") == Augment(2, True)
    assert parse_augment("") == parse_augment("none") == parse_augment(None) == Augment()
    assert not Augment().active and Augment(0, True).active and Augment(1, False).active
    for bad in ("crop", "cropx", "rotate", "flip,flip", "crop1,crop2", "crop-1"):
        with pytest.raises(ConfigError):
            parse_augment(bad)


@settings(deadline=None, max_examples=40)
@given(shape=batches, pad=st.integers(0, 5), seed=st.integers(0, 2**31), data=st.data())
def test_crop_is_a_zero_filled_shift_and_keeps_the_shape(shape, pad, seed, data):
    x = data.draw(arrays(np.uint8, shape))
    offsets = crop_offsets(np.random.default_rng(seed), shape[0], pad)
    assert offsets.shape == (shape[0], 2) and offsets.min() >= 0 and offsets.max() <= 2 * pad
    out = crop(x, offsets, pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, naive_crop(x, offsets, pad))
    centre = np.full((shape[0], 2), pad)
    np.testing.assert_array_equal(crop(x, centre, pad), x)          # offset P = no shift
    np.testing.assert_array_equal(crop(x, offsets * 0, 0), x)       # pad 0 = identity


@settings(deadline=None, max_examples=40)
@given(shape=batches, seed=st.integers(0, 2**31), data=st.data())
def test_flip_twice_is_the_identity(shape, seed, data):
    x = data.draw(arrays(np.float64, shape, elements=st.floats(-3, 3)))
    mask = flip_mask(np.random.default_rng(seed), shape[0])
    once = hflip(x, mask)
    assert once.shape == x.shape
    np.testing.assert_array_equal(hflip(once, mask), x)
    np.testing.assert_array_equal(once[mask], x[mask][..., ::-1])
    np.testing.assert_array_equal(once[~mask], x[~mask])
    # the random flip with the same seed, applied twice
    aug = Augment(0, True)
    twice = augment_batch(augment_batch(x, aug, np.random.default_rng(seed)), aug,
                          np.random.default_rng(seed))
    np.testing.assert_array_equal(twice, x)


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_crops_cover_every_shift_uniformly(pad):
    H = W = 6
    img = (np.arange(H * W, dtype=np.int64) + 1).reshape(1, 1, H, W)   # distinct, nonzero
    B = 3000
    x = np.repeat(img, B, axis=0)
    out = augment_batch(x, Augment(pad, False), np.random.default_rng(11))
    shifted = {}
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            o = np.array([[dy + pad, dx + pad]])
            shifted[(dy, dx)] = naive_crop(img, o, pad)[0]
    counts = dict.fromkeys(shifted, 0)
    for b in range(B):                              # every output is one of the shifts
        hit = [k for k, v in shifted.items() if np.array_equal(out[b], v)]
        assert len(hit) == 1
        counts[hit[0]] += 1
    n = (2 * pad + 1) ** 2
    assert min(counts.values()) > 0                 # the set of crops covers every shift
    expect = B / n                                  # uniform: within 6 binomial sds
    sd = np.sqrt(B * (1 / n) * (1 - 1 / n))
    assert all(abs(c - expect) < 6 * sd for c in counts.values())


def test_flip_probability_is_one_half_and_nothing_is_drawn_when_off():
    m = flip_mask(np.random.default_rng(3), 20000)
    assert abs(m.mean() - 0.5) < 6 * np.sqrt(0.25 / 20000)
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    x = np.arange(2 * 1 * 3 * 3, dtype=np.uint8).reshape(2, 1, 3, 3)
    np.testing.assert_array_equal(augment_batch(x, Augment(), rng), x)
    assert rng.bit_generator.state == before


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), pad=st.integers(1, 4))
def test_same_seed_same_augmentation(seed, pad):
    x = np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8), dtype=np.uint8)
    aug = Augment(pad, True)
    a = augment_batch(x, aug, np.random.default_rng(seed))
    b = augment_batch(x, aug, np.random.default_rng(seed))
    c = augment_batch(x, aug, np.random.default_rng(seed + 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)      # 8 images: offsets and flips all equal ~ (1/18)^8 / 2^8


def tiny_set(C=3, H=5, W=5, value=255):
    x = np.full((4, C, H, W), value, np.uint8)
    y = np.array([0, 1, 0, 1], np.int64)
    return Dataset("tiny", x, y, x.copy(), y.copy(), 2, (C, H, W))


def test_normalisation_and_the_padded_pixel():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    ds = tiny_set()
    rng = np.random.default_rng(1)
    x = images01(ds, "train", np.arange(4), rng, np.float64, augment="crop2", mean=mean, std=std)
    assert x.shape == (4, 3, 5, 5) and x.dtype == np.float64
    for c in range(3):
        vals = set(np.unique(x[:, c]))
        assert vals <= {(1.0 - mean[c]) / std[c], (0.0 - mean[c]) / std[c]}  # image or padding
    offs = crop_offsets(np.random.default_rng(1), 4, 2)
    shifted = np.any(offs != 2, axis=1)
    assert (x[shifted] == (0.0 - mean[0]) / std[0]).any()        # a black border was added
    # normalise is (p - mean_c) / std_c over axis 1
    p = np.random.default_rng(2).random((2, 3, 4, 4))
    want = np.stack([(p[:, c] - mean[c]) / std[c] for c in range(3)], axis=1)
    np.testing.assert_array_equal(normalize(p, mean, std), want)
    np.testing.assert_array_equal(normalize(p, (0.5,), (0.25,)), (p - 0.5) / 0.25)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_without_options_images01_is_x01(dtype):
    ds = load_dataset("mnist10k")
    idx = np.array([5, 0, 77])
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    a = images01(ds, "test", idx, rng, dtype, augment="", mean=(), std=())
    b = ds.x01("test", idx, dtype)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert rng.bit_generator.state == before


def test_norm_checks():
    check_norm((), ())
    check_norm((0.1, 0.2, 0.3), (1, 1, 1), channels=3)
    check_norm((0.1,), (1.0,), channels=3)
    for mean, std in (((0.1,), ()), ((), (1.0,)), ((0.1, 0.2), (1.0,)), ((0.1,), (0.0,)),
                      ((float("nan"),), (1.0,))):
        with pytest.raises(ConfigError):
            check_norm(mean, std)
    with pytest.raises(ConfigError, match="3 channel"):
        check_norm((0.1, 0.2), (1, 1), channels=3)
    with pytest.raises(ConfigError):
        TrainConfig(norm_mean=(0.1,))
    with pytest.raises(ConfigError):
        TrainConfig(augment="rotate15")
    with pytest.raises(ConfigError, match="dense-lr-scale"):
        TrainConfig(dense_lr_scale=0.0)


# ---- the optimizer's per-array rates ---------------------------------------------------------

@pytest.mark.parametrize("make", [lambda p: SGD(p, momentum=0.9, weight_decay=1e-3),
                                  lambda p: Adam(p, weight_decay=1e-3)])
def test_per_array_lr_equals_one_optimizer_per_rate(make):
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    a = [x.copy() for x in w]
    b0, b1 = [w[0].copy()], [w[1].copy()]
    opt, o0, o1 = make(a), make(b0), make(b1)
    for _ in range(3):
        g = [rng.normal(size=x.shape) for x in w]
        opt.step(a, g, [0.1, 0.01])
        o0.step(b0, [g[0]], 0.1)
        o1.step(b1, [g[1]], 0.01)
    assert np.array_equal(a[0], b0[0]) and np.array_equal(a[1], b1[0])
    with pytest.raises(ValueError, match="learning rates"):
        opt.step(a, g, [0.1])


# ---- in the training loop --------------------------------------------------------------------

AUG = TrainConfig(dataset="mnist10k", arch="784-24-10", T=4, epochs=2, batch_size=40,
                  n_train=200, n_test=100, seed=7, lr=2e-3, encoding="direct",
                  augment="crop2,flip", norm_mean=(0.1307,), norm_std=(0.3081,),
                  params={"decay": 0.2, "v_th": 0.5})


def test_resume_with_augmentation_is_bit_identical(tmp_path, monkeypatch):
    T.train(AUG, "stbp", tmp_path / "full", quiet=True)
    real = Network.loss_and_grads
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:                                   # epoch 2, batch 2
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Network, "loss_and_grads", dying)
    with pytest.raises(KeyboardInterrupt):
        T.train(AUG, "stbp", tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    T.train(AUG, "stbp", tmp_path / "cut", resume=True, quiet=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    # augmentation does change the run (it is really applied to the training batches)
    T.train(AUG.merged({"augment": ""}), "stbp", tmp_path / "plain", quiet=True)
    from refsnn.checkpoint import load_checkpoint
    a = load_checkpoint(tmp_path / "full" / "checkpoint.h5").layers[0]["params"][0]
    b = load_checkpoint(tmp_path / "plain" / "checkpoint.h5").layers[0]["params"][0]
    assert not np.array_equal(a, b)
    with pytest.raises(ConfigError, match="augment"):            # resume must keep the option
        T.train(AUG.merged({"augment": "flip"}), "stbp", tmp_path / "full", resume=True,
                quiet=True)


def test_dense_lr_scale_is_the_lr_of_the_dense_arrays(tmp_path):
    base = AUG.merged({"augment": "", "optimizer": "sgd", "epochs": 1})
    T.train(base.merged({"lr": 4e-3, "dense_lr_scale": 0.5}), "stbp", tmp_path / "s", quiet=True)
    T.train(base.merged({"lr": 2e-3}), "stbp", tmp_path / "p", quiet=True)
    from refsnn.checkpoint import load_checkpoint
    ws = [a for layer in load_checkpoint(tmp_path / "s" / "checkpoint.h5").layers
          for a in layer["params"]]
    wp = [a for layer in load_checkpoint(tmp_path / "p" / "checkpoint.h5").layers
          for a in layer["params"]]
    assert all(np.array_equal(a, b) for a, b in zip(ws, wp))      # 4e-3 * 0.5 == 2e-3 exactly


def test_channel_mismatch_and_event_sets_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="channel"):
        T.train(AUG.merged({"norm_mean": (0.1, 0.2, 0.3), "norm_std": (1, 1, 1), "epochs": 1}),
                "stbp", tmp_path / "c", quiet=True)


def test_cifar_presets_carry_the_specs_data_options():
    st_ = get_method("stbp").presets["cifar10-cifarnet"]
    ts = get_method("tsslbp").presets["cifar10-cnn"]
    for pre in (st_, ts):
        assert pre["dataset"] == "cifar10" and pre["augment"] == "crop4,flip"
        assert pre["norm_mean"] == (0.4914, 0.4822, 0.4465)
        assert pre["norm_std"] == (0.2023, 0.1994, 0.2010)
        assert pre["encoding"] == "direct" and not pre.get("encoding_kw")
        TrainConfig().merged(dict(pre))                           # a valid TrainConfig
    assert st_["dense_lr_scale"] == 0.1 and st_["lr"] == 0.1      # conv 0.1, dense 0.01


def test_cli_preset_runs_on_a_fake_cifar(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "fake" / "cifar10", np.random.default_rng(0),
                  per_batch=(6, 6, 6, 6, 6), n_test=10)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "train", "--method", "stbp", "--preset", "cifar10-cifarnet", "--data-dir",
        str(tmp_path / "fake"), "--arch", "32x32x3-4c3p1-a8-100", "--n-train", "20",
        "--n-test", "10", "--epochs", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["augment"] == "crop4,flip" and cfg["dense_lr_scale"] == 0.1
    assert cfg["norm_mean"] == [0.4914, 0.4822, 0.4465] and cfg["dataset"] == "cifar10"
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_train"] == 20 and rep["n_test"] == 10
    # flags override the preset's data options
    res = CliRunner().invoke(main, [
        "train", "--method", "stbp", "--preset", "cifar10-cifarnet", "--data-dir",
        str(tmp_path / "fake"), "--arch", "32x32x3-4c3p1-a8-100", "--n-train", "20",
        "--n-test", "10", "--epochs", "1", "--out", str(tmp_path / "r2"), "--quiet",
        "--augment", "none", "--norm-mean", "0.5", "--norm-std", "0.25"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "r2" / "config.json").read_text())["config"]
    assert cfg["augment"] == "none" and cfg["norm_mean"] == [0.5]
    res = CliRunner().invoke(main, ["train", "--method", "stbp", "--norm-mean", "a,b"])
    assert res.exit_code == 2 and "comma-separated" in res.output


def test_a_run_saved_before_the_data_options_existed_still_resumes(tmp_path, monkeypatch):
    one = AUG.merged({"augment": "", "norm_mean": (), "norm_std": (), "encoding": "bernoulli",
                      "epochs": 1})
    real = T.save_checkpoint

    def as_older_refsnn(path, net, config, **kw):        # a config without the new options
        cfg = {k: v for k, v in config.as_dict().items()
               if k not in ("augment", "norm_mean", "norm_std", "dense_lr_scale")}
        return real(path, net, cfg, **kw)

    monkeypatch.setattr(T, "save_checkpoint", as_older_refsnn)
    T.train(one, "stbp", tmp_path / "old", quiet=True)
    monkeypatch.undo()
    from refsnn.checkpoint import load_checkpoint
    assert "augment" not in load_checkpoint(tmp_path / "old" / "checkpoint.h5").config
    report = T.train(one.merged({"epochs": 2}), "stbp", tmp_path / "old", resume=True, quiet=True)
    assert report["epochs"] == 2
