"""Golden-vector files: export, re-check, compare another implementation, and bad files."""

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from refsnn.cli import main
from refsnn.conformance import FORMAT_VERSION, check_file, compare_impl, export_cases, read_cases
from refsnn.errors import CheckpointError
from refsnn.oracle import run_case


@pytest.fixture(scope="module")
def stbp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / "stbp.h5"
    export_cases("stbp", path, n=6, seed=3)
    return path


def test_export_then_check_agrees_and_stores_every_quantity(stbp_file):
    method, cases = read_cases(stbp_file)
    assert method == "stbp" and len(cases) == 6
    for key in ("spikes", "grads", "u", "delta", "h"):
        assert key in cases[0].expected
    comp = check_file(stbp_file)
    assert comp.passed(1e-12), comp.table(1e-12)
    # a switch was drawn at random for every case: at least two variants over six cases
    assert len({c.args["params"]["variant"] for c in cases}) >= 2


def perturbed_grads(method, weights, inputs, **kw):
    out = run_case(method, weights, inputs, **kw)
    out["grads"] = [g * (1 + 1e-6) for g in out["grads"]]
    return out


def flipped_spike(method, weights, inputs, **kw):
    out = run_case(method, weights, inputs, **kw)
    out["spikes"][-1] = out["spikes"][-1].copy()
    out["spikes"][-1][0, 0] = 1 - out["spikes"][-1][0, 0]
    return out


def raises_on_odd(method, weights, inputs, **kw):
    if weights[0].shape[1] % 2:
        raise RuntimeError("boom")
    return run_case(method, weights, inputs, **kw)


def test_compare_sees_small_gradient_errors_spike_flips_and_crashes(stbp_file):
    comp = compare_impl(stbp_file, perturbed_grads)
    assert not comp.passed(1e-9) and comp.passed(1e-5)
    assert comp.stats["grads"].max_rel > 1e-8
    comp = compare_impl(stbp_file, flipped_spike)
    assert comp.spike_mismatch and comp.spike_mismatch[0][0] == 0
    assert "first: case 0" in comp.table(1e-9)
    comp = compare_impl(stbp_file, raises_on_odd)
    n_odd = sum(c.args["weights"][0].shape[1] % 2 for c in read_cases(stbp_file)[1])
    assert len(comp.errors) == n_odd and all("boom" in m for _, m in comp.errors)


def test_cli_export_check_compare(tmp_path, monkeypatch):
    r = CliRunner()
    out = tmp_path / "c.h5"
    res = r.invoke(main, ["oracle", "export", "--method", "stbp", "--cases", "3", "--arch", "5-4-3",
                          str(out)])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["oracle", "check", str(out)])
    assert res.exit_code == 0 and "spikes: equal in every case" in res.output
    (tmp_path / "myimpl.py").write_text(
        "from refsnn.oracle import run_case\n"
        "def wrong(method, weights, inputs, **kw):\n"
        "    out = run_case(method, weights, inputs, **kw)\n"
        "    out['loss'] += 1.0\n"
        "    return out\n")
    monkeypatch.chdir(tmp_path)
    res = r.invoke(main, ["oracle", "compare", str(out), "--impl", "myimpl:wrong"])
    assert res.exit_code == 1 and "loss" in res.output and "NO" in res.output
    res = r.invoke(main, ["oracle", "compare", str(out), "--impl", "nosuchmodule:f"])
    assert res.exit_code == 2 and res.output.startswith("Error: --impl")
    assert res.output.count("\n") == 1 and "Traceback" not in res.output


def test_bad_files_give_one_line_errors(tmp_path, stbp_file):
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(stbp_file.read_bytes()[:2000])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    newer = tmp_path / "newer.h5"
    newer.write_bytes(stbp_file.read_bytes())
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    missing = tmp_path / "missing.h5"
    missing.write_bytes(stbp_file.read_bytes())
    with h5py.File(missing, "a") as f:
        del f["cases/00001/expected/grads"]
    for path, fragment in [(trunc, "not a readable HDF5 file"), (foreign, "not a refsnn oracle file"),
                           (newer, "newer than this refsnn reads"), (missing, "lacks the field")]:
        with pytest.raises(CheckpointError, match=fragment):
            read_cases(path)
        res = CliRunner().invoke(main, ["oracle", "check", str(path)])
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
        assert res.output.startswith("Error:")


def test_pinned_parameters_hold_in_every_case(tmp_path):
    out = tmp_path / "code.h5"
    res = CliRunner().invoke(main, ["oracle", "export", "--method", "stbp", "--cases", "4",
                                    "--param", "variant=sd", "--param", "v_th=0.8", str(out)])
    assert res.exit_code == 0, res.output
    _, cases = read_cases(out)
    assert all(c.args["params"]["variant"] == "sd" and c.args["params"]["v_th"] == 0.8
               for c in cases)
    res = CliRunner().invoke(main, ["oracle", "export", "--method", "stbp", "--param",
                                    "variant=nope", str(tmp_path / "x.h5")])
    assert res.exit_code == 2 and "variant='nope' is not valid" in res.output


def test_plain_pytorch_stbp_agrees_with_the_oracle(tmp_path):
    pytest.importorskip("torch")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from examples.torch_stbp import run_case as torch_run_case
    out = tmp_path / "stbp.h5"
    export_cases("stbp", out, n=40, seed=7, fixed={"variant": "code"})
    comp = compare_impl(out, torch_run_case)
    assert comp.passed(1e-12), comp.table(1e-12)
    assert comp.stats["grads"].cases == 40
