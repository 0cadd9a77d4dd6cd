"""Evaluation metrics against exact or brute-force references (docs/design.md §7): pass@k (math.comb), its
standard errors, Brier / ECE / AUROC on constructed cases, format frequency, ROUGE-L / LCS and the contamination
probe."""

from __future__ import annotations

import math
import random
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlvr_fast.eval.calibration import auroc, brier_score, expected_calibration_error, reliability_bins
from rlvr_fast.eval.contamination import contamination_probe, lcs_length, rouge_l
from rlvr_fast.eval.formats import UNMATCHED, format_frequency
from rlvr_fast.eval.passk import pass_at_k, pass_at_k_curve, pass_at_k_delta, pass_at_k_summary

# ------------------------------------------------------------------------------------------------------------------
# pass@k
# ------------------------------------------------------------------------------------------------------------------


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) with exact integers (the definition, not the product form)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def _random_nck(rng: random.Random, n_max: int) -> tuple[int, int, int]:
    n = rng.randint(1, n_max)
    return n, rng.randint(0, n), rng.randint(1, n)


def test_pass_at_k_matches_binomial_formula_scalar(seeded):
    rng = random.Random(seeded)
    for _ in range(400):
        n, c, k = _random_nck(rng, 300)
        got = pass_at_k(n, c, k)
        assert isinstance(got, float)
        assert got == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_vectorised_matches_binomial_formula(seeded):
    rng = random.Random(seeded)
    triples = [_random_nck(rng, 1024) for _ in range(500)] + [(1, 0, 1), (1, 1, 1), (5, 0, 5), (5, 5, 5), (1000, 1, 1)]
    n, c, k = (np.array(v) for v in zip(*triples))
    got = pass_at_k(n, c, k)
    expected = np.array([float(exact_pass_at_k(*t)) for t in triples])
    assert got.shape == (len(triples),)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    # torch tensors and broadcasting of a scalar k
    got_t = pass_at_k(torch.from_numpy(n), torch.from_numpy(c), 1)
    np.testing.assert_allclose(got_t, c / n, rtol=1e-12)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match=r"k must be <= n .*k=5 > n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"c must be <= n, got c=6 > n=5"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        pass_at_k([-1, 3], [0, 1], 1)
    with pytest.raises(ValueError, match="c must be >= 0"):
        pass_at_k(3, -1, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="whole numbers"):
        pass_at_k(3.5, 1, 1)
    with pytest.raises(TypeError, match="integers"):
        pass_at_k(np.array([True]), 1, 1)


def test_pass_at_k_curve_and_summary():
    n = [16, 16, 16]
    c = [0, 1, 16]
    curve = pass_at_k_curve(n, c)
    assert list(curve) == [1, 2, 4, 8, 16]
    for k, v in curve.items():
        assert v == pytest.approx(float(sum(exact_pass_at_k(16, ci, k) for ci in c) / 3))
    assert list(pass_at_k_curve([10, 12], [3, 4])) == [1, 2, 4, 8, 10]
    values = [float(exact_pass_at_k(16, ci, 4)) for ci in c]
    s = pass_at_k_summary(n, c, 4, confidence=0.9)
    assert s.mean == pytest.approx(statistics.mean(values))
    assert s.se == pytest.approx(statistics.stdev(values) / math.sqrt(3))
    z = statistics.NormalDist().inv_cdf(0.95)
    assert (s.ci_low, s.ci_high) == pytest.approx((s.mean - z * s.se, s.mean + z * s.se))
    assert math.isnan(pass_at_k_summary(4, 2, 1).se)


def test_pass_at_k_delta_is_paired():
    n = [8, 8, 8, 8]
    base = [0, 2, 4, 8]
    trained = [1, 4, 4, 8]
    d = pass_at_k_delta(n, base, n, trained, 2)
    diffs = [float(exact_pass_at_k(8, t, 2) - exact_pass_at_k(8, b, 2)) for b, t in zip(base, trained)]
    assert d.delta == pytest.approx(statistics.mean(diffs))
    assert d.se == pytest.approx(statistics.stdev(diffs) / 2.0)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert d.ci_high - d.delta == pytest.approx(z * d.se)
    with pytest.raises(ValueError, match="same problems"):
        pass_at_k_delta(n, base, n[:3], trained[:3], 2)
    with pytest.raises(ValueError, match="confidence"):
        pass_at_k_delta(n, base, n, trained, 2, confidence=1.0)


# ------------------------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------------------------


