"""The nmnist-synth event-camera model, its N-MNIST files, and the registry/CLI around them."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from refsnn.cli_data import data
from refsnn.data import registry
from refsnn.data.binning import nmnist_stbp, nmnist_tsslbp, saccade_offset
from refsnn.data.events import nmnist_tree, read_nmnist
from refsnn.data.eventsets import EventDataset
from refsnn.data.registry import list_datasets, load_dataset, subset
from refsnn.data.synth import MARKER, SynthParams, _thresholds, synth_events, synth_recordings, \
    write_nmnist_synth
from refsnn.errors import ConfigError, DataError

PLAIN = SynthParams(sigma_contrast=0.0, refractory_us=0.0, jitter_us=0.0)


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("mnist10k")
    return ds.train_x[:12], ds.train_y[:12], ds.test_x[:6], ds.test_y[:6]


def test_one_bright_pixel_matches_the_model_by_hand():
    """Pixel (0, 0) of an image whose only non-zero pixel is img[0, 0] = 0.9.

    It sees (1 - dy)(1 - dx) * 0.9 while the offset is below one pixel: at the start of leg 1
    (dx = 3.5 s, dy = 7 s) and the end of leg 3 (dx = 7 - 7 s', dy = 0). With eps = 0.1 the log
    starts at ln(1) = 0, so with C = 0.5 the OFF events cross -0.5, -1, -1.5, -2 (ln 0.1 = -2.30
    is the floor) and the ON events climb back through the same levels to 0 at t = 315 ms.
    The model takes L linear between 1-ms frames; the reference computes L at the frame times
    from that formula (not from the bilinear code) and interpolates the crossings.
    """
    img = np.zeros((28, 28))
    img[0, 0] = 0.9
    ev = synth_events(img, np.random.default_rng(0), PLAIN)
    mine = ev[(ev["x"] == 0) & (ev["y"] == 0)]
    t_frames = np.arange(316) * 1000.0
    dx, dy = saccade_offset(t_frames)
    L = np.log(0.9 * np.clip(1 - dx, 0, 1) * np.clip(1 - dy, 0, 1) + 0.1)
    expected = []
    for pol, levels in ((0, [-0.5, -1.0, -1.5, -2.0]), (1, [-1.5, -1.0, -0.5, 0.0])):
        lo = 0 if pol == 0 else 200
        for lev in levels:
            hit = (L[lo + 1:] <= lev) if pol == 0 else (L[lo + 1:] >= lev)
            k = lo + 1 + int(np.argmax(hit))
            frac = (lev - L[k - 1]) / (L[k] - L[k - 1])
            expected.append((pol, (k - 1 + frac) * 1000.0))
    assert mine["p"].tolist() == [p for p, _ in expected]
    np.testing.assert_allclose(mine["t"], [t for _, t in expected], atol=0.5)
    # against continuous time (the frame interpolation's error only): leg 1 solves
    # 0.9 (1 - 7s)(1 - 3.5s) = exp(level) - 0.1
    for lev, t in zip([-0.5, -1.0, -1.5, -2.0], mine["t"][:4]):
        a = (math.exp(lev) - 0.1) / 0.9
        s = (10.5 - math.sqrt(10.5 ** 2 - 4 * 24.5 * (1 - a))) / 49
        assert abs(t - s * 105_000) < 50           # 1/20 of a frame
    assert mine["t"][-1] == 315_000


def test_no_motion_no_events_and_closed_path_balances_every_pixel(digits):
    x = digits[0][:3]
    still = synth_recordings(x, np.random.default_rng(0), SynthParams(amplitude=0.0))
    assert [len(e) for e in still] == [0, 0, 0]
    for ev in synth_recordings(x, np.random.default_rng(1), PLAIN):
        assert len(ev) > 1000
        on = np.zeros((34, 34), int)
        off = np.zeros((34, 34), int)
        np.add.at(on, (ev["y"][ev["p"] == 1], ev["x"][ev["p"] == 1]), 1)
        np.add.at(off, (ev["y"][ev["p"] == 0], ev["x"][ev["p"] == 0]), 1)
        assert np.abs(on - off).max() <= 1                   # formats.md 7.3


def test_events_in_range_sorted_and_seeded(digits):
    x = digits[0][:4]
    a = synth_recordings(x, np.random.default_rng(7))
    b = synth_recordings(x, np.random.default_rng(7))
    c = synth_recordings(x, np.random.default_rng(8))
    for ea, eb, ec in zip(a, b, c):
        np.testing.assert_array_equal(ea, eb)
        assert len(ea) != len(ec) or not np.array_equal(ea, ec)
        assert ea["x"].max() < 34 and ea["y"].max() < 34 and set(ea["p"]) <= {0, 1}
        assert np.all(np.diff(ea["t"]) >= 0)
        assert 0 <= ea["t"].min() and ea["t"].max() <= 315_000 + 1000   # jitter 100 us
        # N-MNIST-like density: the real sample has 4,325 events (formats.md 1.2)
        assert 1500 < len(ea) < 9000, len(ea)


def test_event_count_falls_roughly_as_one_over_c(digits):
    x = digits[0][:4]
    n = {C: sum(len(e) for e in synth_recordings(
        x, np.random.default_rng(0), SynthParams(contrast=C, sigma_contrast=0.0,
                                                 refractory_us=0.0, jitter_us=0.0)))
         for C in (0.25, 0.5, 1.0)}
    assert 1.7 < n[0.25] / n[0.5] < 2.7 and 1.7 < n[0.5] / n[1.0] < 2.7, n


def test_refractory_period_and_jitter(digits):
    img = digits[0][0]
    free = synth_events(img, np.random.default_rng(0), PLAIN)
    refr = synth_events(img, np.random.default_rng(0),
                        SynthParams(sigma_contrast=0.0, refractory_us=5000.0, jitter_us=0.0))
    assert len(refr) < len(free)
    for y in range(34):
        for x in range(34):
            t = refr["t"][(refr["x"] == x) & (refr["y"] == y)]
            assert np.all(np.diff(t) >= 5000 - 1)            # rounding to whole us
    jit = synth_events(img, np.random.default_rng(0),
                       SynthParams(sigma_contrast=0.0, refractory_us=0.0, jitter_us=10.0))
    assert len(jit) == len(free)
    diffs = []
    for y in range(34):                                      # gaps >> 10 us: order per pixel kept
        for x in range(34):
            a = np.sort(free["t"][(free["x"] == x) & (free["y"] == y)])
            b = np.sort(jit["t"][(jit["x"] == x) & (jit["y"] == y)])
            diffs.append(b.astype(float) - a)
    d = np.concatenate(diffs)
    assert abs(d.mean()) < 1.0 and 8.5 < d.std() < 11.5      # N(0, 10) plus rounding


def test_params_are_checked():
    with pytest.raises(ConfigError, match="contrast"):
        SynthParams(contrast=0)
    with pytest.raises(ConfigError, match="multiple of frame_us"):
        SynthParams(frame_us=800)
    with pytest.raises(DataError, match="at most 34x34"):
        synth_events(np.zeros((40, 40)), np.random.default_rng(0))


def test_written_tree_is_read_back_by_the_real_reader(tmp_path, digits):
    trx, try_, tex, tey = digits
    out = write_nmnist_synth(tmp_path / "ns", (trx, try_), (tex, tey), seed=3)
    files = nmnist_tree(out, "train")
    assert [f.name for f, _ in files] == [f"{i + 1:05d}.bin" for i in range(len(try_))]
    assert [lab for _, lab in files] == try_.tolist()
    # the same draws in the same order: thresholds, then image by image
    rng = np.random.default_rng(3)
    th = _thresholds(SynthParams(), rng)
    for (f, _), img in zip(files, trx):
        np.testing.assert_array_equal(read_nmnist(f), synth_events(img, rng, SynthParams(), th))
    meta = json.loads((out / MARKER).read_text())
    assert meta["seed"] == 3 and meta["splits"]["Test"]["n"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    ds = load_dataset("nmnist-synth", data_dir=out)
    assert isinstance(ds, EventDataset) and ds.temporal and ds.shape == (2, 34, 34)
    assert ds.train_y.tolist() == try_.tolist() and ds.test_y.tolist() == tey.tolist()
    np.testing.assert_array_equal(ds.n_events("train"), [len(read_nmnist(f)) for f, _ in files])
    x = ds.frames("test", np.array([0, 2]), T=10)
    assert x.shape == (10, 2, 2, 34, 34) and x.dtype == np.float64 and set(np.unique(x)) <= {0, 1}
    assert ds.frames("train", [0], T=540, binning="hm2bp").shape == (540, 1, 2, 34, 34)
    ev = ds.recording("train", 1)
    np.testing.assert_array_equal(ds.frames("train", [1], T=30, binning="stbp:1000")[:, 0],
                                  nmnist_stbp(ev, 30, 1000))
    np.testing.assert_array_equal(ds.frames("train", [1], T=30, binning="tsslbp")[:, 0],
                                  nmnist_tsslbp(ev, 30))
    for bad in ("stbp:0", "stbp:x", "nope"):
        with pytest.raises(ConfigError, match="unknown binning"):
            ds.frames("train", [1], T=3, binning=bad)
    sub = subset(ds, 5, 3, rng=0)
    assert (sub.n_train, sub.n_test) == (5, 3) and isinstance(sub, EventDataset)
    with pytest.raises(ConfigError, match="event recordings"):
        ds.x01("train")
    with pytest.raises(DataError, match="not an empty folder"):
        write_nmnist_synth(out, (trx, try_), (tex, tey))


def test_generated_on_first_use_into_the_cache(tmp_path, monkeypatch, digits):
    trx, try_, tex, tey = digits
    real = registry.load_dataset
    small = subset(real("mnist10k"), 10, 5, rng=0)
    monkeypatch.setattr(registry, "load_dataset",
                        lambda name, data_dir=None: small if name == "mnist10k"
                        else real(name, data_dir))
    monkeypatch.setenv("REFSNN_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    rows = {r.name: r for r in list_datasets()}
    assert rows["nmnist-synth"].found and not rows["nmnist"].found
    ds = real("nmnist-synth")
    assert (tmp_path / "nmnist-synth" / MARKER).is_file()
    assert (ds.n_train, ds.n_test) == (10, 5)
    stamp = (tmp_path / "nmnist-synth" / MARKER).stat().st_mtime_ns
    ds2 = real("nmnist-synth")                                   # found, not generated again
    assert (tmp_path / "nmnist-synth" / MARKER).stat().st_mtime_ns == stamp
    assert ds2.train_y.tolist() == ds.train_y.tolist()


@pytest.mark.parametrize("name, words", [
    ("nmnist", ["Train.zip", "--data-dir"]), ("dvs-gesture", ["DvsGesture"]),
    ("cifar10-dvs", ["airplane"]), ("shd", ["shd_train.h5"]),
])
def test_missing_real_sets_say_where_to_get_them(tmp_path, monkeypatch, name, words):
    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert f"dataset {name!r} not found" in msg and all(w in msg for w in words)
    assert "docs/events.md" in msg


def test_cli_synth_events_and_errors(tmp_path):
    out = tmp_path / "set"
    res = CliRunner().invoke(data, ["synth-events", str(out), "--n-train", "3", "--n-test", "2",
                                    "--seed", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "wrote 5 recordings" in res.output
    assert len(list(out.glob("Train/*/*.bin"))) == 3 and len(list(out.glob("Test/*/*.bin"))) == 2
    res = CliRunner().invoke(data, ["synth-events", str(out), "--n-train", "3", "--n-test", "2"])
    assert res.exit_code == 2 and res.output.startswith("Error: ") and "Traceback" not in \
        res.output


def test_default_arch_input_follows_the_event_set():
    from refsnn.data.eventsets import arch_for_dataset
    assert arch_for_dataset("784-400-10", "nmnist-synth") == "2312-400-10"
    assert arch_for_dataset("28x28x1-15c5-a2-300-10", "nmnist") == "34x34x2-15c5-a2-300-10"
    assert arch_for_dataset("784-400-10", "dvs-gesture") == "2048-400-10"
    assert arch_for_dataset("784-128-20", "shd") == "700-128-20"
    assert arch_for_dataset("28x28x1-15c5-a2-300-10", "shd") == "28x28x1-15c5-a2-300-10"
    assert arch_for_dataset("784-400-10", "mnist10k") == "784-400-10"


# ---- training on an event set through the CLI --------------------------------------------------

@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    ds = load_dataset("mnist10k")
    out = tmp_path_factory.mktemp("synth") / "set"
    return write_nmnist_synth(out, (ds.train_x[:200], ds.train_y[:200]),
                              (ds.test_x[:100], ds.test_y[:100]), seed=0)


def _train(args):
    from refsnn.cli import main
    return CliRunner().invoke(main, ["train"] + args, catch_exceptions=False)


def test_train_cli_bins_event_frames_and_adapts_the_default_arch(tmp_path, small_synth):
    out = tmp_path / "run"
    res = _train(["--method", "stbp", "--dataset", "nmnist-synth", "--data-dir",
                  str(small_synth), "--epochs", "1", "--n-train", "20", "--n-test", "10",
                  "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["arch"] == "2312-400-10" and cfg["dataset"] == "nmnist-synth"
    res = _train(["--method", "stbp", "--dataset", "nmnist-synth", "--data-dir",
                  str(small_synth), "--arch", "784-400-10", "--epochs", "1", "--quiet",
                  "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "2312" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_stbp_learns_nmnist_synth_well_above_chance(tmp_path, small_synth):
    res = _train(["--method", "stbp", "--dataset", "nmnist-synth", "--data-dir",
                  str(small_synth), "--epochs", "4", "--steps", "8", "--quiet",
                  "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["test_acc"] >= 0.4, report["test_acc"]           # chance: 0.1
