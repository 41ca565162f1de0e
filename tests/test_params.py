"""Parameters declared once: the tables agree with the signatures, the docstrings and the CLI."""
import argparse
import inspect
import re

import pytest

from falkon_convrfm import cli
from falkon_convrfm.deep import LAYER_PARAMS, DeepConvRFM, LayerSpec
from falkon_convrfm.feature_rfm import PatchFeatureRFM
from falkon_convrfm.params import AnyOf, Integer, Interval, OneOf, option_type, param_default
from falkon_convrfm.presets import preset_params
from falkon_convrfm.rfm import ConvRFM

OWN = {ConvRFM: set(), DeepConvRFM: {"layers", "final"}, PatchFeatureRFM: set()}  # checked through other tables


def signature(cls):
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


@pytest.mark.parametrize("cls", list(OWN))
def test_every_parameter_has_a_rule(cls):
    assert set(cls._PARAMS) | OWN[cls] == set(signature(cls))


@pytest.mark.parametrize("cls", list(OWN))
def test_defaults_pass_their_rules(cls):
    for name, param in cls._PARAMS.items():
        param.rule.check(name, param_default(cls, name))
    cls()._check_params()


def test_layer_spec_fields_have_rules():
    for name, param in LAYER_PARAMS.items():
        param.rule.check(name, param_default(LayerSpec, name))


def test_convrfm_docstring_gives_type_and_default():
    doc = ConvRFM.__doc__
    for name in signature(ConvRFM):
        match = re.search(rf"^    {name} : (.+), default (.+)$", doc, re.M)
        assert match, name
        assert match.group(2) == repr(param_default(ConvRFM, name)).replace("'", '"'), name


def test_cli_options_come_from_the_tables():
    fit = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    actions = {a.dest: a for a in fit._actions}
    for cls in (ConvRFM, PatchFeatureRFM):
        for name, param in cls._PARAMS.items():
            if param.option:
                action = actions[name]
                assert action.option_strings == [param.option] and action.help.startswith(param.help), name
                assert repr(param_default(cls, name)) in action.help, name  # the help names each model's default
    for name, param in LAYER_PARAMS.items():
        if param.option:  # --width: no default of its own; the help names each deep model's
            assert actions[name].default is None and repr(param_default(LayerSpec, name)) in actions[name].help, name


def test_fit_options_not_given_take_each_models_defaults_or_the_presets(tmp_path):
    def model(*options):
        return cli.build_model(cli.build_parser().parse_args(["fit", "--out-dir", str(tmp_path), *options]), {})

    for built, cls in ((model(), ConvRFM), (model("--model", "features"), PatchFeatureRFM)):
        assert isinstance(built, cls)
        for name in ("patch_size", "iterations", "penalty", "validation_fraction"):
            assert getattr(built, name) == param_default(cls, name), name
    preset = model("--preset", "cifar10", "--iterations", "0", "--atoms", "64")
    expected = {**preset_params("cifar10"), "iterations": 0, "n_atoms": 64}
    assert isinstance(preset, PatchFeatureRFM)
    assert all(getattr(preset, k) == v for k, v in expected.items())


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("none", None), ("0.5", 0.5), ("0", 0.0)])
def test_dc_weight_option_reads(text, value):
    assert option_type("dc_weight", ConvRFM._PARAMS["dc_weight"].rule)(text) == value


@pytest.mark.parametrize("rule, value, message", [
    (Integer(1), 0, "x must be an integer >= 1, got 0"),
    (Integer(0), True, "x must be an integer >= 0, got True"),
    (Interval(0, 1, high_open=True), 1.0, r"x must be a number in \[0, 1\), got 1.0"),
    (OneOf(("a", None)), "b", "x must be one of 'a', None; got 'b'"),
    (AnyOf((OneOf((None,)), Integer(0))), -1, "x must be an integer >= 0, got -1"),
    (AnyOf((OneOf((None,)), Integer(0))), "seed", "x must be an integer >= 0, got 'seed'"),
])
def test_rule_errors_name_the_parameter(rule, value, message):
    with pytest.raises(ValueError, match=message):
        rule.check("x", value)


def test_option_errors():
    convert = option_type("dc_weight", ConvRFM._PARAMS["dc_weight"].rule)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number >= 0, 'auto' or 'none', got 'x'"):
        convert("x")
    with pytest.raises(argparse.ArgumentTypeError, match=r"dc_weight must be a number in \[0, inf\]"):
        convert("-1")


def test_a_name_that_is_no_device_is_named_as_such():
    device = ConvRFM._PARAMS["device"].rule
    with pytest.raises(ValueError, match="device must be a device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu0'"):
        device.check("device", "gpu0")
    assert device.check("device", "cpu") == "cpu"
