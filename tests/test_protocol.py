"""The method protocol's parameter records and the architecture notation."""

from dataclasses import dataclass

import pytest

from refsnn.errors import ConfigError
from refsnn.methods import get_method
from refsnn.methods.base import Params, param, parse_value, per_layer
from refsnn.network import LayerSpec, parse_arch


@dataclass(frozen=True)
class ToyParams(Params):
    METHOD = "toy"
    v_th: float = param(0.5, "threshold", "S4")
    decay: float = param(0.2, "per-step decay", "S2")
    surrogate: str = param("rect", "surrogate curve", "S9", choices=("rect", "sigmoid"))
    strict: bool = param(True, "fire on u > v_th", "S4")


def test_params_defaults_table_and_coercion_of_cli_strings():
    p = ToyParams.from_dict({"v_th": "0.75", "strict": "false", "surrogate": "sigmoid"})
    assert (p.v_th, p.strict, p.surrogate, p.decay) == (0.75, False, "sigmoid", 0.2)
    rows = {r.name: r for r in ToyParams.table()}
    assert rows["surrogate"].choices == ("rect", "sigmoid") and rows["v_th"].tag == "S4"


def test_unknown_parameter_lists_valid_names_and_the_renamed_spec_name():
    with pytest.raises(ConfigError) as err:
        ToyParams.from_dict({"tau": 0.3})
    msg = str(err.value)
    assert "'tau' is called 'decay'" in msg and "valid names: v_th, decay, surrogate, strict" in msg


def test_switch_outside_its_choices_is_refused():
    with pytest.raises(ConfigError, match="surrogate='gauss' is not valid"):
        ToyParams(surrogate="gauss")


def test_per_layer_values_and_value_parsing():
    assert per_layer(0.5, 1, 3) == 0.5
    assert per_layer((0.1, 0.2, 0.3), 2, 3) == 0.3
    with pytest.raises(ConfigError, match="2 values but the network has 3 spiking layers"):
        per_layer((0.1, 0.2), 0, 3)
    assert parse_value("1,2.5", "m", "v_th") == (1.0, 2.5)
    assert parse_value("3", "m", "x") == 3 and isinstance(parse_value("3", "m", "x"), int)
    assert parse_value("1e-3", "m", "x") == 1e-3


def test_arch_notation_dense_and_conv():
    assert parse_arch("784-400-10") == ((784,), [LayerSpec("dense", 400), LayerSpec("dense", 10)])
    shape, specs = parse_arch("28x28x1-32c3p1-a2-64c3s2p1-a2-128-10")
    assert shape == (1, 28, 28)
    assert specs[0] == LayerSpec("conv", n=32, k=3, stride=1, padding=1)
    assert specs[1] == LayerSpec("pool", k=2)
    assert specs[2] == LayerSpec("conv", n=64, k=3, stride=2, padding=1)


@pytest.mark.parametrize("arch, fragment", [
    ("784", "needs an input and at least one layer"),
    ("foo-10", "must be the input"),
    ("784-12x-10", "cannot read '12x'"),
    ("28x28x1-15c5", "must end with a dense output layer"),
])
def test_bad_arch_strings_say_what_to_write(arch, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_arch(arch)


def test_unknown_method_lists_the_five():
    with pytest.raises(ConfigError, match="choose one of stbp, hm2bp, tsslbp, spikebp, bpsta"):
        get_method("stdp")
