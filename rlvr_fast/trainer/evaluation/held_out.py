"""Held-out evaluation: n samples per problem, the unbiased pass@k curve with 95% confidence intervals (Chen et al.
2021), format frequencies, and calibration when the completions state a confidence (the Brier reward, RLCR)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from rlvr_fast.eval import (
    auroc,
    brier_score,
    expected_calibration_error,
    format_frequency,
    pass_at_k_summary,
)
from rlvr_fast.rewards import extract_answer, normalize_answer, parse_confidence, parse_number, reward_fn
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.rollout.data import Problem, chat_prompt
from rlvr_fast.trainer.rollout.engines import GenerationBackend
from rlvr_fast.trainer.rollout.seeds import derived_seed

EVAL_PROMPTS_PER_CALL = 16  # problems per generate call: bounds the batch (x n samples) held in memory


def evaluation_kwargs(cfg: RLVRConfig) -> dict:
    """The keyword arguments of ``evaluate`` for a run: everything besides the model and the problems that decides the
    held-out evaluation (two runs with equal kwargs and problems evaluate a model identically)."""
    return dict(
        n=cfg.eval_samples,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.eval_temperature,
        top_p=cfg.top_p,
        seed=derived_seed(cfg.seed, "eval"),  # the same samples' randomness before and after: a paired comparison
        system_prompt=cfg.system_prompt,
        format_classes=cfg.format_classes,
        with_calibration="brier" in cfg.rewards or cfg.eval_calibration,
    )


def answer_key(text: str) -> str | None:
    """The extracted final answer in a canonical form (its exact value when numeric, else the normalised text; None
    without an answer): equal keys mean the same answer."""
    answer = extract_answer(text)
    if answer is None:
        return None
    number = parse_number(answer)
    return str(number.value) if number is not None else normalize_answer(answer)


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks if ks[-1] == n else ks + [n]


@dataclass
class EvalResult:
    n: int  # samples per problem
    correct_counts: list[int]  # per problem
    pass_at_k: dict[int, dict]  # k -> {mean, se, ci_low, ci_high, problems}
    formats: dict[str, dict]  # format class -> {count, frequency, accuracy}
    calibration: dict | None  # {brier, ece, auroc, answered} when confidences were stated
    samples: list[dict]  # a few completions for the report
    # With calibration: every completion's verdict (0/1), stated confidence (None when missing), answer key
    # (``answer_key``) and text, problem-major (problem i's n samples at [i * n, (i + 1) * n)), so callers can
    # bootstrap the calibration metrics over problems and measure how often the n samples of a problem agree.
    per_completion: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def eval_dict_from_json(d: dict) -> dict:
    """An ``EvalResult.to_dict()`` read back from JSON (whose object keys are strings), as a dict again: the k keys of
    ``pass_at_k`` back to ints."""
    return {**d, "pass_at_k": {int(k): v for k, v in d["pass_at_k"].items()}}


def evaluate(
    backend: GenerationBackend,
    tokenizer,
    problems: list[Problem],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    system_prompt: str | None,
    format_classes: dict[str, str] | None = None,
    with_calibration: bool = False,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[dict], dict] | None = None,
) -> EvalResult:
    """The evaluation of ``problems``, generated in calls of EVAL_PROMPTS_PER_CALL problems, call i seeded ``seed + i *
    EVAL_PROMPTS_PER_CALL``. Split across ranks (``world_size`` > 1): rank r generates calls r, r + world_size, ...,
    and ``gather`` (the union of the ranks' dicts, e.g. ``TrainingWorld.gather_dict``) collects them, so every rank
    returns the one-process result (each call's prompts and seed are the same as on one process)."""
    verifier = reward_fn("correct")
    starts = list(range(0, len(problems), EVAL_PROMPTS_PER_CALL))
    generated: dict[int, tuple[list[str], list[float]]] = {}
    for start in starts[rank::world_size]:
        chunk = problems[start : start + EVAL_PROMPTS_PER_CALL]
        prompts = [chat_prompt(tokenizer, p.prompt, system_prompt) for p in chunk]
        rollout = backend.generate(
            prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + start
        )
        answers = [p.answer for p in chunk for _ in range(n)]
        generated[start] = (rollout.texts, [float(v) for v in verifier(rollout.texts, answers)])
    if world_size > 1:
        if gather is None:
            raise ValueError(f"evaluate: world_size={world_size} needs gather= to collect the ranks' generations")
        generated = gather(generated)
    counts: list[int] = []
    texts_all: list[str] = []
    verdicts: list[float] = []
    for start in starts:
        texts, c = generated[start]
        texts_all += texts
        verdicts += c
        counts += [int(sum(c[i * n : (i + 1) * n])) for i in range(len(texts) // n)]
    n_arr = np.full(len(counts), n)
    c_arr = np.asarray(counts)
    passk = {k: asdict(pass_at_k_summary(n_arr, c_arr, k)) for k in k_values(n)} if counts else {}
    formats = {}
    if format_classes:
        stats = format_frequency(texts_all, format_classes, correct=verdicts)
        formats = {name: asdict(s) for name, s in stats.items()}
    calibration = per_completion = None
    if with_calibration and texts_all:
        conf = [parse_confidence(t) for t in texts_all]
        per_completion = {
            "correct": [float(v) for v in verdicts],
            "confidence": conf,
            "answer": [answer_key(t) for t in texts_all],
            "text": list(texts_all),  # the completions themselves: the study's shortcut signatures read them
        }
        answered = [i for i, q in enumerate(conf) if q is not None]
        q = np.asarray([conf[i] for i in answered], dtype=float)
        y = np.asarray([verdicts[i] for i in answered], dtype=float)
        calibration = {"answered": len(answered) / len(texts_all)}
        if answered:
            calibration.update(brier=brier_score(q, y), ece=expected_calibration_error(q, y))
            if 0 < y.sum() < len(y):
                calibration["auroc"] = auroc(q, y)
    samples = [
        {
            "prompt": problems[i // n].prompt,
            "answer": problems[i // n].answer,
            "completion": texts_all[i],
            "correct": verdicts[i],
        }
        for i in range(0, min(len(texts_all), 4 * n), n)
    ]
    return EvalResult(n, counts, passk, formats, calibration, samples, per_completion)
