"""refsnn.train: exact resume, run-folder rules, metrics, divergence, progress."""

import io
import time
import json

import numpy as np
import pytest

import refsnn.train as T
from refsnn.checkpoint import load_checkpoint
from refsnn.config import TrainConfig
from refsnn.errors import ConfigError, RefsnnError, ShapeError
from refsnn.network import Network

# a small but real run: 200 digits of mnist10k, STBP, a few batches per epoch
SMALL = TrainConfig(dataset="mnist10k", arch="784-24-10", T=4, epochs=2, batch_size=40,
                    n_train=200, n_test=100, seed=7, lr=2e-3,
                    params={"decay": 0.2, "v_th": 0.5})


def arrays_of(path):
    ck = load_checkpoint(path)
    weights = [a for layer in ck.layers for a in layer["params"]]
    bufs = [a for name in sorted(ck.optimizer["buffers"]) for a in ck.optimizer["buffers"][name]]
    return ck, weights, bufs


def strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in rows]


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    ck_a, w_a, o_a = arrays_of(a / "checkpoint.h5")
    ck_b, w_b, o_b = arrays_of(b / "checkpoint.h5")
    assert ck_a.epoch == ck_b.epoch
    for x, y in zip(w_a + o_a, w_b + o_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)     # bit for bit
    assert ck_a.optimizer["k"] == ck_b.optimizer["k"]
    assert ck_a.rng_state == ck_b.rng_state
    assert strip_times(read_metrics(a)) == strip_times(read_metrics(b))
    assert strip_times(ck_a.history) == strip_times(ck_b.history)


def test_resume_after_an_interruption_is_bit_identical(tmp_path, monkeypatch):
    full = tmp_path / "full"
    T.train(SMALL, "stbp", full, quiet=True)
    # the same run, killed in the middle of epoch 2, then resumed
    cut = tmp_path / "cut"
    real = Network.loss_and_grads
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:                                   # epoch 2, batch 2 (5 per epoch)
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Network, "loss_and_grads", dying)
    with pytest.raises(KeyboardInterrupt):
        T.train(SMALL, "stbp", cut, quiet=True)
    monkeypatch.undo()
    assert load_checkpoint(cut / "checkpoint.h5").epoch == 1
    assert len(read_metrics(cut)) == 1
    report = T.train(SMALL, "stbp", cut, resume=True, quiet=True)
    assert_same_run(full, cut)
    assert report["epochs"] == 2
    assert report == {**report, "test_acc": read_metrics(full)[-1]["test_acc"]}