def test_brier_score_hand_values():
    assert brier_score([1.0, 0.0, 0.5, 0.8], [1, 0, 1, 0]) == pytest.approx((0 + 0 + 0.25 + 0.64) / 4)
    assert brier_score(torch.tensor([0.3]), torch.tensor([True])) == pytest.approx(0.49)


def test_ece_constructed_cases():
    # perfectly calibrated: 4 answers at q=0.25 with one right, 2 at q=0.75 with... 3 of 4 right
    q = [0.25] * 4 + [0.75] * 4
    c = [1, 0, 0, 0, 1, 1, 1, 0]
    assert expected_calibration_error(q, c) == pytest.approx(0.0, abs=1e-15)
    # overconfident: q = 0.9 always, 50 % right -> ECE = 0.4
    assert expected_calibration_error([0.9] * 10, [1, 0] * 5) == pytest.approx(0.4)
    # bins are right-closed ((m-1)/M, m/M]: 0.3 sits with 0.25 in (0.2, 0.3], 0.0 in the first bin, 1.0 in the last
    q = [0.3, 0.25, 0.0, 1.0]
    c = [1, 0, 0, 1]
    expected = 2 / 4 * abs(0.275 - 0.5) + 1 / 4 * 0.0 + 1 / 4 * 0.0
    assert expected_calibration_error(q, c) == pytest.approx(expected)
    bins = reliability_bins(q, c)
    assert bins.count.tolist() == [1, 0, 2, 0, 0, 0, 0, 0, 0, 1]
    assert expected_calibration_error([0.3, 0.35], [1, 0], n_bins=1) == pytest.approx(abs(0.325 - 0.5))


def _ece_exact(q: list[Fraction], c: list[int], m: int) -> Fraction:
    bins: dict[int, list[int]] = {}
    for i, x in enumerate(q):
        b = max(math.ceil(x * m) - 1, 0)  # exact rational arithmetic: ((b)/M, (b+1)/M]
        bins.setdefault(b, []).append(i)
    total = Fraction(0)
    for idx in bins.values():
        mean_q = sum(q[i] for i in idx) / len(idx)
        acc = Fraction(sum(c[i] for i in idx), len(idx))
        total += Fraction(len(idx), len(q)) * abs(mean_q - acc)
    return total


def test_ece_matches_exact_binning_on_grid_values(seeded):
    rng = random.Random(seeded)
    for m in (5, 10, 15):
        grid = [Fraction(j, 20) for j in range(21)]  # many values sit exactly on bin edges
        q = [rng.choice(grid) for _ in range(300)]
        c = [rng.randint(0, 1) for _ in q]
        got = expected_calibration_error([float(x) for x in q], c, n_bins=m)
        assert got == pytest.approx(float(_ece_exact(q, c, m)), abs=1e-12)


def _auroc_pairs(q, c) -> float:
    pos = [x for x, y in zip(q, c) if y]
    neg = [x for x, y in zip(q, c) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_constructed_cases(seeded):
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert math.isnan(auroc([0.2, 0.3], [1, 1]))
    rng = random.Random(seeded)
    q = [rng.choice([0.0, 0.1, 0.5, 0.7, 1.0]) for _ in range(200)]  # heavy ties
    c = [rng.randint(0, 1) for _ in q]
    assert auroc(q, c) == pytest.approx(_auroc_pairs(q, c), abs=1e-12)


def test_calibration_input_errors():
    with pytest.raises(ValueError, match=r"conf must lie in \[0, 1\]"):
        brier_score([1.2], [1])
    with pytest.raises(ValueError, match=r"conf must lie in \[0, 1\]"):
        auroc([float("nan"), 0.5], [1, 0])
    with pytest.raises(ValueError, match="correct must hold only 0/1"):
        expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError, match="2 entries, correct 3"):
        brier_score([0.5, 0.5], [1, 0, 1])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [1], n_bins=0)
    with pytest.raises(ValueError, match="empty"):
        auroc([], [])


# ------------------------------------------------------------------------------------------------------------------
# format frequency
# ------------------------------------------------------------------------------------------------------------------


def test_format_frequency_counts_and_accuracy():
    completions = [
        "```python\nprint(2 + 2)\n```\n\\boxed{4}",
        "Let me compute. \\boxed{5}",
        "def f(x):\n    return x\n",
        "just words",
    ]
    correct = [1, 0, 1, 0]
    classes = {"code": r"```python|^def \w+\(", "boxed": r"\\boxed\{"}
    stats = format_frequency(completions, classes, correct)
    assert stats["code"].count == 2 and stats["code"].frequency == 0.5 and stats["code"].accuracy == 1.0
    assert stats["boxed"].count == 2 and stats["boxed"].accuracy == 0.5
    assert stats[UNMATCHED].count == 1 and stats[UNMATCHED].accuracy == 0.0
    assert format_frequency(completions, classes)["code"].accuracy is None
    default = format_frequency(completions)
    assert default["python_code"].count == 2 and default["boxed"].count == 2


