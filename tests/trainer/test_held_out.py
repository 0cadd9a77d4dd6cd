"""The held-out set is held out, and every task file is checked whole before the model loads.

Train and eval are refused when they share a prompt (whitespace normalised, the answer not part of the key) unless
``allow_eval_overlap``; the built-in task uses ``--eval_file`` as its held-out set; ``eval --checkpoint`` evaluates the
checkpoint's own split (task, split, seed) unless told otherwise, and says which; prompts over ``max_prompt_length``
tokens (after the chat template) are refused by file and line before the model loads; and bad files, templates and
sizes are one line and exit status 2, never a traceback or a hang."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import pytest
import torch
from helpers.runs import saved_tiny_model

from rlvr_fast.cli import main
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.checkpoint.local import save_checkpoint
from rlvr_fast.trainer.checks.preflight import check_data
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.command import checkpoint_eval_config
from rlvr_fast.trainer.rollout.data import MAX_GENERATED_PROBLEMS, check_prompt_lengths, load_problems
from rlvr_fast.trainer.schema import ConfigFieldError


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A saved tiny model with a character tokenizer (one token per character, no chat template): the model-source
    check passes and the preflight tokenizer loads in milliseconds."""
    return saved_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Reaching the model load is the failure: every check here must come first."""
    import rlvr_fast.trainer.evaluation.command as evaluate_cli
    import rlvr_fast.trainer.loop as loop

    def refuse(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loop, "load_model", refuse)
    monkeypatch.setattr(evaluate_cli, "load_model", refuse)


def write_jsonl(path, prompts, answer="5") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "answer": answer}) + "\n")
    return str(path)


def prompts(split: str, n: int) -> list[str]:
    return [f"{split} {i}: {i % 6} + {5 - i % 6} =" for i in range(n)]


def jsonl_config(tmp_path, train=None, evaluation=None, **overrides) -> RLVRConfig:
    values = dict(
        task=train or write_jsonl(tmp_path / "train.jsonl", prompts("train", 12)),
        eval_file=evaluation or write_jsonl(tmp_path / "eval.jsonl", prompts("eval", 4)),
        train_size=12,
        eval_size=4,
        prompts_per_step=2,
        output_dir=str(tmp_path / "run"),
    )
    values.update(overrides)
    return RLVRConfig(**values).validate()


def cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- train and eval are disjoint ---------------------------------------------------------------------------------


def test_the_training_file_as_its_own_eval_file_is_refused_by_name(tmp_path):
    cfg = jsonl_config(tmp_path)
    same = jsonl_config(tmp_path, evaluation=cfg.task)
    with pytest.raises(ConfigFieldError, match=r"4 of the 4 held-out problems") as info:
        load_problems(same)
    message = str(info.value)
    assert info.value.field == "eval_file" and message.count(cfg.task) >= 2  # both sides name the file
    assert "train.jsonl, line 1 = " in message and "--allow_eval_overlap true" in message
    assert load_problems(jsonl_config(tmp_path))[1][0].prompt == "eval 0: 0 + 5 ="  # disjoint files load


def test_overlap_ignores_whitespace_and_answers_and_names_both_files(tmp_path):
    """An eval file that is a subset of the training file, re-spaced and relabelled, is still the same problems."""
    train = prompts("train", 12)
    evaluation = write_jsonl(
        tmp_path / "eval.jsonl", ["held 1", f"  {train[3]}\t", train[7].replace(" ", "   "), "held 2"], answer="4"
    )
    cfg = jsonl_config(tmp_path, evaluation=evaluation)
    with pytest.raises(ConfigFieldError, match=r"2 of the 4 held-out problems") as info:
        load_problems(cfg)
    message = str(info.value)
    assert f"{evaluation}, line 2 = {cfg.task}, line 4" in message
    assert f"{evaluation}, line 3 = {cfg.task}, line 8" in message
    train_set, eval_set = load_problems(jsonl_config(tmp_path, evaluation=evaluation, allow_eval_overlap=True))
    assert len(train_set) == 12 and len(eval_set) == 4  # knowingly accepted


def test_allow_eval_overlap_is_a_documented_flag_that_may_change_on_resume(capsys):
    from rlvr_fast.trainer.schema import field_specs

    assert RLVRConfig().allow_eval_overlap is False
    assert field_specs(RLVRConfig)["allow_eval_overlap"].may_change_on_resume
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--allow_eval_overlap" in capsys.readouterr().out


def test_built_in_task_uses_the_eval_file_and_checks_it(tmp_path):
    base = RLVRConfig(output_dir=str(tmp_path / "run"))
    generated_train, _ = load_problems(base)
    held = write_jsonl(tmp_path / "held.jsonl", ["What is 100 + 100? Reply with just the number.", "other"])
    train, evaluation = load_problems(RLVRConfig(eval_file=held, output_dir=str(tmp_path / "run")))
    assert [p.prompt for p in evaluation] == ["What is 100 + 100? Reply with just the number.", "other"]
    assert evaluation[0].where == f"{held}, line 1" and len(train) == base.train_size
    leaked = write_jsonl(tmp_path / "leaked.jsonl", ["other", generated_train[5].prompt])
    with pytest.raises(ConfigFieldError, match=r"1 of the 2 held-out problems .*built-in task 'tiny'") as info:
        load_problems(RLVRConfig(eval_file=leaked, output_dir=str(tmp_path / "run")))
    assert f"{leaked}, line 2 = built-in task 'tiny', train problem" in str(info.value)


# ---- eval --checkpoint evaluates the checkpoint's own split ----------------------------------------------------


def fake_checkpoint(tmp_path, cfg: RLVRConfig) -> str:
    """A checkpoint that verifies, holding ``cfg`` as its run's config (its weights are a stand-in module's)."""
    model = torch.nn.Linear(2, 2)
    return save_checkpoint(
        str(tmp_path / "run"), 3, model, torch.optim.AdamW(model.parameters()), {"config": cfg.to_dict()}
    )


def test_eval_checkpoint_uses_the_saved_seed_and_says_so(tmp_path, tiny_model, capsys, monkeypatch, no_model_load):
    """Evaluating a --seed 1 run without repeating --seed 1 used to score a split 22 of 40 of whose problems that run
    trained on."""
    import rlvr_fast.trainer.evaluation.command as evaluate_cli

    trained = RLVRConfig(model=tiny_model, seed=1, output_dir=str(tmp_path / "run"))
    checkpoint = fake_checkpoint(tmp_path, trained)
    seen = []
    monkeypatch.setattr(evaluate_cli, "run_eval", lambda cfg, checkpoint=None: seen.append(cfg) or "scored")

    code, out, err = cli(["eval", "--model", tiny_model, "--checkpoint", checkpoint], capsys)
    assert code == 0, err
    assert seen[0].seed == 1 and load_problems(seen[0])[1] == load_problems(trained)[1]
    assert "eval: using the checkpoint's task='arithmetic', task_params={}, task_preset='tiny'" in out
    assert "seed=1" in out
    assert os.path.join(checkpoint, "trainer_state.json") in out

    code, out, err = cli(["eval", "--model", tiny_model, "--checkpoint", checkpoint, "--seed", "2"], capsys)
    assert code == 0, err
    assert seen[1].seed == 2 and "seed=1" not in out.split("(saved in")[0]
    assert "using seed=2 from the command line, not the checkpoint's 1" in out


def test_eval_checkpoint_of_a_jsonl_run_uses_its_files(tmp_path, tiny_model):
    # a model that is installed wherever the suite runs (the README's test install has no default model)
    trained = jsonl_config(tmp_path, train_size=10, eval_size=3, seed=4, model=tiny_model)
    checkpoint = fake_checkpoint(tmp_path, trained)
    lines = []
    cfg = checkpoint_eval_config(RLVRConfig(eval_size=2), checkpoint, frozenset({"eval_size"}), lines.append)
    assert (cfg.task, cfg.eval_file, cfg.train_size, cfg.seed, cfg.eval_size) == (
        trained.task, trained.eval_file, 10, 4, 2)  # fmt: skip
    assert "eval_size=2 from the command line, not the checkpoint's 3" in lines[-1]


# ---- prompts are measured in tokens before the model loads -----------------------------------------------------


def test_an_overlong_prompt_is_refused_before_the_model_loads_by_file_and_line(
    tmp_path, tiny_model, capsys, no_model_load
):
    """A prompt over max_prompt_length used to fail at the step that first drew it, naming neither file nor line."""
    train = prompts("train", 12)
    train[8] = "x" * 40  # 40 characters: 40 tokens with the character tokenizer
    cfg = jsonl_config(tmp_path, train=write_jsonl(tmp_path / "train.jsonl", train))
    argv = ["train", "--model", tiny_model, "--task", cfg.task, "--eval_file", cfg.eval_file, "--train_size", "12"]
    argv += ["--prompts_per_step", "2", "--max_prompt_length", "32", "--output_dir", str(tmp_path / "out")]
    code, _, err = cli(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{cfg.task}, line 9: 40 tokens, more than max_prompt_length=32" in err


def test_prompt_lengths_count_the_system_prompt_and_the_eval_file(tmp_path, tiny_model):
    from rlvr_fast.trainer.checks.preflight import tokenizer_for_checks

    cfg = jsonl_config(tmp_path, model=tiny_model, max_prompt_length=32)
    check_data(cfg)  # the longest prompt, "train 10: 4 + 1 =", has 17 characters
    with pytest.raises(ConfigFieldError, match=rf"16 prompt\(s\) .* the first {cfg.task}, line 1: 34 tokens"):
        check_data(jsonl_config(tmp_path, model=tiny_model, max_prompt_length=32, system_prompt="s" * 16))
    long_eval = write_jsonl(tmp_path / "long_eval.jsonl", ["short", "e" * 33])
    with pytest.raises(ConfigFieldError, match=rf"{long_eval}, line 2: 33 tokens, more than max_prompt_length=32"):
        check_data(jsonl_config(tmp_path, evaluation=long_eval, model=tiny_model, max_prompt_length=32))
    train, evaluation = load_problems(cfg)
    check_prompt_lengths(cfg, tokenizer_for_checks(tiny_model), [*train, *evaluation])  # the same measure, no error


# ---- bad input is one line, exit 2, before the model loads ------------------------------------------------------


def bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    good = jsonl_config(tmp_path)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "a", "answer": "1"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b \\ud800", "answer": "1"}\n')
    long_line = tmp_path / "long.jsonl"
    long_line.write_bytes(b'{"prompt": "' + b"x" * (2 << 20) + b'", "answer": "1"}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    task = ["--task", good.task, "--eval_file"]
    return {
        "template {0}": (["--prompt_template", "{expression}{0}"], r"RLVRConfig.prompt_template: .*\['\{0\}'\]"),
        "template {foo}": (["--prompt_template", "{expression}{foo}"], r"RLVRConfig.prompt_template: .*\['\{foo\}'\]"),
        "nested brackets": ([*task, str(deep)], rf"RLVRConfig.eval_file: {deep}, line 2: invalid JSON: nested"),
        "lone surrogate": ([*task, str(surrogate)], rf"{surrogate}, line 2: field 'prompt' holds a lone surrogate"),
        "line over 1 MiB": ([*task, str(long_line)], rf"{long_line}, line 1: line longer than 1048576 bytes .*1 MiB"),
        "invalid UTF-8": ([*task, str(latin1)], rf"{latin1}, line 2: invalid UTF-8"),
        "/dev/zero": (["--task", "/dev/zero", "--eval_file", good.eval_file], r"/dev/zero: .*a character device"),
        "a FIFO": (["--task", str(fifo), "--eval_file", good.eval_file], r"fifo: .*a FIFO"),
        "train_size 1e9": (
            ["--train_size", "1000000000"],
            rf"RLVRConfig.train_size .*at most {MAX_GENERATED_PROBLEMS}",
        ),
        "tiny preset exhausted": (["--train_size", "100"], r"train_size=100 \+ eval_size=40 .*at most 121"),
    }


def test_bad_data_is_one_line_and_exit_2_before_the_model_loads(tmp_path, tiny_model, capsys, no_model_load):
    """Each used to give a traceback and exit 1, or (--task /dev/zero, --train_size 1000000000) never ended."""
    for what, (flags, pattern) in bad_inputs(tmp_path).items():
        start = time.monotonic()
        code, _, err = cli(["train", "--model", tiny_model, "--output_dir", str(tmp_path / "out"), *flags], capsys)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (what, err)
        assert re.search(pattern, err), (what, err)
        assert time.monotonic() - start < 30, what


# ---- eval --checkpoint evaluates the checkpoint's model; templates are never formatted ----------------------------


def checkpoint_with_state(folder, state: dict) -> str:
    """A checkpoint that verifies, in ``folder``, holding ``state`` as its trainer state."""
    model = torch.nn.Linear(2, 2)
    return save_checkpoint(str(folder), 1, model, torch.optim.AdamW(model.parameters()), state)


def test_eval_checkpoint_uses_the_saved_model_and_its_generation_lengths(tmp_path, capsys, monkeypatch, tiny_model):
    """Re-probe F5: without --model, eval loaded the default SmolLM2 and then failed the strict weight load."""
    import rlvr_fast.trainer.evaluation.command as evaluate_cli

    trained = RLVRConfig(model=tiny_model, max_prompt_length=64, max_completion_length=16, top_p=0.9)
    checkpoint = checkpoint_with_state(tmp_path / "run", {"config": trained.to_dict()})
    seen = []
    monkeypatch.setattr(evaluate_cli, "run_eval", lambda cfg, checkpoint=None: seen.append(cfg) or "scored")
    code, out, err = cli(["eval", "--checkpoint", checkpoint, "--eval_samples", "2"], capsys)
    assert code == 0, err
    assert (seen[0].model, seen[0].max_prompt_length, seen[0].max_completion_length, seen[0].top_p) == (
        tiny_model, 64, 16, 0.9)  # fmt: skip
    assert seen[0].eval_samples == 2  # an evaluation setting: the user's
    assert f"eval: using the checkpoint's model={tiny_model!r}, task='arithmetic'" in out
    assert "max_prompt_length=64, max_completion_length=16, top_p=0.9" in out and "eval_samples" not in out

    code, out, err = cli(["eval", "--checkpoint", checkpoint, "--max_prompt_length", "100"], capsys)
    assert code == 0, err
    assert seen[1].max_prompt_length == 100 and "using max_prompt_length=100 from the command line" in out


def test_eval_checkpoint_with_a_missing_saved_model_names_it(tmp_path, capsys, no_model_load):
    gone = str(tmp_path / "gone-model")
    os.makedirs(gone)  # validate() does not look at the folder; the model-source check does, once it is gone
    checkpoint = checkpoint_with_state(tmp_path / "run", {"config": {**RLVRConfig(model=gone).to_dict()}})
    os.rmdir(gone)
    code, _, err = cli(["eval", "--checkpoint", checkpoint, "--device", "cpu"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "RLVRConfig.model" in err and gone in err and "trainer_state.json" in err


def test_eval_checkpoint_of_another_model_shape_is_refused_before_the_model_loads(
    tmp_path, tiny_model, capsys, no_model_load
):
    other = tmp_path / "other"
    tokenizer = char_tokenizer()
    tiny_causal_lm(tokenizer, layers=3).save_pretrained(str(other))
    tokenizer.save_pretrained(str(other))
    checkpoint = checkpoint_with_state(tmp_path / "run", {"config": RLVRConfig(model=str(other)).to_dict()})
    capsys.readouterr()  # the save's progress bar
    code, _, err = cli(["eval", "--model", tiny_model, "--checkpoint", checkpoint], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"RLVRConfig.model {tiny_model!r}: expected the checkpoint's model {str(other)!r}" in err
    assert "layers=2" in err and "layers=3" in err


@pytest.mark.parametrize("config", [[1, 2], "seed: 1"])
def test_eval_checkpoint_whose_config_is_not_a_mapping_is_refused(
    tmp_path, tiny_model, capsys, monkeypatch, config, no_model_load
):
    """It evaluated with this command's defaults: another split, silently."""
    import rlvr_fast.trainer.checkpoint.local as checkpoint_module

    with monkeypatch.context() as patch:  # save_checkpoint hashes a mapping; a hand-made state need not be one
        patch.setattr(checkpoint_module, "hash_of_run_config", lambda config: None)
        checkpoint = checkpoint_with_state(tmp_path / "run", {"config": config})
    code, _, err = cli(["eval", "--model", tiny_model, "--checkpoint", checkpoint], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "the checkpoint's config is unreadable" in err and f"got {type(config).__name__}" in err


@pytest.mark.parametrize("template", ["{expression:>99999999999}", "{expression!r}", "{expression:{expression}}"])
def test_a_format_spec_in_the_template_is_refused_unformatted(tmp_path, tiny_model, capsys, template, no_model_load):
    """Re-probe F6: the template was formatted with the user's spec: MemoryError, a traceback and exit 1."""
    argv = ["train", "--model", tiny_model, "--output_dir", str(tmp_path / "out"), "--prompt_template", template]
    code, _, err = cli(argv, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "RLVRConfig.prompt_template" in err and "the bare '{expression}'" in err and repr(template) in err

    saved = {**RLVRConfig(model=tiny_model).to_dict(), "prompt_template": template}  # a tampered trainer_state.json
    checkpoint = checkpoint_with_state(tmp_path / "run", {"config": saved})
    code, _, err = cli(["eval", "--checkpoint", checkpoint], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "RLVRConfig.prompt_template" in err and "trainer_state.json" in err


def test_a_file_shorter_than_its_size_is_used_whole_and_said_once(tmp_path, capsys):
    cfg = jsonl_config(tmp_path, train_size=1_000_000_000, eval_size=1_000_000)
    train, evaluation = load_problems(cfg)
    load_problems(cfg)  # the preflight and the run load twice: one notice each
    assert (len(train), len(evaluation)) == (12, 4)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert f"RLVRConfig.train_size=1000000000 asks for more problems than task {cfg.task} has" in lines[0]
    assert "all 12 of its problem lines" in lines[0]
    assert f"RLVRConfig.eval_size=1000000 asks for more problems than eval_file {cfg.eval_file}" in lines[1]
    load_problems(jsonl_config(tmp_path))  # exactly the file's size: nothing to say
    assert capsys.readouterr().err == ""


def test_an_empty_eval_file_reads_as_a_path():
    with pytest.raises(ConfigFieldError, match=r"^RLVRConfig.eval_file must be a non-empty path or None, got ''$"):
        RLVRConfig(eval_file="").validate()


def test_a_template_given_with_a_jsonl_task_is_checked_and_said(tmp_path, capsys):
    """With a JSONL task the template is not used: a bad one is still refused by name, a good one other than the
    default is said once (it used to be accepted without a word, never applied)."""
    cfg = jsonl_config(tmp_path)
    with pytest.raises(ConfigFieldError, match="prompt_template"):
        load_problems(dataclasses.replace(cfg, prompt_template="{expression:>99999999999}"))
    custom = dataclasses.replace(cfg, prompt_template="Q: {expression} =")
    load_problems(custom)
    load_problems(custom)
    err = capsys.readouterr().err
    assert err.count("applies to the built-in task only") == 1, err
