"""Peak memory (and time) of TRL GRPOTrainer's log-prob step, stock vs patched with rlvr_fast.

Two steps of a GRPO iteration compute per-token log-probs, and both are measured on the same synthetic batch
(B completions of C tokens after P prompt tokens, random token ids, random completion lengths in [C/2, C]):

- ``logprobs_no_grad``: ``trainer._get_per_token_logps_and_entropies`` under no_grad, what TRL runs for the old-policy
  (num_iterations > 1) and the reference-model (beta > 0) log-probs;
- ``loss_fwd_bwd``: ``trainer.compute_loss`` + backward, the policy's log-probs, entropy and loss with gradients
  (gradient checkpointing on for both sides by default, as GRPOConfig's default turns it on in ``train()``).

Stock TRL 1.16 already avoids the full (B, L, V) logits: its fused head projects [4096, 32768] tiles; on the CPU
it scores every position of prompt and completion (its compact path needs Triton on a GPU). The patched trainer
scores only the completion positions, in [4096 x 2048] chunks (rlvr_fast.ops.logprobs). Each side runs in its own
fresh process; the peak is the growth of the resident set (CPU: VmHWM reset before the call; CUDA: the allocator's
peak) over what was in use before the call, after one warm-up call (rlvr_fast.benchmark.memory.measure_peak_memory).

    python benchmarks/bench_memory_trl.py                      # SmolLM2-135M, 32 x (48 + 64) tokens, float32, CPU
    python benchmarks/bench_memory_trl.py --model tiny --completions 8 --completion-len 16   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402

PHASES = ("logprobs_no_grad", "loss_fwd_bwd")


def tiny_folder(cache_dir: str) -> str:
    from rlvr_fast.testing import char_tokenizer, tiny_causal_lm

    folder = os.path.join(cache_dir, "tiny-llama")
    if not os.path.exists(os.path.join(folder, "config.json")):
        tok = char_tokenizer()
        tiny_causal_lm(tok, hidden=64, layers=2).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def synthetic_inputs(vocab: int, b: int, p: int, c: int, device, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(c // 2, c + 1, (b,), generator=g)
    completion_mask = (torch.arange(c)[None, :] < lengths[:, None]).long()
    inputs = {
        "prompt_ids": torch.randint(3, vocab, (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (b, c), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def child(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlvr_fast.benchmark.memory import measure_peak_memory
    from rlvr_fast.integrations.trl import RLVRFastGRPOTrainer

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=device.type == "cpu",
            bf16=dtype == torch.bfloat16,
            report_to=[],
            per_device_train_batch_size=args.completions,
            num_generations=args.completions,
            max_completion_length=args.completion_len,
            model_init_kwargs={"dtype": dtype},
            save_strategy="no",
            gradient_checkpointing=args.gradient_checkpointing == "on",
        )
        dataset = Dataset.from_dict({"prompt": ["unused"] * args.completions})
        cls, extra = (GRPOTrainer, {}) if args.side == "stock" else (RLVRFastGRPOTrainer, {"backend": args.backend})
        trainer = cls(
            model=args.model_dir,
            reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)],
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            **extra,
        )
    model = trainer.model
    model.train()
    if config.gradient_checkpointing:  # what Trainer.train() turns on before the first step (GRPOConfig's default)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; compute_loss reads it
    vocab = model.get_output_embeddings().weight.shape[0]
    inputs = synthetic_inputs(vocab, args.completions, args.prompt_len, args.completion_len, device)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)

    from trl.models.utils import disable_gradient_checkpointing

    def logprobs_no_grad():
        # as in TRL's _generate_and_score_completions: no grad, gradient checkpointing off (on by default in
        # GRPOConfig; under no_grad it only costs time)
        with torch.no_grad(), disable_gradient_checkpointing(model, trainer.args.gradient_checkpointing_kwargs):
            return trainer._get_per_token_logps_and_entropies(
                model, ids, mask, args.completion_len, batch_size=args.completions
            )[0]

    def loss_fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = {
        "side": args.side,
        "device": str(device),
        "dtype": args.dtype,
        "vocab": vocab,
        "phases": {},
        "implementation": getattr(trainer, "_rlvr_fast_implementation", "trl"),
    }
    for name, fn in (("logprobs_no_grad", logprobs_no_grad), ("loss_fwd_bwd", loss_fwd_bwd)):
        out = fn()  # warm-up: first-touch pages, allocator pools, kernel compilation
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        peak = measure_peak_memory(fn, device)
        model.zero_grad(set_to_none=True)
        check = float((out * inputs["completion_mask"]).sum()) if out.dim() == 2 else float(out)
        result["phases"][name] = {
            "peak_growth_bytes": None if peak is None else peak.growth_bytes,
            "peak_method": None if peak is None else peak.method,
            "seconds_median": statistics.median(times),
            "seconds": times,
            "check_value": check,  # sum of completion log-probs / the loss: the two sides must agree
        }
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    common.emit(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--completions", type=int, default=32, help="B: completions in the batch (4 prompts x 8)")
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per phase after the warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="auto", help="rlvr_fast backend of the patched side")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="on",
        help="GRPOConfig.gradient_checkpointing for both sides (TRL's default: on)",
    )
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "rlvr_fast_bench"))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/trl-memory-<date>.json)")
    parser.add_argument("--side", choices=["stock", "patched"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return 0

    os.makedirs(args.cache_dir, exist_ok=True)
    model_dir = common.smollm2_folder(args.cache_dir) if args.model == "smollm2" else tiny_folder(args.cache_dir)
    shared = [
        "--model-dir",
        model_dir,
        "--completions",
        str(args.completions),
        "--prompt-len",
        str(args.prompt_len),
        "--completion-len",
        str(args.completion_len),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--backend",
        args.backend,
        "--gradient-checkpointing",
        args.gradient_checkpointing,
    ]
    sides, commands = {}, {}
    for side in ("stock", "patched"):
        sides[side], commands[side] = common.run_side(os.path.abspath(__file__), ["--side", side, *shared])
    report = {
        "benchmark": "TRL GRPOTrainer log-prob step: stock vs rlvr_fast-patched",
        "machine": common.machine_info(),
        "model": args.model,
        "gradient_checkpointing": args.gradient_checkpointing,
        "shape": {
            "completions": args.completions,
            "prompt_len": args.prompt_len,
            "completion_len": args.completion_len,
            "vocab": sides["stock"]["vocab"],
        },
        "commands": {"parent": " ".join([sys.executable, *sys.argv]), **commands},
        "sides": sides,
        "ratios_patched_over_stock": {},
    }
    print(f"{'phase':<18} {'stock MB':>10} {'patched MB':>11} {'ratio':>7} {'stock s':>9} {'patched s':>10}  check")
    for phase in PHASES:
        s, p = sides["stock"]["phases"][phase], sides["patched"]["phases"][phase]
        measured = s["peak_growth_bytes"] and p["peak_growth_bytes"] is not None
        mem = p["peak_growth_bytes"] / s["peak_growth_bytes"] if measured else None
        report["ratios_patched_over_stock"][phase] = {
            "peak_memory": mem,
            "seconds": p["seconds_median"] / s["seconds_median"],
            "check_rel_diff": abs(p["check_value"] - s["check_value"]) / max(abs(s["check_value"]), 1e-12),
        }
        mb = lambda x: float("nan") if x is None else x / 2**20  # noqa: E731
        print(
            f"{phase:<18} {mb(s['peak_growth_bytes']):>10.1f} {mb(p['peak_growth_bytes']):>11.1f} "
            f"{(mem or float('nan')):>7.3f} {s['seconds_median']:>9.3f} {p['seconds_median']:>10.3f}  "
            f"{report['ratios_patched_over_stock'][phase]['check_rel_diff']:.1e}"
        )
    out = common.write_report(report, args.out or common.default_out(f"trl-memory-{args.model}"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
