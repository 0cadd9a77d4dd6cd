"""Mask builders, mask files and the update-sparsity analysis, on constructed cases with known answers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rlvr_fast.optim.masks import (
    GradSaliency,
    load_masks,
    mask_density,
    masks_from_diff,
    masks_from_scores,
    pack_bits,
    random_masks,
    save_masks,
    unpack_bits,
)
from rlvr_fast.optim.sparsity import update_effective_rank, update_rank_ratio, update_sparsity

# --------------------------------------------------------------------------------------------------------------------
# update_sparsity
# --------------------------------------------------------------------------------------------------------------------


def _two_checkpoints(generator, device):
    """b = a except at known positions: large changes (seen in any dtype), and changes of 1e-4 on weights near 1 that
    bf16 rounding erases (a bf16 ulp at 1.0 is 2^-7) but float32 keeps."""
    a = {
        "w": (1.0 + 0.1 * torch.rand(40, 25, generator=generator)).to(device),
        "b": torch.randn(17, generator=generator).to(device),
        "step": torch.tensor(3),  # non-floating: ignored
    }
    b = {k: v.clone() for k, v in a.items()}
    big = torch.zeros(1000, dtype=torch.bool)
    big[torch.randperm(1000, generator=generator)[:150]] = True
    big = big.reshape(40, 25).to(device)
    small = ~big & (torch.rand(40, 25, generator=generator) < 0.3).to(device)
    # the bf16 value of a (not a itself) moves by 1e-4 in float32: a bf16 comparison cannot see it
    a["w"] = a["w"].bfloat16().float()
    b["w"] = a["w"] + 0.5 * big + 1e-4 * small
    b["b"][[0, 5, 16]] += 1.0
    return a, b, big, small


def test_update_sparsity_counts(generator, device):
    a, b, _big, small = _two_checkpoints(generator, device)
    n_small = int(small.sum())
    out = update_sparsity(a, b)  # bf16, atol 1e-5: only the large changes count
    assert out["w"] == pytest.approx(1 - 150 / 1000)
    assert out["b"] == pytest.approx(1 - 3 / 17)
    assert out["overall"] == pytest.approx(1 - 153 / 1017)
    assert "step" not in out
    fp32 = update_sparsity(a, b, dtype=torch.float32)  # float32 sees the 1e-4 changes too
    assert fp32["w"] == pytest.approx(1 - (150 + n_small) / 1000)
    loose = update_sparsity(a, b, atol=1e-3, dtype=torch.float32)  # above the small changes
    assert loose["w"] == pytest.approx(1 - 150 / 1000)
    same = update_sparsity(a, a)
    assert all(v == 1.0 for v in same.values())


def test_update_sparsity_nan_counts_as_changed(device):
    a = {"x": torch.zeros(4, device=device)}
    b = {"x": torch.tensor([0.0, float("nan"), 0.0, 0.0], device=device)}
    assert update_sparsity(a, b)["x"] == 0.75


def test_update_rank_ratio(generator, device):
    u = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    v = torch.randn(3, 30, generator=generator, dtype=torch.float64)
    a = {"m": torch.randn(20, 30, generator=generator).to(device), "v": torch.randn(9, generator=generator).to(device)}
    b = {"m": a["m"] + (u @ v).float().to(device), "v": a["v"] + 1}
    out = update_sparsity(a, b, dtype=torch.float32, rank=True)
    assert out["rank_ratio/m"] == pytest.approx(3 / 20)
    assert "rank_ratio/v" not in out  # only 2-D tensors
    assert update_rank_ratio(torch.zeros(5, 4)) == 0.0
    assert update_rank_ratio(torch.randn(6, 40, generator=generator)) == 1.0
    assert "rank_ratio/m" not in update_sparsity(a, b)  # off by default


def test_update_effective_rank(generator, device):
    """exp of the spectrum's entropy, against the formula written out: r equal singular values give r; a dominant
    direction pulls it toward 1; the numerical rank of the same update is full."""
    for r in (1, 3, 7):
        u, _ = torch.linalg.qr(torch.randn(40, r, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(30, r, generator=generator, dtype=torch.float64))
        assert update_effective_rank((2.5 * u @ v.T).to(device)) == pytest.approx(r, rel=1e-9)
    d = torch.randn(17, 23, generator=generator).to(device)
    s = torch.linalg.svdvals(d.cpu().double())
    p = s / s.sum()
    assert update_effective_rank(d) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    # A rank-one term of 20x the nuclear norm of d: interlacing leaves sigma_2.. summing to <= nuc(d) and sigma_1 >=
    # 19 nuc(d), so p_1 >= 19/20 and exp(H) <= 1.41 for any draw of d.
    a, b = torch.randn(17, generator=generator), torch.randn(23, generator=generator)
    direction = torch.outer(a / a.norm(), b / b.norm())
    spike = d + (20 * float(s.sum()) * direction).to(device)
    assert update_effective_rank(spike) < 2.0 < update_effective_rank(d)
    assert update_rank_ratio(spike) == 1.0
    assert update_effective_rank(torch.zeros(4, 6, device=device)) == 0.0
    with pytest.raises(ValueError, match=r"diff must be 2-D \(m, n\), got shape \(5,\)"):
        update_effective_rank(torch.zeros(5))


@pytest.mark.parametrize(
    "state_b,kwargs,exc,match",
    [
        ({"x": torch.zeros(3)}, {"atol": -1.0}, ValueError, r"atol must be a finite number >= 0, got -1\.0"),
        ({"x": torch.zeros(3)}, {"dtype": torch.int32}, TypeError, r"dtype must be a floating"),
        ({"y": torch.zeros(3)}, {}, ValueError, r"only in state_a: \['x'\], only in state_b: \['y'\]"),
        ({"x": torch.zeros(4)}, {}, ValueError, r"shape \(3,\) in state_a but \(4,\) in state_b"),
    ],
)
def test_update_sparsity_bad_input(state_b, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        update_sparsity({"x": torch.zeros(3)}, state_b, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# masks_from_diff
# --------------------------------------------------------------------------------------------------------------------


def test_masks_from_diff_is_the_complement_of_unchanged(generator, device):
    a, b, big, small = _two_checkpoints(generator, device)
    masks = masks_from_diff(a, b)
    assert set(masks) == {"w", "b"} and masks["w"].dtype == torch.bool and masks["w"].shape == (40, 25)
    assert torch.equal(masks["w"], big)
    assert torch.equal(masks_from_diff(a, b, dtype=torch.float32)["w"], big | small)
    for name, frac in update_sparsity(a, b).items():
        if name != "overall":
            assert 1 - masks[name].float().mean().item() == pytest.approx(frac)


# --------------------------------------------------------------------------------------------------------------------
# Saliency / top-k
# --------------------------------------------------------------------------------------------------------------------


def test_masks_from_scores_per_tensor_exact_count(generator, device):
    scores = {"a": torch.rand(37, 11, generator=generator), "b": torch.rand(5, generator=generator)}
    scores = {k: v.to(device) for k, v in scores.items()}
    masks = masks_from_scores(scores, 0.25)
    assert int(masks["a"].sum()) == round(0.25 * 407) and int(masks["b"].sum()) == 1
    # the kept entries are the largest ones
    kept_min = scores["a"][masks["a"]].min()
    assert bool((scores["a"][~masks["a"]] <= kept_min).all())


def test_masks_from_scores_global_is_top_k_over_all(generator, device):
    scores = {
        "a": torch.rand(30, 20, generator=generator).to(device) * 3.0,  # larger scores: keeps more
        "b": torch.rand(400, generator=generator).to(device),
        "c": torch.rand(2, 3, 4, generator=generator).to(device),
    }
    density = 0.2
    masks = masks_from_scores(scores, density, scope="global")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = round(density * flat.numel())
    expected = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    expected[flat.topk(k).indices] = True
    got = torch.cat([m.reshape(-1) for m in masks.values()])
    assert torch.equal(got, expected)
    assert int(masks["a"].sum()) > int(masks["b"].sum())


def test_masks_from_scores_ties_keep_exact_count_in_order(device):
    scores = {"a": torch.ones(10), "b": torch.ones(10), "z": torch.zeros(5)}
    scores = {k: v.to(device) for k, v in scores.items()}
    masks = masks_from_scores(scores, 0.6, scope="global")  # 15 of 25: all 20 ones tie
    assert int(sum(m.sum() for m in masks.values())) == 15
    assert bool(masks["a"].all()) and int(masks["b"].sum()) == 5 and bool(masks["b"][:5].all())
    zeros = masks_from_scores({"z": torch.tensor([0.0, -0.0, 0.0, 1.0], device=device)}, 0.75)
    assert int(zeros["z"].sum()) == 3 and bool(zeros["z"][3])


def test_grad_saliency_accumulates(generator, device):
    model = torch.nn.Linear(6, 4).to(device)
    sal_abs = GradSaliency(model.named_parameters(), mode="abs")
    sal_sq = GradSaliency(dict(model.named_parameters()), mode="sq")
    total_abs = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    total_sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(8, 6, generator=generator).to(device)).pow(3).sum().backward()
        model.bias.grad = None if _ == 1 else model.bias.grad  # skipped at that step
        for n, p in model.named_parameters():
            if p.grad is not None:
                total_abs[n] += p.grad.abs()
                total_sq[n] += p.grad.square()
        sal_abs.accumulate()
        sal_sq.accumulate()
    for n in total_abs:
        torch.testing.assert_close(sal_abs.scores[n], total_abs[n])
        torch.testing.assert_close(sal_sq.scores[n], total_sq[n])
    masks = sal_abs.masks(0.5, scope="global")
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * 28)


def test_grad_saliency_masks_before_accumulate_raises():
    with pytest.raises(ValueError, match="no step was accumulated"):
        GradSaliency({"w": torch.zeros(3)}).masks(0.5)


# --------------------------------------------------------------------------------------------------------------------
# Random
# --------------------------------------------------------------------------------------------------------------------


def test_random_masks_density_and_seed(device):
    shapes = {"w": torch.zeros(200, 100, device=device), "b": (1000,)}
    m1 = random_masks(shapes, 0.1, seed=7)
    m2 = random_masks(shapes, 0.1, seed=7)
    m3 = random_masks(shapes, 0.1, seed=8)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert not torch.equal(m1["w"], m3["w"])
    assert m1["w"].device.type == device.type and m1["b"].device.type == "cpu"  # each tensor's device, else CPU
    n = 21000
    kept = sum(int(m.sum()) for m in m1.values())
    sd = (n * 0.1 * 0.9) ** 0.5
    assert abs(kept - 0.1 * n) < 6 * sd
    assert mask_density(m1) == pytest.approx(kept / n)
    assert bool(random_masks({"x": (50,)}, 1.0)["x"].all())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_density_outside_unit_interval_raises(density):
    for build in (
        lambda: random_masks({"x": (4,)}, density),
        lambda: masks_from_scores({"x": torch.rand(4)}, density),
    ):
        with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got"):
            build()


def test_bad_scores_raise():
    with pytest.raises(ValueError, match=r"scores\['x'\] must be non-negative and not NaN"):
        masks_from_scores({"x": torch.tensor([1.0, -1.0])}, 0.5)
    with pytest.raises(ValueError, match=r"non-negative and not NaN"):
        masks_from_scores({"x": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="scope must be one of"):
        masks_from_scores({"x": torch.rand(3)}, 0.5, scope="layer")


# --------------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------------


def test_pack_bits_matches_numpy(generator):
    m = torch.rand(13, 7, generator=generator) < 0.4
    assert np.array_equal(pack_bits(m).numpy(), np.packbits(m.numpy().reshape(-1)))
    assert torch.equal(unpack_bits(pack_bits(m), (13, 7)), m)


def test_save_load_round_trip_compact(tmp_path, generator):
    masks = {
        "model.layers.0.w": torch.rand(301, 77, generator=generator) < 0.1,  # 23177 entries: not a multiple of 8
        "b": torch.rand(3, generator=generator) < 0.5,
        "scalar": torch.tensor(True),
        "empty": torch.zeros(0, 4, dtype=torch.bool),
    }
    path = os.path.join(tmp_path, "masks.safetensors")
    save_masks(masks, path, metadata={"source": "unit test"})
    loaded = load_masks(path)
    assert list(loaded) == list(masks)
    for k in masks:
        assert loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]), k
    entries = sum(m.numel() for m in masks.values())
    assert os.path.getsize(path) < entries / 8 + 1024  # 1 bit per entry plus the header
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert f.metadata()["source"] == "unit test"


def test_save_load_bad_input(tmp_path):
    with pytest.raises(TypeError, match=r"masks\['x'\] must be a torch\.bool tensor, got torch\.float32"):
        save_masks({"x": torch.ones(3)}, os.path.join(tmp_path, "m.safetensors"))
    from safetensors.torch import save_file

    other = os.path.join(tmp_path, "weights.safetensors")
    save_file({"w": torch.ones(2)}, other)
    with pytest.raises(ValueError, match="is not a mask file"):
        load_masks(other)
