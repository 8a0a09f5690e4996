"""refsnn compare / refsnn sweep (refsnn/sweep.py): sweep files, run folders, resume, tables.

Every run here is tiny (40 train / 20 test digits of mnist10k, 784-20-10, T 4): the tests check
the bookkeeping (which runs train, which are skipped or resumed, what the tables say), not
accuracy.
"""

import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from refsnn.cli import main
from refsnn.errors import ConfigError
from refsnn.sweep import RUNS, expand, load_sweep

ROOT = Path(__file__).parent.parent
TOML = pytest.mark.skipif(sys.version_info < (3, 11) and not importlib.util.find_spec("tomli"),
                          reason="reading TOML needs Python >= 3.11 or tomli")
TINY = {"arch": "784-20-10", "epochs": 1, "T": 4, "n_train": 40, "n_test": 20}


def toml(path, text):
    path.write_text(text)
    return path


def tiny_toml(extra=""):
    return ("[train]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items())
            + "\n" + extra)


def reports(root):
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((root / RUNS).glob("*/report.json"))}


def attempts(root, name):
    return [json.loads(line) for line in (root / "log" / f"{name}.jsonl").read_text().splitlines()]


def epochs_logged(root, name):
    lines = (root / RUNS / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


# --------------------------------------------------------------------------------------------
# the sweep file
# --------------------------------------------------------------------------------------------

def test_grid_expands_to_methods_x_points_x_seeds_with_stable_names():
    data = {"methods": ["stbp", "spikebp"], "seeds": 2, "train": dict(TINY),
            "grid": {"lr": [1e-3, 2e-3], "params": {"v_th": [0.5, 1.0]}}}
    runs = expand(data).runs
    assert len(runs) == 2 * 4 * 2
    assert len({r.name for r in runs}) == len(runs)
    assert [r.name for r in expand(data).runs] == [r.name for r in runs]     # deterministic
    r = runs[0]
    assert (r.method, r.seed, r.config.lr, r.config.params["v_th"]) == ("stbp", 0, 1e-3, 0.5)
    assert r.label == "lr=0.001 v_th=0.5" and r.name.startswith("stbp-lr0.001-v_th0.5-s0-")
    # each method keeps its own defaults where nothing overrides them
    assert runs[-1].config.optimizer == "sgd" and r.config.optimizer == "adam"
    # another epochs count is another run (a new hash), never the old folder
    other = expand({**data, "train": {**TINY, "epochs": 2}}).runs
    assert {x.name for x in other}.isdisjoint({x.name for x in runs})


def test_run_tables_presets_and_per_method_options():
    data = {"train": dict(TINY), "method": {"tsslbp": {"params": {"tau_s": 3.0}}},
            "run": [{"method": "tsslbp", "lr": 3e-3, "seeds": [5, 7]},
                    {"method": "hm2bp", "preset": "fashion-mnist-mlp", "T": 6,
                     "dataset": "mnist10k", "params": {"desired_count": 3.0}}]}
    runs = expand(data).runs
    assert [(r.method, r.seed) for r in runs] == [("tsslbp", 5), ("tsslbp", 7), ("hm2bp", 0)]
    assert runs[0].config.params["tau_s"] == 3.0 and runs[0].config.lr == 3e-3
    assert runs[2].config.arch == "784-20-10"                # [train] beats the preset's arch
    assert runs[2].config.T == 6 and runs[2].config.params["desired_count"] == 3.0
    assert runs[2].label == "T=6 dataset=mnist10k desired_count=3"


@TOML
@pytest.mark.parametrize("text, words", [
    ("methods = [\"stbp\"\nseeds = 2\n", "not valid TOML"),
    ("methods = [\"stbp\"]\nsedes = 2\n", "unknown top-level key(s) sedes"),
    ("methods = [\"stbp\"]\n[train]\nepochs = \"3\"\n", "train.epochs = '3' should be an integer"),
    ("methods = [\"stbp\"]\n[train]\nlr = true\n", "train.lr = True should be a number"),
    ("methods = [\"stpb\"]\n", "unknown method 'stpb'"),
    ("methods = [\"stbp\"]\n[grid]\nlr = []\n", "grid.lr is an empty list"),
    ("methods = [\"stbp\"]\n[grid]\nlearning_rate = [1]\n", "unknown key grid.learning_rate"),
    ("methods = [\"stbp\", \"hm2bp\"]\n[train.params]\nsurrogate = \"rect\"\n",
     "surrogate is not a parameter of hm2bp"),
    ("seeds = 2\n", "the sweep holds no run"),
    ("methods = []\n", "should be a non-empty list"),
    ("methods = [\"stbp\"]\nseeds = 0\n", "seeds = 0"),
    ("[[run]]\nlr = 0.1\n", "needs method"),
    ("methods = [\"stbp\"]\n[train]\nseed = 3\n", "top-level key `seeds`"),
    ("methods = [\"stbp\"]\n[train]\noptimizer = \"adamm\"\n", "optimizer 'adamm' is unknown"),
    ("methods = [\"stbp\"]\n[train.params]\nv_th = \"high\"\n", "stbp"),
])
def test_a_malformed_sweep_file_is_one_error_line(tmp_path, text, words):
    path = toml(tmp_path / "bad.toml", text)
    res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output
    assert str(path) in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "o").exists()                     # nothing trained, nothing written
    with pytest.raises(ConfigError):
        load_sweep(path)


