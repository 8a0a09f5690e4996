"""snnTorch's Leaky neurons against the STBP oracle (examples/snntorch_stbp.py).

Where snnTorch can express the spec's model (linear reset, strict firing, variants code/sd, both
reset_grad settings) `refsnn oracle compare` must agree to 1e-12; where it cannot (the exp reset
of S3), the compare table must show the difference the example's docstring claims.
"""

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("snntorch", reason="snntorch not installed (pip install --no-deps snntorch)")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples import snntorch_stbp as ex  # noqa: E402
from refsnn.cli import main  # noqa: E402
from refsnn.conformance import compare_impl, export_cases, read_cases  # noqa: E402

EXPRESSIBLE = {
    "reset_grad_off": ["variant=code", "reset_grad=false"],     # Leaky reset_delay=True
    "reset_grad_on": ["variant=code", "reset_grad=true"],       # Leaky reset_delay=False
    "sd": ["variant=sd"],                                       # mem detached every step
}


def _export(path, pins, n=30, seed=11):
    args = ["oracle", "export", "--method", "stbp", "--cases", str(n), "--seed", str(seed),
            "--param", "reset_form=linear", "--param", "strict=true"]
    for pin in pins:
        args += ["--param", pin]
    res = CliRunner().invoke(main, args + [str(path)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("name", sorted(EXPRESSIBLE))
def test_snntorch_leaky_agrees_with_the_oracle(name, tmp_path, monkeypatch):
    out = tmp_path / f"{name}.h5"
    _export(out, EXPRESSIBLE[name])
    monkeypatch.chdir(ROOT)                    # --impl examples.snntorch_stbp:run_case
    res = CliRunner().invoke(main, ["oracle", "compare", str(out), "--impl",
                                    "examples.snntorch_stbp:run_case", "--rtol", "1e-12"])
    assert res.exit_code == 0, res.output
    assert "spikes: equal in every case" in res.output
    comp = compare_impl(out, ex.run_case)
    assert comp.passed(1e-12), comp.table(1e-12)
    assert comp.stats["grads"].cases == 30 and comp.stats["grads_b"].cases == 30
    # the surrogate switches were drawn at random across the cases
    assert len({c.args["params"]["surrogate"] for c in read_cases(out)[1]}) >= 3
    if name != "reset_grad_on":                # Leaky returns the spec's pre-reset u here
        assert comp.stats["u"].max_rel <= 1e-12


def test_exp_reset_is_not_expressible_and_the_table_shows_it(tmp_path):
    out = tmp_path / "exp.h5"
    export_cases("stbp", out, n=12, seed=4, fixed={"reset_form": "exp", "variant": "code",
                                                  "reset_grad": False, "strict": True})
    comp = compare_impl(out, ex.run_case)
    assert len(comp.errors) == 12 and all("S3" in msg for _, msg in comp.errors)
    near = compare_impl(out, ex.run_case_nearest)         # zero reset instead of τ·exp(-o/τ)
    table = near.table(1e-9)
    assert not near.passed(1e-9) and not near.errors
    # u after a spike keeps τe^{-1/τ}·u in the spec: u differs well beyond rounding
    assert near.stats["u"].max_rel > 1e-4 and near.stats["grads"].max_rel > 1e-4
    assert "u " in table and "NO" in table


def test_paper_variant_and_non_strict_firing_are_refused(tmp_path):
    out = tmp_path / "other.h5"
    export_cases("stbp", out, n=4, seed=2, fixed={"variant": "paper", "reset_form": "linear"})
    comp = compare_impl(out, ex.run_case)
    assert len(comp.errors) == 4 and all("S14" in m for _, m in comp.errors)
    export_cases("stbp", out, n=4, seed=2, fixed={"variant": "code", "reset_form": "linear",
                                                 "strict": False})
    comp = compare_impl(out, ex.run_case)
    assert len(comp.errors) == 4 and all("S4" in m for _, m in comp.errors)


def test_snntorch_custom_surrogate_is_float32_in_the_backward(tmp_path):
    """The docstring's claim: custom_surrogate's float32 spikes cost the gradient ~1e-8."""
    out = tmp_path / "f32.h5"
    _export(out, EXPRESSIBLE["reset_grad_off"], n=12)
    comp = compare_impl(out, ex.run_case_custom_surrogate)
    assert not comp.spike_mismatch and not comp.errors
    assert comp.stats["loss"].max_rel <= 1e-12 and comp.stats["u"].max_rel <= 1e-12
    assert 1e-12 < comp.stats["grads"].max_rel < 1e-6