def test_a_short_run_extended_by_resume_equals_the_long_run(tmp_path):
    one = SMALL.merged({"epochs": 1})
    T.train(one, "stbp", tmp_path / "a", quiet=True)
    T.train(SMALL, "stbp", tmp_path / "a", resume=True, quiet=True)
    T.train(SMALL, "stbp", tmp_path / "b", quiet=True)
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_run_folder_rules(tmp_path):
    T.train(SMALL.merged({"epochs": 1}), "stbp", tmp_path / "r", quiet=True)
    with pytest.raises(ConfigError, match="--resume"):
        T.train(SMALL, "stbp", tmp_path / "r", quiet=True)
    with pytest.raises(ConfigError, match=r"lr: 0.002 vs 0.001"):
        T.train(SMALL.merged({"lr": 1e-3}), "stbp", tmp_path / "r", resume=True, quiet=True)
    with pytest.raises(ConfigError, match="param v_th"):
        T.train(SMALL.merged({"params": {"v_th": 0.6}}), "stbp", tmp_path / "r", resume=True,
                quiet=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        T.train(SMALL, "stbp", other, quiet=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        T.train(SMALL, "stbp", tmp_path / "empty", resume=True, quiet=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="run folder"):
        T.train(SMALL, "stbp", tmp_path / "file" / "run", quiet=True)


def test_metrics_report_and_progress(tmp_path):
    stream = io.StringIO()
    report = T.train(SMALL, "stbp", tmp_path / "m", progress=stream)
    rows = read_metrics(tmp_path / "m")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["lr"] == SMALL.lr and np.isfinite(r["loss"])
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert [lay["layer"] for lay in r["layers"]] == [0, 1]      # two spiking dense layers
        for lay in r["layers"]:
            assert 0 <= lay["spike_rate"] <= 1 and 0 <= lay["silent"] <= 1
            assert lay["grad_norm"] > 0
        assert r["seconds"] > 0 and r["samples_per_s"] > 0
    assert report["test_acc"] == rows[-1]["test_acc"]
    assert report["best_test_acc"] == max(r["test_acc"] for r in rows)
    assert report["n_train"] == 200 and report["n_test"] == 100
    assert json.loads((tmp_path / "m" / "report.json").read_text())["test_acc"] == report["test_acc"]
    text = stream.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "\r" not in text   # no bar off a tty
    quiet = io.StringIO()
    T.train(SMALL, "stbp", tmp_path / "q", progress=quiet, quiet=True)
    assert quiet.getvalue() == ""


def test_a_diverging_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = Network.loss_and_grads
    calls = {"n": 0}

    def nan_later(self, *a, **k):
        calls["n"] += 1
        loss, grads, trace = real(self, *a, **k)
        return (float("nan") if calls["n"] == 8 else loss), grads, trace

    monkeypatch.setattr(Network, "loss_and_grads", nan_later)
    with pytest.raises(RefsnnError, match=r"diverged in epoch 2, batch 3.*lower the learning rate"):
        T.train(SMALL, "stbp", tmp_path / "n", quiet=True)
    assert load_checkpoint(tmp_path / "n" / "checkpoint.h5").epoch == 1


def test_nan_weights_after_a_step_are_caught(tmp_path, monkeypatch):
    import refsnn.optim as O
    real = O.Adam._update

    def poison(self, i, w, g, lr):
        real(self, i, w, g, lr)
        if self.k == 2 and i == 0:
            w[3] = np.inf

    monkeypatch.setattr(O.Adam, "_update", poison)
    with pytest.raises(RefsnnError, match="W0 holds NaN or inf"):
        T.train(SMALL, "stbp", tmp_path / "w", quiet=True)


def test_wrong_input_size_and_too_large_subset_are_user_errors(tmp_path):
    with pytest.raises(ShapeError, match="start --arch with 784 or 28x28x1"):
        T.train(SMALL.merged({"arch": "100-10"}), "stbp", tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="n-train=9000"):
        T.train(SMALL.merged({"n_train": 9000}), "stbp", tmp_path / "b", quiet=True)


def test_float32_run_trains_and_saves_float32(tmp_path):
    T.train(SMALL.merged({"dtype": "float32", "epochs": 1}), "stbp", tmp_path / "f", quiet=True)
    ck = load_checkpoint(tmp_path / "f" / "checkpoint.h5")
    assert ck.dtype == "float32"
    assert all(a.dtype == np.float32 for layer in ck.layers for a in layer["params"])


def test_the_progress_bar_draws_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = T.Progress(stream, quiet=False, epochs=3)
        bar.bar(2, 400, 800, t0=time.perf_counter(), loss=0.25, acc=0.5, final=False)
        bar.say("epoch 2/3 done")
    assert "\repoch 2/3 [############............] 400/800" in tty.getvalue()
    assert "samples/s" in tty.getvalue() and "acc 50.0%" in tty.getvalue()
    assert pipe.getvalue() == "epoch 2/3 done\n"


def test_off_a_terminal_a_long_epoch_writes_a_plain_line_a_minute():
    pipe = io.StringIO()
    bar = T.Progress(pipe, quiet=False, epochs=3)
    t0 = time.perf_counter() - 61.0                  # the epoch began over a minute ago
    bar.bar(1, 300, 800, t0=t0, loss=0.5, acc=0.25)
    bar.bar(1, 310, 800, t0=t0, loss=0.5, acc=0.25)  # within the minute: nothing more
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in pipe.getvalue()
    assert lines[0].startswith("  epoch 1/3: 300/800 samples") and "acc 25.0%" in lines[0]
    silent = io.StringIO()
    T.Progress(silent, quiet=True, epochs=3).say("x")
    assert silent.getvalue() == ""
