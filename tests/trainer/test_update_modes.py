"""The ``update-modes-quick`` study preset: full AdamW vs SparseAdamW masks vs LoRA.

- The LoRA arm's rank is the one whose AdamW state matches the 10% SparseAdamW mask's for SmolLM2-135M: both byte
  counts recomputed from the model's transformers config (built on the meta device, no weights).
- A tiny-model study of the preset's arms (plus a rank-2 LoRA user arm): the report's update-modes numbers are the
  runs' own outputs (resources.json, update_sparsity.json), the measured optimizer bytes follow each optimizer's
  state layout, and a LoRA update's effective rank is at most its rank.
"""

import json
import math
import os

import pytest
import torch
from helpers.runs import TOKEN_BIAS, write_task

from rlvr_fast.optim import random_masks
from rlvr_fast.study import plan_study, run_study
from rlvr_fast.study.arms import ARMS, LORA_MATCHED_RANK
from rlvr_fast.study.presets import get_preset
from rlvr_fast.study.update_modes import RESOURCES_FILE
from rlvr_fast.study.updates import UPDATE_FILE
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.model import LoadedModel

pytest.importorskip("peft")

PRESET = "update-modes-quick"
# SmolLM2-135M-Instruct's architecture (its config.json; the shipped GGUF's header says the same)
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def _meta_model(**dims):
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**dims))


def _sparse_bytes(model, density: float) -> int:
    """SparseAdamW: two float32 moments and an int32 index per masked entry, a float32 step per tensor."""
    return sum(12 * round(density * p.numel()) + 4 for p in model.parameters())


