"""HM2-BP boosting (spec 7) in the trainer: the per-sample state hook of Method, its epoch update
from the training-pass predictions, checkpoints and exact resume, and boost off = the plain path."""

import json
import math

import h5py
import numpy as np
import pytest

import refsnn.train as T
from refsnn import checkpoint, oracle
from refsnn.checkpoint import load_checkpoint
from refsnn.config import TrainConfig
from refsnn.errors import CheckpointError
from refsnn.methods.base import Method
from refsnn.methods.hm2bp import HM2BP, BoostedLabels, HM2BPParams
from refsnn.network import Network

# a tiny HM2-BP run where some training samples are classified right and some wrong
PARAMS = {"tau_m": 8.0, "tau_s": 2.0, "t_ref": 1, "v_th": [2.0, 2.0], "desired_count": 4.0,
          "undesired_count": 1.0, "margin": 0.0, "w_lat": 0.5}
SMALL = TrainConfig(dataset="mnist10k", arch="784-16-10", T=12, epochs=2, batch_size=10,
                    n_train=60, n_test=30, seed=3, lr=1e-2, encoding="poisson",
                    encoding_kw={"rate": 0.3}, params=dict(PARAMS, boost=True))
OFF = SMALL.merged({"params": dict(PARAMS, boost=False)})


def run_arrays(folder):
    ck = load_checkpoint(folder / "checkpoint.h5")
    weights = [a for layer in ck.layers for a in layer["params"]]
    bufs = [a for name in sorted(ck.optimizer["buffers"]) for a in ck.optimizer["buffers"][name]]
    return ck, weights + bufs


def metrics(folder, drop=("seconds", "samples_per_s")):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def assert_same_run(a, b):
    ck_a, arr_a = run_arrays(a)
    ck_b, arr_b = run_arrays(b)
    assert ck_a.epoch == ck_b.epoch and ck_a.rng_state == ck_b.rng_state
    for x, y in zip(arr_a, arr_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)                     # bit for bit
    if ck_a.sample_state is None:
        assert ck_b.sample_state is None
    else:
        assert ck_a.sample_state.dtype == ck_b.sample_state.dtype == np.float64
        assert np.array_equal(ck_a.sample_state, ck_b.sample_state)
    assert metrics(a) == metrics(b)


def test_boosting_is_on_in_the_spec_8_presets_and_the_default_run_off_in_the_oracle():
    m = HM2BP()
    for name in ("mnist-mlp", "nmnist-mlp", "mnist-cnn"):
        assert m.presets[name]["params"]["boost"] is True, name
    assert m.defaults["params"]["boost"] is True
    assert HM2BPParams().boost is False
    # one oracle sample has β_n = 1: the switch changes nothing there
    rng = np.random.default_rng(0)
    case = m.random_case(rng)
    a = oracle.run_case("hm2bp", case["weights"], case["inputs"], label=case["label"],
                        params=case["params"])
    b = oracle.run_case("hm2bp", case["weights"], case["inputs"], label=case["label"],
                        params=dict(case["params"], boost=True))
    assert a["loss"] == b["loss"]
    for x, y in zip(a["grads"], b["grads"]):
        assert np.array_equal(x, y)


def test_the_base_method_keeps_no_sample_state():
    class Plain(Method):
        pass
    assert Plain().init_sample_state(None, np.arange(5)) is None
    assert HM2BP().init_sample_state(HM2BPParams(), np.arange(5)) is None        # boost off
    beta = HM2BP().init_sample_state(HM2BPParams(boost=True), np.arange(5))
    assert beta.dtype == np.float64 and np.array_equal(beta, np.ones(5))           # 7: β_n = 1


