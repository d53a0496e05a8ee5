"""Run configs: YAML loading, typed overrides, strict building, packaged configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from acfrec.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelSpec,
    RunConfig,
    apply_overrides,
    build_config,
    build_run_config,
    load_run_config,
    load_yaml,
    model_params,
    packaged_configs,
    split_overrides,
    unused_shared_overrides,
)
from acfrec.errors import DataValidationError
from acfrec.models import available_models, get_model


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_yaml_reads_a_mapping_and_treats_an_empty_file_as_empty(tmp_path: Path) -> None:
    assert load_yaml(write(tmp_path / "a.yaml", "data:\n  seed: 3\n")) == {"data": {"seed": 3}}
    assert load_yaml(write(tmp_path / "empty.yaml", "")) == {}


def test_load_yaml_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")
    bad = write(tmp_path / "bad.yaml", "data:\n  seed: 3\n  ks: [10, 20\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \(line \d+\) is not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_yaml(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_config_error_is_a_data_validation_error() -> None:
    assert issubclass(ConfigError, DataValidationError)


def test_apply_overrides_parses_values_as_yaml_and_leaves_the_input_alone() -> None:
    base = {"data": {"seed": 0}, "eval": {"ks": [10]}}
    out = apply_overrides(
        base, ["data.seed=7", "eval.ks=[5, 10]", "data.rating_threshold=4.5", "data.path=x.csv",
               "tracking.uri=null", "tracking.enabled=false", "model.dim=32"]
    )
    assert out == {
        "data": {"seed": 7, "rating_threshold": 4.5, "path": "x.csv"},
        "eval": {"ks": [5, 10]},
        "tracking": {"uri": None, "enabled": False},
        "model": {"dim": 32},
    }
    assert base == {"data": {"seed": 0}, "eval": {"ks": [10]}}


@pytest.mark.parametrize("override", ["noequals", "=3", "a..b=1"])
def test_malformed_overrides_are_rejected(override: str) -> None:
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides({}, [override])


def test_override_through_a_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError, match="data.seed is a int, not a section"):
        apply_overrides({"data": {"seed": 1}}, ["data.seed.x=2"])


def test_build_config_checks_types_and_coerces_int_to_float() -> None:
    data = build_config(DataConfig, {"path": "a.csv", "rating_threshold": 4, "seed": 3, "tie_rule": "item_id"})
    assert data.rating_threshold == 4.0 and isinstance(data.rating_threshold, float)
    assert (data.path, data.seed, data.tie_rule) == ("a.csv", 3, "item_id")


def test_unknown_key_names_key_file_and_suggestion() -> None:
    with pytest.raises(ConfigError) as error:
        build_run_config({"data": {"sede": 1}}, source="my.yaml")
    message = str(error.value)
    assert "my.yaml" in message and "'data.sede'" in message and "did you mean 'seed'" in message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"data": {"seed": "zero"}}, "data.seed must be int, got str 'zero'"),
        ({"data": {"seed": True}}, "data.seed must be int, got bool True"),
        ({"data": {"tie_rule": "latest"}}, "data.tie_rule must be one of 'file_order', 'item_id', 'random'"),
        ({"eval": {"ks": 10}}, "eval.ks must be a list, got int 10"),
        ({"eval": {"ks": [10, "x"]}}, r"eval.ks\[1\] must be int"),
        ({"eval": {"protocols": ["full", "sample"]}}, r"eval.protocols\[1\] must be one of 'full', 'sampled'"),
        ({"models": [{"params": {}}]}, r"models\[0\] is missing required key\(s\) models\[0\].name"),
        ({"data": 3}, "data must be a mapping, got int 3"),
        ({"data": {"rating_threshold": "high"}}, "data.rating_threshold must be a number"),
    ],
)
def test_wrong_types_are_reported_with_their_path(values: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        build_run_config(values, source="run.yaml")


def test_bare_model_names_become_specs() -> None:
    config = build_run_config({"models": ["itempop", {"name": "fism", "params": {"dim": 8}}]})
    assert config.models == [ModelSpec("itempop"), ModelSpec("fism", {"dim": 8})]


def test_load_run_config_from_file_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "data:\n  path: a.csv\nmodels: [itempop]\neval:\n  ks: [10]\n")
    config = load_run_config(path, ["eval.ks=[5,20]", "data.seed=4"])
    assert isinstance(config, RunConfig)
    assert (config.data.path, config.data.seed, config.eval.ks) == ("a.csv", 4, [5, 20])
    with pytest.raises(ConfigError, match=r"run.yaml with --set: unknown key 'eval.kss'"):
        load_run_config(path, ["eval.kss=[5]"])


def test_split_overrides_routes_sections_models_and_shared_keys() -> None:
    run, per_model = split_overrides(
        ["data.seed=1", "fism.dim=32", "epochs=2", "*.lr=0.1", "output_dir=out"], ["fism", "bpr-mf"]
    )
    assert run == ["data.seed=1", "output_dir=out"]
    assert per_model == {"fism": ["dim=32"], "*": ["epochs=2", "lr=0.1"]}
    with pytest.raises(ConfigError, match="'svdpp' is neither a config section .* nor one of the models"):
        split_overrides(["svdpp.dim=3"], ["fism"])


def test_model_params_applies_shared_overrides_only_where_the_key_exists() -> None:
    fism_config = get_model("fism").config_class
    als_config = get_model("als").config_class
    overrides = {"*": ["epochs=2", "iterations=3"], "fism": ["dim=8"]}
    fism = model_params(ModelSpec("fism", {"dim": 64, "lr": 0.01}), fism_config, overrides)
    als = model_params(ModelSpec("als"), als_config, overrides)
    assert (fism.dim, fism.epochs, fism.lr) == (8, 2, 0.01)
    assert als.iterations == 3
    assert unused_shared_overrides(overrides, [fism_config, als_config]) == []
    assert unused_shared_overrides({"*": ["epohcs=2"]}, [fism_config]) == ["epohcs=2"]
    with pytest.raises(ConfigError, match="unknown key 'fism.dimm'.*did you mean 'dim'"):
        model_params(ModelSpec("fism", {"dimm": 3}), fism_config, {})


@pytest.mark.parametrize("name", ["demo", "ml100k"])
def test_packaged_configs_are_valid_for_the_registered_models(name: str) -> None:
    assert name in packaged_configs()
    config = load_run_config(name)
    assert config.models, f"{name} lists no models"
    for spec in config.models:
        assert spec.name in available_models()
        built = model_params(spec, get_model(spec.name).config_class, {}, source=name)
        assert all(getattr(built, key) == value for key, value in spec.params.items())
    assert set(config.eval.protocols) == {"full", "sampled"}


def test_ml100k_config_does_not_hard_code_a_data_path() -> None:
    assert load_run_config("ml100k").data.path is None


def test_defaults_match_the_documented_protocol() -> None:
    config = build_run_config({})
    assert dataclasses.asdict(config.eval) == dataclasses.asdict(EvalConfig())
    assert (config.data.tie_rule, config.data.n_negatives, config.data.min_interactions) == ("file_order", 99, 3)
    assert config.tracking.enabled and config.tracking.uri is None


def test_exponent_numbers_without_a_dot_are_numbers_for_float_options(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-6 as the string "1e-6"
    path = write(tmp_path / "run.yaml", "data:\n  path: a.csv\n  rating_threshold: 1e-6\nmodels: [itempop]\n")
    assert load_run_config(path).data.rating_threshold == pytest.approx(1e-6)
    assert load_run_config(path, ["data.rating_threshold=2E+1"]).data.rating_threshold == 20.0
    with pytest.raises(ConfigError, match="must be a number"):
        load_run_config(path, ["data.rating_threshold=1e"])