def _lora_bytes(model, rank: int) -> int:
    """AdamW over LoRA all-linear: two float32 moments per A/B entry (r x (in + out) per Linear, the head excluded), a
    float32 step per A and per B."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return sum(8 * rank * (m.in_features + m.out_features) + 8 for m in linears)


def test_preset_has_the_six_arms_and_records_ranks():
    preset = get_preset(PRESET)
    assert preset.arms == (
        "correct",
        "sparse_random10",
        "sparse_random30",
        "sparse_grad10",
        "sparse_grad30",
        "lora_r66",
    )
    assert preset.update_rank and not get_preset("quick").update_rank  # the SVDs only where asked
    assert ARMS["sparse_grad30"].overrides["mask_source"] == "grad:0.3"
    assert ARMS["sparse_random10"].overrides["mask_source"] == "random:0.1"
    lora = ARMS[f"lora_r{LORA_MATCHED_RANK}"].overrides
    assert lora["adapter"] == "lora" and lora["lora_rank"] == LORA_MATCHED_RANK


def test_lora_rank_matches_the_10pct_mask_state_bytes_for_smollm2():
    model = _meta_model(**SMOLLM2_135M)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # the published parameter count
    sparse, lora = _sparse_bytes(model, 0.1), _lora_bytes(model, LORA_MATCHED_RANK)
    assert abs(lora - sparse) / sparse < 0.10, (lora, sparse)
    # and it is the nearest rank: one more or one fewer is further away
    for other in (LORA_MATCHED_RANK - 1, LORA_MATCHED_RANK + 1):
        assert abs(_lora_bytes(model, other) - sparse) > abs(lora - sparse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("update_modes"))
    tok = char_tokenizer()
    arms_file = os.path.join(root, "arms.json")
    with open(arms_file, "w") as f:  # a rank below the tiny model's dims: the rank bound is not trivial
        json.dump({"lora_r2": {"overrides": {"adapter": "lora", "lora_rank": 2, "lora_alpha": 4}}}, f)
    plan = plan_study(
        PRESET,
        arms=[*get_preset(PRESET).arms, "lora_r2"],
        arms_file=arms_file,
        task=write_task(os.path.join(root, "train.jsonl"), 12, "train"),
        steps=2,
        overrides=dict(
            eval_file=write_task(os.path.join(root, "eval.jsonl"), 4, "eval"),
            train_size=12,
            eval_size=4,
            group_size=4,
            prompts_per_step=2,
            max_prompt_length=32,
            max_completion_length=6,
            eval_samples=2,
            lr=1e-2,
            grad_clip=None,
            progress=False,
        ),
        output_dir=os.path.join(root, "study"),
    )

    def load(cfg):
        return LoadedModel(tiny_causal_lm(tok, token_bias=TOKEN_BIAS), tok, torch.device("cpu"), torch.float32)

    outcome = run_study(plan, model_loader=load, log=lambda s: None)
    with open(outcome.study_json) as f:
        study = json.load(f)
    with open(outcome.report) as f:
        report = f.read()
    return plan, outcome, study, report


def _read(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


def test_report_numbers_are_the_runs_own(finished):
    plan, outcome, study, report = finished
    assert set(outcome.statuses.values()) == {"done"}, study["state"]
    modes = study["update_modes"]["runs"]
    assert set(modes) == {r.key for r in plan.runs}
    assert "## Update modes" in report
    for spec in plan.runs:
        res, upd, row = _read(spec.run_dir, RESOURCES_FILE), _read(spec.run_dir, UPDATE_FILE), modes[spec.key]
        for field in ("trainable_parameters", "optimizer_state_bytes", "peak_memory_bytes", "mean_step_seconds"):
            assert row[field] == res[field]
        assert row["unchanged"] == upd["overall"]
        with open(os.path.join(spec.run_dir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
        steps = [m for m in metrics if "reward_mean" in m]
        assert res["mean_step_seconds"] == pytest.approx(sum(m["seconds"] for m in steps) / len(steps))
        assert res["peak_memory_bytes"] == max(m["peak_memory_bytes"] for m in steps)
        ranks = {n: t["effective_rank"] for n, t in upd["tensors"].items() if "effective_rank" in t}
        assert ranks, "the preset asks for update ranks"
        assert row["rank"]["overall"]["effective_rank"] == pytest.approx(sum(ranks.values()) / len(ranks))
        assert f"| {spec.key} | {res['trained_entries']:,} |" in report


def test_optimizer_bytes_follow_each_state_layout(finished):
    plan, _, study, _ = finished
    modes = study["update_modes"]["runs"]
    total = modes["correct/seed0"]["total_parameters"]
    tensors = len(_read(plan.run("correct/seed0").run_dir, UPDATE_FILE)["tensors"])
    assert modes["correct/seed0"]["trainable_parameters"] == total
    assert modes["correct/seed0"]["optimizer_state_bytes"] == 8 * total + 4 * tensors  # dense AdamW
    for arm, density in (("sparse_random10", 0.1), ("sparse_random30", 0.3)):
        row = modes[f"{arm}/seed0"]
        masked = (row["optimizer_state_bytes"] - 4 * tensors) / 12  # 12 bytes per masked entry (and a step each)
        assert abs(masked / total - density) < 0.05
    for arm in ("sparse_grad10", "sparse_grad30"):
        density = 0.1 if arm.endswith("10") else 0.3
        masked = (modes[f"{arm}/seed0"]["optimizer_state_bytes"] - 4 * tensors) / 12
        assert abs(masked / total - density) < 0.05
    lora = modes["lora_r2/seed0"]
    assert lora["trainable_parameters"] == lora["trained_entries"] < total / 5
    assert lora["optimizer_state_bytes"] < modes["sparse_random10/seed0"]["optimizer_state_bytes"] * 3


def test_trained_entries_count_the_mask_not_the_tensors(finished):
    """A masked run writes exactly its mask's entries: round(d * n) of all n entries for a saliency mask, the entries
    the seeded random draw kept for a random one (rebuilt here from the run's seed); requires_grad still covers all."""
    plan, _, study, _ = finished
    modes = study["update_modes"]["runs"]
    named = dict(tiny_causal_lm(char_tokenizer(), token_bias=TOKEN_BIAS).named_parameters())
    total = sum(p.numel() for p in named.values())
    assert modes["correct/seed0"]["trained_entries"] == total
    for density in (0.1, 0.3):
        pct = round(density * 100)
        grad, rand = modes[f"sparse_grad{pct}/seed0"], modes[f"sparse_random{pct}/seed0"]
        assert grad["trained_entries"] == math.floor(density * total + 0.5)  # the trainer's scope="global"
        seed = plan.run(f"sparse_random{pct}/seed0").config["seed"]
        drawn = random_masks(named, density, seed=seed)
        assert rand["trained_entries"] == sum(int(m.sum()) for m in drawn.values())
        assert grad["trainable_parameters"] == rand["trainable_parameters"] == total


def test_lora_update_is_low_rank_and_leaves_unadapted_weights(finished):
    plan = finished[0]
    for arm, rank in (("lora_r2", 2), (f"lora_r{LORA_MATCHED_RANK}", LORA_MATCHED_RANK)):
        upd = _read(plan.run(f"{arm}/seed0").run_dir, UPDATE_FILE)
        adapted = {n: t for n, t in upd["tensors"].items() if n.endswith("proj.weight")}
        assert adapted and all(t["unchanged"]["float32"] < 1.0 for t in adapted.values())  # merged B @ A applied
        assert all(t["effective_rank"] <= rank + 1e-6 for t in adapted.values()), arm
        frozen = [t for n, t in upd["tensors"].items() if "embed" in n or "norm" in n]
        assert frozen and all(t["unchanged"]["float32"] == 1.0 for t in frozen)
    # the full-AdamW update of a 2-D weight is not confined to rank 2
    full = _read(plan.run("correct/seed0").run_dir, UPDATE_FILE)["tensors"]
    assert max(t["effective_rank"] for t in full.values() if "effective_rank" in t) > 2