def test_per_class_update_through_the_trainer(tmp_path, monkeypatch):
    """7: after each epoch, per class c, err_c = Σ_{n∈c} β_n [wrong_n] / Σ_{n∈c} β_n and
    β_n <- β_n·exp(err_c/20) for the wrong samples only, "wrong" from the training pass; the next
    epoch's batches carry the new β_n of their samples."""
    calls, targets = [], []
    real_update, real_backward = HM2BP.update_sample_state, HM2BP.backward

    def update(self, p, beta, labels, pred):
        calls.append((beta.copy(), np.array(labels), pred.copy()))
        return real_update(self, p, beta, labels, pred)

    def backward(self, p, layers, trace, target, record=None):
        targets.append(target)
        return real_backward(self, p, layers, trace, target, record)

    monkeypatch.setattr(HM2BP, "update_sample_state", update)
    monkeypatch.setattr(HM2BP, "backward", backward)
    T.train(SMALL, "hm2bp", tmp_path / "run", quiet=True)
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.h5")
    rows = metrics(tmp_path / "run")
    assert len(calls) == 2 and len(targets) == 12                  # 2 epochs of 6 batches
    assert np.array_equal(calls[0][0], np.ones(60))                # β_n = 1 at the start
    grown = False
    for e, (beta, labels, pred) in enumerate(calls):
        wrong = pred != labels
        # the predictions are the training pass's: the same accuracy as the epoch's train_acc
        assert 1.0 - wrong.mean() == pytest.approx(rows[e]["train_acc"], abs=1e-15)
        want = beta.copy()
        for c in range(10):                                        # each class on its own
            members = np.flatnonzero(labels == c)
            err = sum(beta[n] for n in members if wrong[n]) / sum(beta[n] for n in members)
            for n in members:
                if wrong[n]:
                    want[n] = beta[n] * math.exp(err / 20.0)
        after = calls[e + 1][0] if e + 1 < len(calls) else ck.sample_state
        np.testing.assert_allclose(after, want, rtol=1e-15, atol=0)
        assert np.array_equal(after[~wrong], beta[~wrong])          # right ones stay, bit for bit
        assert np.all(after[wrong] > beta[wrong])
        grown |= bool(wrong.any())
        # classes with a different error rate grow by different factors (the test can tell them)
        rates = {round(float(np.mean(wrong[labels == c])), 6) for c in range(10)}
        assert len(rates) >= 2
    assert grown
    # the targets: plain β = 1 in epoch 1, then each sample's β after epoch 1, with its label
    assert all(isinstance(t, BoostedLabels) for t in targets)
    assert all(np.array_equal(t.beta, np.ones(len(t.beta))) for t in targets[:6])
    got = sorted((int(lab), float(b)) for t in targets[6:] for lab, b in zip(t.labels, t.beta))
    beta1, labels = calls[1][0], calls[1][1]
    assert got == sorted(zip(labels.tolist(), beta1.tolist()))
    assert len(set(beta1.tolist())) >= 3                           # unequal weights were used


