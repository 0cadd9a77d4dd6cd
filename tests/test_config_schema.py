"""Config fuzz: every RLVRConfig field, given a value of the wrong type, out of its range or at its edges, through YAML
and through flags. Bad values fail before the model loads (the loader is patched to raise), with exit status 2 and
the field named; edge values are accepted. The cases are generated from the schema, so a new field is covered by
itself."""

import math

import pytest
import yaml

from rlvr_fast.cli import main
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.schema import ConfigFieldError, field_specs

SPECS = field_specs(RLVRConfig)
# Fields whose edge values are valid only together with another field's value (cross-field rules).
COMPANIONS = {
    "group_size": {"estimator": "psr"},  # a centred estimator needs group_size >= 2
    "train_size": {"prompts_per_step": 1},
    "optimizer": {"mask_source": "random:0.1"},
    "resume": {"overwrite": False},
    "overwrite": {"resume": False},
}


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    import rlvr_fast.trainer.evaluate_cli as evaluate_cli
    import rlvr_fast.trainer.loop as loop
    import rlvr_fast.trainer.model as model

    def refuse(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model was loaded before the configuration was checked")

    for module in (loop, model, evaluate_cli):
        monkeypatch.setattr(module, "load_model", refuse)


def _step(spec):
    return 1 if spec.kind is int else 1e-3


def wrong_type_values(spec) -> list:
    values = {
        int: ["8", 1.5, True, [1]],
        float: ["0.5", "1e-5", True, math.nan, math.inf, -math.inf],
        bool: ["yes", "no", "yes please", 1, 0],
        str: [5, 1.5, ["a"], {"a": 1}],
        dict: [[1], "correct=1.0", 3],
    }[spec.kind]
    if spec.kind is str and not spec.metadata.get("allow_empty"):
        values.append("")
    return values + ([] if spec.optional else [None])


def out_of_range_values(spec) -> list:
    md, step, values = spec.metadata, _step(spec), []
    if "ge" in md:
        values.append(md["ge"] - step)
    if "gt" in md:
        values.append(md["gt"])
    if "le" in md:
        values.append(md["le"] + step)
    if "lt" in md:
        values.append(md["lt"])
    if spec.choices:
        values.append(f"no_such_{spec.name}")
    if spec.keys:
        values.append({f"no_such_{spec.name}": 1.0})
    return values


def edge_values(spec) -> list:
    md, step, values = spec.metadata, _step(spec), []
    if "ge" in md:
        values.append(md["ge"])
    if "gt" in md:
        values.append(md["gt"] + step)
    if "le" in md:
        values.append(md["le"])
    if "lt" in md:
        values.append(md["lt"] - step)
    values += list(spec.choices or ())
    return values + ([None] if spec.optional else [])


def flag_texts(spec) -> list[str]:
    """Bad values as command-line text (a flag's text is always a str, so only unparsable or out-of-range text)."""
    texts = {
        int: ["1.5", "eight", "", "1e3"],
        float: ["abc", "inf", "nan", ""],
        bool: ["maybe", "yes please", "2"],
        dict: ["[1]", "correct", "{a: "],
        str: [] if spec.metadata.get("allow_empty") else [""],
    }[spec.kind]
    if spec.kind is not str or spec.choices:
        texts += [str(v) for v in out_of_range_values(spec)]
    if not spec.optional and spec.kind not in (str, dict):
        texts.append("none")
    return texts


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_every_field_has_a_schema_with_a_known_type():
    assert set(SPECS) == set(RLVRConfig.field_names())
    for spec in SPECS.values():
        assert spec.kind in (int, float, str, bool, dict), spec
        assert wrong_type_values(spec), spec.name


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bad_yaml_value_exits_2_naming_the_field(name, tmp_path, capsys):
    spec = SPECS[name]
    path = tmp_path / "run.yaml"
    for value in wrong_type_values(spec) + out_of_range_values(spec):
        path.write_text(yaml.safe_dump({name: value}))
        code, err = run_cli(["train", "--config", str(path)], capsys)
        assert code == 2, (name, value, err)
        assert f"RLVRConfig.{name}" in err, (name, value, err)
        assert "Traceback" not in err
        with pytest.raises(ConfigFieldError) as info:  # the same check on a config built in Python
            RLVRConfig(**{name: value}).validate()
        assert info.value.field == name


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bad_flag_exits_2_naming_the_field(name, capsys):
    for text in flag_texts(SPECS[name]):
        code, err = run_cli(["train", f"--{name}", text], capsys)
        assert code == 2, (name, text, err)
        assert f"--{name}" in err, (name, text, err)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_edge_values_are_accepted(name):
    for value in edge_values(SPECS[name]):
        RLVRConfig(**{**COMPANIONS.get(name, {}), name: value}).validate()


@pytest.mark.parametrize(
    "text,field",
    [
        ("lr: 1e-5\n", "lr"),  # YAML 1.1: a string
        ("grad_accumulation: eight\n", "grad_accumulation"),
        ('top_p: "0.9"\n', "top_p"),
        ("eval_every: two\n", "eval_every"),
        ("seed: 1.5\n", "seed"),
        ('eval_calibration: "no"\n', "eval_calibration"),
        ('resume: "yes please"\n', "resume"),
        ("checkpoint_every: 0.5\n", "checkpoint_every"),
        ("lr: .inf\n", "lr"),
        ("eval_size: 0\n", "eval_size"),
        ("format_classes: {boxed: '(unclosed'}\n", "format_classes"),
        ("group_size: 1\n", "group_size"),  # grpo (the default) compares within a group: 1 trains nothing
        ("group_size: 1\nestimator: rloo\n", "group_size"),
        ("resume: true\noverwrite: true\n", "overwrite"),
    ],
)
def test_the_reported_yaml_cases_exit_2(text, field, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and f"RLVRConfig.{field}" in err, err


def test_yaml_number_string_gets_a_hint(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\n")
    _, err = run_cli(["train", "--config", str(path)], capsys)
    assert "write 1.0e-5" in err


def test_group_size_one_is_fine_for_an_uncentred_estimator():
    RLVRConfig(group_size=1, estimator="psr").validate()


def test_choices_come_from_the_registries(capsys):
    from rlvr_fast.ops.group_advantage import ESTIMATORS
    from rlvr_fast.ops.loss_types import KL_ESTIMATORS, LOSS_TYPES
    from rlvr_fast.trainer.optimizers import OPTIMIZERS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for registry in (ESTIMATORS, KL_ESTIMATORS, LOSS_TYPES, OPTIMIZERS):
        assert "{" + ",".join(registry) + "}" in text.replace("\n", "").replace(" ", "")


def test_scale_none_is_the_choice_not_python_none():
    import argparse

    from rlvr_fast.trainer.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args(["--scale", "none"])).scale == "none"
    assert config_from_args(parser.parse_args(["--scale", "null"])).scale is None


def test_kl_ratio_weighted_reaches_the_objective_and_needs_beta():
    """TRL's use_bias_correction_kl as a trainer option: it reaches the loss's objective; without a KL term it is
    refused before the model loads, naming the field."""
    from rlvr_fast.trainer.policy import objective_from_config

    assert objective_from_config(RLVRConfig(beta=0.04, kl_ratio_weighted=True).validate()).kl_ratio_weighted
    assert not objective_from_config(RLVRConfig(beta=0.04).validate()).kl_ratio_weighted
    with pytest.raises(ConfigFieldError, match=r"kl_ratio_weighted=True weights the KL term, which needs beta > 0"):
        RLVRConfig(kl_ratio_weighted=True).validate()
