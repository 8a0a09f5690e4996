"""The `refsnn` command line through click's CliRunner: errors, config layering, commands."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from refsnn import __version__
from refsnn.cli import build_config, main
from refsnn.methods import METHODS, get_method
from refsnn.methods.base import FDCheck, Method, Ref
from refsnn.methods.stbp import STBP


def run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


def assert_user_error(res, *needles):
    """Exit 2, exactly one `Error:` line on stderr, no traceback; the line names the fix."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output + res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


QUICK = ["--n-train", "100", "--n-test", "50", "--epochs", "1", "--arch", "784-10-10",
         "--steps", "2", "--quiet"]


def test_unknown_method_lists_the_valid_ones(tmp_path):
    res = run(["train", "--method", "nope", "--out", str(tmp_path / "r")])
    assert_user_error(res, "unknown method 'nope'", "stbp", "hm2bp", "bpsta")


def test_bad_param_name_and_bad_value(tmp_path):
    res = run(["train", "--method", "stbp", "--param", "V_th=0.3", "--out", str(tmp_path / "r")])
    assert_user_error(res, "'V_th'", "v_th", "valid names", "surrogate_width")
    res = run(["train", "--method", "stbp", "--param", "v_th=abc", "--out", str(tmp_path / "r")])
    assert_user_error(res, "v_th", "number")
    res = run(["train", "--method", "stbp", "--param", "surrogate=square"])
    assert_user_error(res, "surrogate", "rect")
    res = run(["train", "--method", "stbp", "--param", "v_th"])
    assert_user_error(res, "NAME=VALUE")


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("REFSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)                                  # no ./data/mnist here
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run(["train", "--method", "stbp", "--dataset", "mnist", "--data-dir", str(empty),
               "--out", str(tmp_path / "r")])
    assert_user_error(res, "'mnist' not found", str(empty), "data/README.md")


def test_nan_learning_rate_and_unknown_preset(tmp_path):
    res = run(["train", "--method", "stbp", "--lr", "nan", "--out", str(tmp_path / "r")])
    assert_user_error(res, "lr=nan")
    res = run(["train", "--method", "stbp", "--preset", "nope"])
    assert_user_error(res, "no preset 'nope'", "mnist-cnn32", "mnist-mlp")


def test_unwritable_out(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = run(["train", "--method", "stbp", "--out", str(tmp_path / "afile" / "run")] + QUICK)
    assert_user_error(res, "run folder", "writable --out")


def test_resume_needs_out_and_a_run():
    assert_user_error(run(["train", "--method", "stbp", "--resume"]), "--resume needs --out")
    assert_user_error(run(["train", "--resume", "--out", "nowhere-xyz"]), "--method")


def test_a_corrupt_checkpoint_is_one_error_line(tmp_path):
    bad = tmp_path / "checkpoint.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    assert_user_error(run(["eval", str(bad)]), "checkpoint.h5")


def test_layering_defaults_preset_flags():
    m = get_method("stbp")
    cfg = build_config(m)
    assert (cfg.dataset, cfg.arch, cfg.T) == (m.defaults["dataset"], m.defaults["arch"], m.defaults["T"])
    pre = m.presets["mnist-mlp512"]
    cfg = build_config(m, "mnist-mlp512", {"lr": 0.01, "steps": 3}, ["v_th=0.7", "strict=false"])
    assert cfg.arch == pre["arch"] and cfg.encoding == pre["encoding"]
    assert cfg.lr == 0.01 and cfg.T == 3                          # flags beat the preset
    assert cfg.params["v_th"] == 0.7 and cfg.params["strict"] is False
    assert cfg.params["decay"] == pre["params"]["decay"]          # the preset's own value
    assert cfg.lr_milestones == tuple(pre["lr_milestones"])


def test_version_methods_datasets():
    res = run(["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    res = run(["methods", "stbp"])
    assert res.exit_code == 0
    for row in STBP.Params.table():
        assert f"    {row.name} = " in res.output and row.meaning in res.output
    for name in STBP.presets:
        assert f"    {name}:" in res.output
    res = run(["methods"])
    assert res.exit_code == 0 and all(n in res.output for n in METHODS)
    res = run(["datasets"])
    assert res.exit_code == 0 and "mnist10k" in res.output and "(embedded)" in res.output


# ---- gradcheck -------------------------------------------------------------------------------

class QuadraticSTBP(STBP):
    """STBP whose 'relaxation' is Σ w²: the hand gradient 2w is exact (or wrong by SCALE)."""
    SCALE = 2.0

    def fd_objective(self, p, layers, x, target):
        arrays = [a for layer in layers for a in layer.params]
        return FDCheck(lambda: float(sum(np.sum(a ** 2) for a in arrays)),
                       [self.SCALE * a.copy() for a in arrays], rtol=1e-7, rule="test")


class WrongSTBP(QuadraticSTBP):
    SCALE = 2.1


class NoFD(STBP):
    fd_objective = Method.fd_objective


class QuarticSTBP(STBP):
    """Σ w⁴ at h = 1e-2: the plain central difference is off by 4h²w (fails the 1e-7 rule);
    Richardson's h/2 combination cancels the h² term and is exact for a quartic."""

    def fd_objective(self, p, layers, x, target):
        arrays = [a for layer in layers for a in layer.params]
        for a in arrays:
            a[...] = np.linspace(0.5, 1.5, a.size).reshape(a.shape)
        return FDCheck(lambda: float(sum(np.sum(a ** 4) for a in arrays)),
                       [4.0 * a ** 3 for a in arrays], h=1e-2, rtol=1e-7, rule="test")


def test_gradcheck_passes_fails_and_says_when_there_is_no_objective(monkeypatch):
    monkeypatch.setitem(METHODS, "quad", Ref(__name__, "QuadraticSTBP"))
    monkeypatch.setitem(METHODS, "wrong", Ref(__name__, "WrongSTBP"))
    res = run(["gradcheck", "--method", "quad", "--cases", "2", "--arch", "5-3-2"])
    assert res.exit_code == 0, res.output
    assert res.output.count("passed") >= 2 and "W0" in res.output and "b1" in res.output
    res = run(["gradcheck", "--method", "wrong", "--cases", "1", "--arch", "5-3-2"])
    assert res.exit_code == 1 and "FAILED" in res.output and "0 of 1 cases passed" in res.output
    monkeypatch.setitem(METHODS, "nofd", Ref(__name__, "NoFD"))
    res = run(["gradcheck", "--method", "nofd", "--cases", "1"])
    assert res.exit_code == 1 and "no finite-difference objective" in res.output


def test_gradcheck_richardson_removes_the_truncation_error(monkeypatch):
    monkeypatch.setitem(METHODS, "quartic", Ref(__name__, "QuarticSTBP"))
    args = ["gradcheck", "--method", "quartic", "--cases", "1", "--arch", "4-3-2"]
    res = run(args)
    assert res.exit_code == 1 and "FAILED" in res.output
    res = run(args + ["--richardson"])
    assert res.exit_code == 0 and "Richardson h/2" in res.output, res.output


# ---- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_then_resume_then_eval_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--method", "stbp", "--n-train", "1000", "--n-test", "300", "--epochs", "2",
            "--out", str(out), "--quiet"]
    res = run(args)
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    acc = float(re.fullmatch(r"test accuracy: ([\d.]+)%", last).group(1))
    assert acc > 70.0                                           # chance is 10%
    report = json.loads((out / "report.json").read_text())
    assert report["test_acc"] * 100 == pytest.approx(acc, abs=0.005)
    # the finished run, resumed with more epochs, goes on from its checkpoint
    res = run(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    res = run(["eval", str(out / "checkpoint.h5"), "--n-test", "300"])
    assert res.exit_code == 0
    assert float(re.search(r"test accuracy: ([\d.]+)%", res.stdout).group(1)) > 70.0
