"""Does a compiled decode step pay on this machine? Our rollout sampler against a static-cache, ``torch.compile``d one.

Both sample the same prompts (the main job's training prompts, chat template applied) under the run's precision,
with the same inverse-CDF draw and the same per-row uniforms (``shared_prefix_sampler.draw_tokens``):

- ``eager``: ``HFGeneration`` as the trainer runs it: the prompt prefilled once per group, the preallocated KV cache
  (``trainer/rollout/kv_cache.py``), finished rows leaving the batch;
- ``compiled``: transformers' ``StaticCache`` of ``max_prompt_length + max_new_tokens`` positions and every row kept
  to the end (fixed shapes: one graph), the decode step ``torch.compile``d (inductor, C++ on a CPU). Under bf16
  autocast it reads bf16 copies of the linear weights made once per call (``torch.func.functional_call``): inside a
  compiled graph autocast's weight cache does not apply, and casting every weight on every step costs more than the
  graph saves.

Reported: the compile time (the first call's extra seconds), tokens per second over ``--repeats`` calls after it
(completion tokens up to and including EOS over wall seconds), the first decode step at which the two paths drew a
different token for the same seed, and the share of rows drawn identically. The paths round differently (the compiled
one prefills every row, ours each prompt once; the graph fuses differently), and under bf16 autocast a logit near 20 is
rounded to a multiple of 0.125, so their tokens part early there; in float32 they agree far longer.

    python benchmarks/bench_decode_compile.py --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402


def completion_tokens(completion, eos: int) -> int:
    """Tokens up to and including each row's first EOS (the rollout's completion mask)."""
    import torch

    is_eos = completion == eos
    has = is_eos.any(dim=1)
    first = torch.where(has, is_eos.int().argmax(dim=1) + 1, completion.shape[1])
    return int(first.sum())


class CompiledDecode:
    """Sampling with a static cache and a compiled decode step (module doc); every row runs ``max_new_tokens``."""

    def __init__(self, model, tokenizer, max_prompt_length: int, precision):
        import torch

        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.max_prompt_length = max_prompt_length
        self.step = torch.compile(self.forward, dynamic=False)

    def forward(self, weights: dict, **inputs):
        from torch.func import functional_call

        return functional_call(self.model, weights, (), inputs, tie_weights=False, strict=False)

    def generate(self, prompts: list[str], *, n: int, max_new_tokens: int, seed: int):
        import torch
        from transformers import StaticCache

        from rlvr_fast.trainer.precision import autocast_region
        from rlvr_fast.trainer.rollout.shared_prefix_sampler import draw_tokens
        from rlvr_fast.trainer.update.shared_prefix_forward import positions_from_mask

        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, prompt_mask = enc["input_ids"].repeat_interleave(n, 0), enc["attention_mask"].repeat_interleave(n, 0)
        rows, width = ids.shape
        capacity = self.max_prompt_length + max_new_tokens
        torch.manual_seed(seed)
        with torch.no_grad(), autocast_region(self.precision):
            compute = self.precision.compute if self.precision is not None else None
            weights = {
                f"{name}.weight": module.weight.detach().to(compute or module.weight.dtype)
                for name, module in self.model.named_modules()
                if isinstance(module, torch.nn.Linear)
            }
            cache = StaticCache(config=self.model.config, max_cache_len=capacity)
            mask = prompt_mask.new_zeros(rows, capacity)
            mask[:, :width] = prompt_mask
            out = self.forward(
                weights,
                input_ids=ids,
                attention_mask=prompt_mask,
                position_ids=positions_from_mask(prompt_mask),
                use_cache=True,
                logits_to_keep=1,
                past_key_values=cache,
            )
            logits, position = out.logits[:, -1].float(), prompt_mask.long().sum(dim=1)
            completion = torch.full((rows, max_new_tokens), tok.pad_token_id, dtype=torch.long)
            done = torch.zeros(rows, dtype=torch.bool)
            for step in range(max_new_tokens):
                tokens = draw_tokens(logits, torch.rand(rows, dtype=torch.float64))
                completion[:, step] = torch.where(done, tok.pad_token_id, tokens)
                done |= tokens == tok.eos_token_id
                if step == max_new_tokens - 1 or bool(done.all()):
                    break
                mask[:, width + step] = 1
                out = self.step(
                    weights,
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=position[:, None],
                    use_cache=True,
                    logits_to_keep=1,
                    past_key_values=cache,
                )
                logits, position = out.logits[:, -1].float(), position + 1
        return completion


def first_difference(a, b) -> int | None:
    """The first column at which two completion batches differ (None: identical)."""
    differs = (a != b).any(dim=0).nonzero()
    return int(differs[0]) if differs.numel() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per path after the first")
    parser.add_argument("--dtype", default="auto", help="RLVRConfig.dtype (auto: bf16 autocast on a bf16-native CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.model import load_model
    from rlvr_fast.trainer.rollout.data import batch_indices, chat_prompt, load_problems
    from rlvr_fast.trainer.rollout.engines import HFGeneration
    from rlvr_fast.trainer.rollout.seeds import derived_seed

    cfg = RLVRConfig(dtype=args.dtype, device="cpu", max_completion_length=args.max_new_tokens)
    loaded = load_model(cfg)
    train, _ = load_problems(cfg)
    tok = loaded.tokenizer

    def prompts_of(step: int) -> list[str]:
        return [
            chat_prompt(tok, train[i].prompt, cfg.system_prompt)
            for i in batch_indices(len(train), cfg.prompts_per_step, step, cfg.seed)
        ]

    eager = HFGeneration(loaded.model, tok, cfg.max_prompt_length, "on", precision=loaded.precision)
    compiled = CompiledDecode(loaded.model, tok, cfg.max_prompt_length, loaded.precision)
    paths = {
        "eager": lambda p, s: (
            eager.generate(
                p, n=cfg.group_size, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=s
            ).completion_ids
        ),
        "compiled": lambda p, s: compiled.generate(p, n=cfg.group_size, max_new_tokens=args.max_new_tokens, seed=s),
    }
    results: dict[str, dict] = {}
    outputs: dict[str, list] = {name: [] for name in paths}
    for name, run in paths.items():
        calls = []
        for step in range(args.repeats + 1):
            seed = derived_seed(cfg.seed, "rollout", step)
            t0 = time.perf_counter()
            completion = run(prompts_of(step), seed)
            wall = time.perf_counter() - t0
            calls.append({"wall_s": wall, "tokens": completion_tokens(completion, tok.eos_token_id)})
            outputs[name].append(completion)
        timed = calls[1:]
        wall = sum(c["wall_s"] for c in timed)
        results[name] = {
            "calls": calls,
            "first_call_extra_s": calls[0]["wall_s"] - wall / len(timed),
            "tokens_per_s": sum(c["tokens"] for c in timed) / wall,
        }
    differences = [first_difference(a, b) for a, b in zip(outputs["eager"], outputs["compiled"])]
    same_rows = [float((a == b).all(dim=1).float().mean()) for a, b in zip(outputs["eager"], outputs["compiled"])]
    report = {
        "benchmark": "rollout decode: our eager sampler vs a static-cache torch.compile'd decode step",
        "machine": common.machine_info(),
        "shape": {
            "prompts": cfg.prompts_per_step,
            "group_size": cfg.group_size,
            "max_new_tokens": args.max_new_tokens,
            "precision": loaded.precision.describe() if loaded.precision else None,
        },
        "command": " ".join([sys.executable, *sys.argv]),
        "paths": results,
        "compiled_over_eager_tokens_per_s": results["compiled"]["tokens_per_s"] / results["eager"]["tokens_per_s"],
        "first_differing_step_per_call": differences,
        "identical_rows_fraction_per_call": same_rows,
    }
    for name, r in results.items():
        print(f"{name:>8}: {r['tokens_per_s']:.0f} tokens/s, first call +{r['first_call_extra_s']:.1f} s")
    print(f"compiled / eager: {report['compiled_over_eager_tokens_per_s']:.2f}; first differing step: {differences}")
    print(f"identical rows: {same_rows}")
    out = common.write_report(report, args.out or common.default_out("decode-compile-cpu"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