@TOML
def test_a_missing_sweep_file(tmp_path):
    res = CliRunner().invoke(main, ["sweep", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "no sweep file" in res.output


@TOML
def test_the_example_files_and_the_docs_example_parse():
    paths = sorted((ROOT / "examples").glob("sweep_*.toml"))
    assert len(paths) >= 2
    for path in paths:
        sweep = load_sweep(path)
        assert sweep.out and {r.method for r in sweep.runs} == set(sweep.paper)
    import re
    tomllib = pytest.importorskip("tomllib")
    block = re.search(r"```toml\n(.*?)```", (ROOT / "docs" / "sweep.md").read_text(), re.S)
    runs = expand(tomllib.loads(block.group(1))).runs
    assert len(runs) == 2 * 4 * 3 + 1
    tss = [r for r in runs if r.method == "tsslbp"]
    assert all(r.config.T == 5 and r.config.params["tau_s"] == 3.0 for r in tss)
    assert {r.config.lr for r in tss} == {1e-3, 3e-3}


# --------------------------------------------------------------------------------------------
# compare: runs in this process, tables that agree with the runs' reports
# --------------------------------------------------------------------------------------------

def test_compare_writes_tables_that_match_the_reports(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "stbp,spikebp", "--arch", TINY["arch"], "--epochs", "1",
            "--steps", "4", "--n-train", "40", "--n-test", "20", "--seeds", "2", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    reps = reports(out)
    assert len(reps) == 4 and sorted(r["method"] for r in reps.values()) == \
        ["spikebp", "spikebp", "stbp", "stbp"]
    for rep in reps.values():
        assert rep["T"] == 4 and rep["arch"] == "784-20-10" and rep["n_train"] == 40
        assert rep["spikes_per_sample"] >= 0 and rep["peak_rss_mb"] > 0
    import csv
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == ["stbp", "spikebp"]
    for row in rows:
        mine = [r for r in reps.values() if r["method"] == row["method"]]
        acc = [100 * r["test_acc"] for r in mine]
        assert row["runs"] == "2" and row["seeds"] == "0 1"
        assert float(row["test_acc_pct_mean"]) == pytest.approx(statistics.mean(acc), rel=1e-12)
        assert float(row["test_acc_pct_std"]) == pytest.approx(statistics.stdev(acc),
                                                               rel=1e-12, abs=1e-12)
        assert float(row["spikes_per_sample_mean"]) == pytest.approx(
            statistics.mean(r["spikes_per_sample"] for r in mine), rel=1e-12)
        assert float(row["seconds_per_epoch_mean"]) == pytest.approx(
            statistics.mean(r["seconds"] / r["epochs"] for r in mine), rel=1e-12)
        assert float(row["peak_rss_mb_max"]) == max(r["peak_rss_mb"] for r in mine)
    per_run = list(csv.DictReader(open(out / "runs.csv")))
    assert len(per_run) == 4
    for r in per_run:
        assert float(r["test_acc_pct"]) == 100 * reps[r["name"]]["test_acc"]
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| stbp |") and table[2].startswith("| spikebp")
    assert res.output.count("| stbp |") == 1                  # the table is printed too
    # spikes: the metric is the test-set count, equal in the last epoch's metrics line
    for name, rep in reps.items():
        last = json.loads((out / RUNS / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["spikes_per_sample"] == rep["spikes_per_sample"]
    # the same command again trains nothing: every report stays as it was
    before = {p: p.stat().st_mtime_ns for p in (out / RUNS).glob("*/report.json")}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "4 finished" in res.output
    assert {p: p.stat().st_mtime_ns for p in (out / RUNS).glob("*/report.json")} == before
    assert all(len(attempts(out, n)) == 1 for n in reps)


def test_spikes_per_sample_counts_every_spiking_layer():
    """evaluate()'s count equals the layers' spike rates (Method.layer_summary) times their
    sizes and T, over the same batches and the same random encoding."""
    import numpy as np

    from refsnn.config import TrainConfig
    from refsnn.methods import get_method
    from refsnn.train import batch_input, build_network, evaluate, load_data
    cfg = TrainConfig(arch="784-30-20-10", T=5, n_train=40, n_test=30, batch_size=8, seed=3,
                      params={"decay": 0.5, "v_th": 0.3})
    m = get_method("stbp")
    rng = np.random.default_rng(0)
    ds = load_data(cfg, rng)
    net = build_network(cfg, m, m.Params.from_dict(cfg.params), rng)
    counts = {}
    acc = evaluate(net, ds, cfg, np.random.default_rng(1), counts=counts)
    assert acc == evaluate(net, ds, cfg, np.random.default_rng(1))     # same predictions
    rng, total = np.random.default_rng(1), 0.0
    for s in range(0, ds.n_test, cfg.batch_size):
        idx = np.arange(s, min(s + cfg.batch_size, ds.n_test))
        trace = net.forward(batch_input(cfg, ds, "test", idx, rng, np.float64))
        for li in net.spiking_layers():
            size = int(np.prod(net.layers[li].out_shape))
            total += m.layer_summary(trace.states[li])["spike_rate"] * cfg.T * size * len(idx)
    assert total > 0
    assert counts["spikes_per_sample"] == pytest.approx(total / ds.n_test, rel=1e-12)


# --------------------------------------------------------------------------------------------
# sweep on Dask
# --------------------------------------------------------------------------------------------

@TOML
def test_two_run_sweep_on_a_local_cluster(tmp_path):
    pytest.importorskip("dask.distributed")
    path = toml(tmp_path / "two.toml", 'methods = ["stbp"]\n' + tiny_toml(
        "[grid]\nlr = [1e-3, 2e-3]\n"))
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "LocalCluster: 2 worker processes" in res.output
    reps = reports(out)
    assert sorted(r["config"]["lr"] for r in reps.values()) == [1e-3, 2e-3]
    for name in reps:
        assert epochs_logged(out, name) == [1]
        assert attempts(out, name)[0]["pid"] != os.getpid()   # trained in a worker process
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted(r["name"] for r in sweep["runs"]) == sorted(reps)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "lr=0.001" in rows[1] and "lr=0.002" in rows[2]


@TOML
def test_sweep_on_a_running_scheduler(tmp_path):
    dd = pytest.importorskip("dask.distributed")
    path = toml(tmp_path / "one.toml", 'methods = ["spikebp"]\n' + tiny_toml())
    out = tmp_path / "sw"
    with dd.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster:
        res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--scheduler",
                                        cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    assert "LocalCluster" not in res.output                     # no embedded cluster
    (name,) = reports(out)
    assert attempts(out, name)[0]["pid"] != os.getpid()
    assert (out / "results.csv").read_text().count("spikebp") == 1


def _start(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "refsnn", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(cond, proc, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail("the sweep ended before the moment to interrupt it:\n"
                        + proc.stdout.read().decode())
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("timed out waiting for the sweep")
        time.sleep(0.02)


# runs long enough (about a second per epoch here) to be caught in the middle
SLOW = {"arch": "784-20-10", "epochs": 6, "T": 4, "n_train": 400, "n_test": 20,
        "batch_size": 20}


def slow_toml(path, lrs):
    return toml(path, 'methods = ["stbp"]\n[train]\n'
                + "\n".join(f"{k} = {json.dumps(v)}" for k, v in SLOW.items())
                + f"\n[grid]\nlr = {json.dumps(lrs)}\n")


@TOML
def test_a_killed_sweep_resumes_with_no_run_lost_or_run_twice(tmp_path):
    pytest.importorskip("dask.distributed")
    path = slow_toml(tmp_path / "s.toml", [1e-3, 2e-3, 3e-3])
    out = tmp_path / "sw"
    names = [r.name for r in load_sweep(path).runs]
    folders = [out / RUNS / n for n in names]
    proc = _start(["sweep", str(path), "--out", str(out), "--workers", "1"], tmp_path)

    def one_done_one_midway():
        done = [f for f in folders if (f / "report.json").exists()]
        midway = [f for f in folders if (f / "checkpoint.h5").exists()
                  and not (f / "report.json").exists()]
        return done and midway
    _wait_for(one_done_one_midway, proc)
    os.killpg(proc.pid, signal.SIGKILL)                      # the whole sweep, workers too
    proc.wait()
    done = {f.name: ((f / "report.json").read_bytes(), (f / "report.json").stat().st_mtime_ns,
                     (f / "checkpoint.h5").stat().st_mtime_ns)
            for f in folders if (f / "report.json").exists()}
    midway = [f.name for f in folders if (f / "checkpoint.h5").exists() and f.name not in done]
    assert 1 <= len(done) < 3 and midway

    res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert f"{len(done)} finished, {len(midway)} to resume" in res.output
    reps = reports(out)
    assert sorted(reps) == sorted(names)                     # no run lost
    for name in names:
        assert epochs_logged(out, name) == list(range(1, SLOW["epochs"] + 1))   # none twice
        assert reps[name]["epochs"] == SLOW["epochs"]
    for name, (text, mtime, ck_mtime) in done.items():       # finished runs not trained again
        f = out / RUNS / name
        assert (f / "report.json").read_bytes() == text
        assert (f / "report.json").stat().st_mtime_ns == mtime
        assert (f / "checkpoint.h5").stat().st_mtime_ns == ck_mtime
        assert len(attempts(out, name)) == 1
    for name in midway:                                      # resumed, not restarted
        tries = attempts(out, name)
        assert len(tries) == 2 and tries[0]["from_epoch"] == 0
        assert 1 <= tries[1]["from_epoch"] < SLOW["epochs"]
    for name in set(names) - set(done) - set(midway):
        assert len(attempts(out, name)) == 1


@TOML
def test_a_killed_worker_is_replaced_and_its_run_resumes(tmp_path):
    pytest.importorskip("dask.distributed")
    path = slow_toml(tmp_path / "w.toml", [1e-3])
    out = tmp_path / "sw"
    (name,) = [r.name for r in load_sweep(path).runs]
    proc = _start(["sweep", str(path), "--out", str(out), "--workers", "1"], tmp_path)
    _wait_for(lambda: (out / RUNS / name / "checkpoint.h5").exists(), proc)
    worker = attempts(out, name)[0]["pid"]
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)                          # the worker only, not the sweep
    try:
        stdout, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stdout.decode()
    tries = attempts(out, name)
    assert len(tries) == 2 and tries[1]["pid"] != worker and tries[1]["from_epoch"] >= 1
    assert epochs_logged(out, name) == list(range(1, SLOW["epochs"] + 1))
    assert (out / RUNS / name / "report.json").exists()


@TOML
def test_dry_run_lists_the_runs_and_trains_nothing(tmp_path):
    path = toml(tmp_path / "d.toml", 'methods = ["stbp", "bpsta"]\nseeds = [1, 4]\n'
                + tiny_toml())
    res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "o"),
                                    "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("new") for line in lines[:4])
    assert not (tmp_path / "o").exists()


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path):
    """hm2bp cannot fit its target count (35) in T = 4: a one-line failure, stbp still trains."""
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["compare", "--methods", "stbp,hm2bp", "--arch", "784-20-10",
                                    "--epochs", "1", "--steps", "4", "--n-train", "40",
                                    "--n-test", "20", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "FAILED hm2bp-s0-" in res.output and "desired_count" in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: 1 of 2 runs did not finish (hm2bp-s0-")
    assert [r["method"] for r in reports(out).values()] == ["stbp"]
    md = (out / "results.md").read_text()
    assert "| hm2bp |" in md and "| 0 of 1 |" in md


@TOML
def test_sweep_without_dask_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)       # import fails
    path = toml(tmp_path / "s.toml", 'methods = ["stbp"]\n' + tiny_toml())
    res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "pip install 'refsnn[sweep]'" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
