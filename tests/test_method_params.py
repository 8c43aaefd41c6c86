"""The method parameter table: each declaration reaches the request, the engine defaults, validation, the schema and the CLI."""

from __future__ import annotations

from dataclasses import fields

import pytest

from unmask.engine.method_params import METHOD_FIELDS, METHOD_PARAMS, MethodParam
from unmask.engine.params import CACHE_POLICIES, SCHEDULES, UNMASK_POLICIES, EngineDefaults, ParamError, SamplingParams
from unmask.server.cli import build_parser
from unmask.server.protocol import CompletionRequest

NAMES = [p.name for p in METHOD_PARAMS]


def _param(name: str) -> MethodParam:
    return next(p for p in METHOD_PARAMS if p.name == name)


@pytest.mark.parametrize("name", NAMES)
def test_each_parameter_is_a_request_field_unset_by_default(name):
    assert name in {f.name for f in fields(SamplingParams)}
    assert getattr(SamplingParams(), name) is None


@pytest.mark.parametrize("name", NAMES)
def test_each_parameter_has_its_declared_engine_default(name):
    assert getattr(EngineDefaults(), name) == _param(name).default
    resolved = SamplingParams(**{_param(name).owner[0]: _param(name).owner[1]}).resolve(EngineDefaults())
    assert getattr(resolved, name) == _param(name).default


@pytest.mark.parametrize("name", NAMES)
def test_each_parameter_belongs_to_a_method_a_request_may_choose(name):
    kind, method = _param(name).owner
    assert method in {"cache": CACHE_POLICIES, "unmask": UNMASK_POLICIES, "schedule": SCHEDULES}[kind]


@pytest.mark.parametrize("name", NAMES)
def test_a_value_below_the_declared_range_is_refused_naming_the_parameter(name):
    p = _param(name)
    below = p.low if p.low_open else p.low - (1 if p.kind is int else 1e-6)
    with pytest.raises(ParamError) as err:
        SamplingParams(**{name: below, p.owner[0]: p.owner[1]}).resolve(EngineDefaults())
    assert err.value.param == name


@pytest.mark.parametrize("name", NAMES)
def test_a_value_of_the_wrong_type_is_refused(name):
    with pytest.raises(ParamError):
        SamplingParams(**{name: "3", _param(name).owner[0]: _param(name).owner[1]}).resolve(EngineDefaults())


def test_only_exclusive_parameters_are_refused_beside_another_method():
    assert set(METHOD_FIELDS) == {p.name for p in METHOD_PARAMS if p.exclusive}
    SamplingParams(threshold=0.5, unmask="low_confidence").resolve(EngineDefaults())  # lenient: no error
    with pytest.raises(ParamError) as err:
        SamplingParams(dllm_rho=0.5, cache="none").resolve(EngineDefaults())
    assert err.value.param == "dllm_rho"


@pytest.mark.parametrize("name", NAMES)
def test_each_parameter_is_in_the_request_schema_with_its_range_and_help(name):
    schema = CompletionRequest.model_json_schema()["properties"][name]
    p = _param(name)
    number = next(s for s in schema["anyOf"] if s.get("type") in ("integer", "number"))
    assert number["type"] == ("integer" if p.kind is int else "number")
    bound = "exclusiveMinimum" if p.low_open else "minimum"
    assert number[bound] == p.low
    assert p.help in schema["description"]


@pytest.mark.parametrize("name", NAMES)
def test_each_parameter_is_a_cli_option_defaulting_to_the_engine_default(name):
    flag = "--" + name.replace("_", "-")
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert getattr(args, name) == _param(name).default
    p = _param(name)
    start = p.low if p.default is None else p.default  # a parameter that is off by default starts from its lowest value
    value = p.kind(start) + (1 if p.kind is int else 0.0)
    assert getattr(parser.parse_args(["serve", flag, str(value)]), name) == value


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "dkv", "dkv-greedy"])
def test_a_parameter_several_methods_read_is_accepted_on_each_of_them(cache):
    assert cache in _param("suffix_window").methods
    resolved = SamplingParams(suffix_window=2, cache=cache).resolve(EngineDefaults())
    assert resolved.suffix_window == 2


def test_a_parameter_several_methods_read_is_refused_beside_any_other_naming_them_all():
    with pytest.raises(ParamError) as err:
        SamplingParams(suffix_window=1, cache="freecache").resolve(EngineDefaults())
    assert err.value.param == "suffix_window"
    assert all(repr(m) in err.value.message for m in _param("suffix_window").methods)


def test_a_parameter_off_by_default_resolves_to_off():
    assert SamplingParams(cache="dual").resolve(EngineDefaults()).suffix_window is None