def test_a_boosted_run_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    cfg = SMALL.merged({"epochs": 3})
    T.train(cfg, "hm2bp", tmp_path / "full", quiet=True)
    real = Network.loss_and_grads
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:                                        # epoch 2, batch 3 (6 per epoch)
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Network, "loss_and_grads", dying)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, "hm2bp", tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.h5")
    assert saved.epoch == 1 and saved.sample_state is not None
    assert not np.array_equal(saved.sample_state, np.ones(60))     # the weights moved in epoch 1
    T.train(cfg, "hm2bp", tmp_path / "cut", resume=True, quiet=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    # extended by resume: a 1-epoch run continued to 3 epochs is the same run again
    T.train(cfg.merged({"epochs": 1}), "hm2bp", tmp_path / "ext", quiet=True)
    T.train(cfg, "hm2bp", tmp_path / "ext", resume=True, quiet=True)
    assert_same_run(tmp_path / "full", tmp_path / "ext")


def test_boost_off_is_the_plain_path_and_the_first_boosted_epoch_changes_nothing(tmp_path,
                                                                                    monkeypatch):
    """Boost off: no state, the method receives the plain labels, no /sample_state is written.
    Boost on: β_n = 1 in the first epoch, so that epoch is bit-identical to the run with boost
    off (β_s = sample_weight·1); from the second epoch on the runs differ."""
    seen = []
    real_backward = HM2BP.backward

    def backward(self, p, layers, trace, target, record=None):
        seen.append(type(target))
        return real_backward(self, p, layers, trace, target, record)

    monkeypatch.setattr(HM2BP, "backward", backward)
    T.train(OFF, "hm2bp", tmp_path / "off", quiet=True)
    monkeypatch.undo()
    assert seen == [np.ndarray] * 12
    ck_off, arr_off = run_arrays(tmp_path / "off")
    assert ck_off.sample_state is None
    with h5py.File(tmp_path / "off" / "checkpoint.h5", "r") as f:
        assert "sample_state" not in f

    # the path with no hook at all: HM2-BP with the base Method's (no state) hooks
    for name in ("init_sample_state", "batch_target", "update_sample_state"):
        monkeypatch.setattr(HM2BP, name, getattr(Method, name))
    T.train(OFF, "hm2bp", tmp_path / "nohook", quiet=True)
    monkeypatch.undo()
    assert_same_run(tmp_path / "off", tmp_path / "nohook")

    one_on, one_off = SMALL.merged({"epochs": 1}), OFF.merged({"epochs": 1})
    T.train(one_on, "hm2bp", tmp_path / "on1", quiet=True)
    T.train(one_off, "hm2bp", tmp_path / "off1", quiet=True)
    ck_on1, arr_on1 = run_arrays(tmp_path / "on1")
    _, arr_off1 = run_arrays(tmp_path / "off1")
    for x, y in zip(arr_on1, arr_off1):
        assert np.array_equal(x, y)
    assert metrics(tmp_path / "on1") == metrics(tmp_path / "off1")
    assert not np.array_equal(ck_on1.sample_state, np.ones(60))
    T.train(SMALL, "hm2bp", tmp_path / "on", quiet=True)
    _, arr_on = run_arrays(tmp_path / "on")
    assert not all(np.array_equal(x, y) for x, y in zip(arr_on, arr_off))


def _rewrite(path, edit):
    """Change a checkpoint's HDF5 content with ``edit(h5file)``, then seal it again."""
    with h5py.File(path, "r+") as f:
        edit(f)
    checkpoint._seal(path)


def test_a_checkpoint_from_before_boosting_existed_still_resumes(tmp_path):
    """A run saved before the ``boost`` parameter existed (no such param, no /sample_state)
    resumes as boost=False and ends as the uninterrupted run."""
    T.train(OFF.merged({"epochs": 1}), "hm2bp", tmp_path / "old", quiet=True)

    def drop_boost(f):
        cfg = json.loads(f.attrs["config"])
        del cfg["params"]["boost"]
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)
        del f["params"].attrs["boost"]

    _rewrite(tmp_path / "old" / "checkpoint.h5", drop_boost)
    old = load_checkpoint(tmp_path / "old" / "checkpoint.h5")
    assert "boost" not in old.params and old.sample_state is None
    T.train(OFF, "hm2bp", tmp_path / "old", resume=True, quiet=True)
    T.train(OFF, "hm2bp", tmp_path / "new", quiet=True)
    assert_same_run(tmp_path / "old", tmp_path / "new")


def test_a_boosted_checkpoint_without_its_weights_is_refused(tmp_path):
    T.train(SMALL.merged({"epochs": 1}), "hm2bp", tmp_path / "run", quiet=True)
    path = tmp_path / "run" / "checkpoint.h5"
    ck = load_checkpoint(path)
    assert ck.sample_state.shape == (60,)

    def shorter(f):
        data = f["sample_state"][()]
        del f["sample_state"]
        f.create_dataset("sample_state", data=data[:59])

    _rewrite(path, shorter)
    with pytest.raises(CheckpointError, match=r"per-sample training state has shape \(59,\)"):
        T.train(SMALL, "hm2bp", tmp_path / "run", resume=True, quiet=True)
    _rewrite(path, lambda f: f.__delitem__("sample_state"))
    with pytest.raises(CheckpointError, match="holds no per-sample training state"):
        T.train(SMALL, "hm2bp", tmp_path / "run", resume=True, quiet=True)