def test_format_frequency_errors():
    with pytest.raises(ValueError, match="not a valid regex"):
        format_frequency(["a"], {"bad": "("})
    with pytest.raises(ValueError, match="non-empty mapping"):
        format_frequency(["a"], {})
    with pytest.raises(ValueError, match="1 entries, completions 2"):
        format_frequency(["a", "b"], {"x": "a"}, [1])
    with pytest.raises(ValueError, match="other than 'unmatched'"):
        format_frequency(["a"], {UNMATCHED: "a"})


# ------------------------------------------------------------------------------------------------------------------
# LCS / ROUGE-L / contamination probe
# ------------------------------------------------------------------------------------------------------------------


def _lcs_dp(a, b) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, start=1):
            cur = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = cur
    return row[-1]


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.sampled_from("abcde"), max_size=40), b=st.lists(st.sampled_from("abcdef"), max_size=40))
def test_lcs_matches_dynamic_programming(a, b):
    assert lcs_length(a, b) == _lcs_dp(a, b) == lcs_length(b, a)


def test_rouge_l_hand_value():
    cand = ["the", "cat", "sat", "on", "the", "mat"]
    ref = ["the", "cat", "lay", "on", "a", "mat"]
    # LCS = the cat on mat = 4; P = 4/6, R = 4/6
    r = rouge_l(cand, ref)
    assert (r.precision, r.recall, r.f1) == pytest.approx((4 / 6, 4 / 6, 4 / 6))
    assert rouge_l([], ref).f1 == 0.0
    assert rouge_l(ref, ref).f1 == 1.0


PROMPTS = [
    "A farmer has 12 cows and buys 7 more cows at the market. How many cows does the farmer have now?",
    "Compute the sum of the first ten positive integers and report it.",
    "one",
]
ANSWERS = ["19", "55", "1"]


def test_contamination_probe_memorised_vs_fresh():
    def memorised(prefixes):
        out = []
        for p in prefixes:
            full = next(q for q in PROMPTS if q.startswith(p))
            out.append(full[len(p) :] + " The answer is " + ANSWERS[PROMPTS.index(full)] + ".")
        return out

    rep = contamination_probe(PROMPTS, memorised, ANSWERS)
    assert rep.skipped == [2]
    assert set(rep.summary) == {0.4, 0.6, 0.8}
    for s in rep.summary.values():
        assert (s.prompts, s.rouge_l, s.exact_match, s.answer_contained) == (2, 1.0, 1.0, 1.0)
    first = next(r for r in rep.samples if r.index == 0 and r.fraction == 0.4)
    words = PROMPTS[0].split()
    assert first.prefix.split() == words[: round(0.4 * len(words))]
    assert first.prefix + " " + first.remainder == PROMPTS[0]

    rep = contamination_probe(PROMPTS, lambda ps: ["zebra " * 5 for _ in ps], ANSWERS)
    for s in rep.summary.values():
        assert (s.rouge_l, s.exact_match, s.answer_contained) == (0.0, 0.0, 0.0)
    assert contamination_probe(PROMPTS, lambda ps: ["x"] * len(ps)).summary[0.6].answer_contained is None


def test_contamination_probe_partial_overlap_is_rouge_l():
    prompt = "a b c d e f g h i j"
    rep = contamination_probe([prompt], lambda ps: ["f x h i j k l"], fractions=(0.5,))
    # remainder "f g h i j"; continuation cut to 5 words "f x h i j": LCS 4 -> F1 0.8
    assert rep.samples[0].rouge_l == pytest.approx(0.8)
    assert rep.samples[0].exact_match is False


def test_contamination_probe_errors():
    with pytest.raises(ValueError, match="returned 1 continuations for 2 prefixes"):
        contamination_probe(PROMPTS, lambda ps: ["x"])
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        contamination_probe(PROMPTS, lambda ps: ps, fractions=(1.0,))
    with pytest.raises(TypeError, match="generate must be callable"):
        contamination_probe(PROMPTS, "model")
    with pytest.raises(ValueError, match="answers has 1 entries"):
        contamination_probe(PROMPTS, lambda ps: ps, ["1"])
    with pytest.raises(TypeError, match="returned a int"):
        contamination_probe(PROMPTS, lambda ps: [1 for _ in ps])
