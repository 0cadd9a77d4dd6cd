"""Peak memory of one policy update on Gemma 3 270M (vocabulary 262144): the fused log-prob loss against a naive head.

One update = the decoder's forward over B completions of C tokens after P prompt tokens, the policy loss from the
hidden states at the completion positions, and the backward through loss, head and decoder. The two sides differ only
in the head:

- ``fused``: ``rlvr_fast.ops.fused_linear_grpo_loss`` on the hidden states and the LM head's weight, as the trainer's
  update calls it (``trainer/update/loss.py``; entropy metric on): the logits exist a chunk of rows at a time;
- ``naive``: the full (B x C, V) logits (``hidden @ weight.T``), ``log_softmax``, the sampled tokens' log-probs, then
  the same policy loss (``rlvr_fast.ops.grpo_loss``) on them; no entropy (which would cost the naive side one more
  (tokens x vocab) tensor: the comparison favours it).

The (tokens x vocab) floor is what one float32 logits tensor of the batch takes: B x C x V x 4 bytes; the naive head
holds several such tensors at its peak (logits, log-softmax, their gradients), the fused head none.

Both run in one process on the same model (the gemma3-270m GGUF, dequantised to float32 by ``load_model``), the same
synthetic batch (random token ids, completion lengths in [C/2, C], random advantages; the loss is a function of the
tokens, not of what they say), naive first, then fused, each after a small warm-up call. Peak = the growth of the
resident set over what was in use just before the call (``rlvr_fast.benchmark.memory.measure_peak_memory``: VmHWM reset
before the call, freed heap trimmed). The two losses must agree (a check that both compute the same update).

    python benchmarks/bench_gemma3_memory.py                    # 8 completions x 128 tokens after 32 prompt tokens
    python benchmarks/bench_gemma3_memory.py --completions 2 --completion-len 16    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402

MODEL = "gemma3-270m"
SIDES = ("naive", "fused")


def lscpu_model() -> str | None:
    """The CPU model as ``lscpu`` names it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def synthetic_rollout(vocab: int, b: int, p: int, c: int, seed: int = 0):
    """(Rollout, advantages): B rows of P prompt tokens and up to C completion tokens (lengths in [C/2, C])."""
    import torch

    from rlvr_fast.trainer.rollout.engines import Rollout

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(c // 2, c + 1, (b,), generator=g)
    completion_mask = (torch.arange(c)[None, :] < lengths[:, None]).long()
    rollout = Rollout(
        prompt_ids=torch.randint(3, vocab, (b, p), generator=g),
        prompt_mask=torch.ones(b, p, dtype=torch.long),
        completion_ids=torch.randint(3, vocab, (b, c), generator=g),
        completion_mask=completion_mask,
        truncated=torch.zeros(b, dtype=torch.bool),
        texts=[""] * b,
    )
    return rollout, torch.randn(b, generator=g)


def update_fn(model, side: str, rollout, advantages):
    """One forward + backward of the policy loss with ``side``'s head; returns the loss (detached)."""
    import torch

    from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss
    from rlvr_fast.ops.grpo_loss import grpo_loss
    from rlvr_fast.trainer.model import lm_head_weight
    from rlvr_fast.trainer.update.loss import completion_hidden

    weight, bias = lm_head_weight(model)
    mask = rollout.completion_mask.float()
    targets = rollout.completion_ids

    def run():
        model.zero_grad(set_to_none=True)
        hidden = completion_hidden(model, rollout)  # (B, C, D)
        if side == "fused":
            loss, _ = fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, bias=bias, return_entropy=True)
        else:
            logits = hidden @ weight.T  # (B, C, V): the floor the fused head avoids
            if bias is not None:
                logits = logits + bias
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            loss, _ = grpo_loss(logp, None, None, advantages, mask)
        loss.backward()
        return loss.detach()

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gemma3-memory-<date>.json)")
    args = parser.parse_args(argv)

    import torch

    from rlvr_fast.benchmark.memory import measure_peak_memory
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.model import load_model

    t0 = time.perf_counter()
    loaded = load_model(RLVRConfig(model=MODEL, device="cpu", dtype="float32"))
    load_s = time.perf_counter() - t0
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(True)
    vocab, hidden_size = model.get_output_embeddings().weight.shape
    rollout, advantages = synthetic_rollout(vocab, args.completions, args.prompt_len, args.completion_len)
    warm_rollout, warm_adv = synthetic_rollout(vocab, 1, 4, 4, seed=1)
    tokens = args.completions * args.completion_len
    floor = tokens * vocab * 4

    sides = {}
    for side in SIDES:
        update_fn(model, side, warm_rollout, warm_adv)()  # warm-up: first-touched pages, allocator pools
        model.zero_grad(set_to_none=True)
        run = update_fn(model, side, rollout, advantages)
        t = time.perf_counter()
        losses: list = []
        peak = measure_peak_memory(lambda run=run, losses=losses: losses.append(run()), torch.device("cpu"))
        seconds = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        sides[side] = {
            "peak_growth_bytes": None if peak is None else peak.growth_bytes,
            "peak_method": None if peak is None else peak.method,
            "seconds": seconds,
            "loss": float(losses[0]),
        }
        print(f"{side}: peak growth {sides[side]['peak_growth_bytes']} bytes, {seconds:.1f} s", file=sys.stderr)

    naive, fused = sides["naive"]["peak_growth_bytes"], sides["fused"]["peak_growth_bytes"]
    report = {
        "benchmark": "bench_gemma3_memory",
        "model": f"{MODEL} (gemma-3-270m Q4_K_M GGUF via rlvr_fast.trainer.model.load_model), float32, CPU",
        "shape": {
            "completions": args.completions,
            "completion_len": args.completion_len,
            "prompt_len": args.prompt_len,
            "vocab": vocab,
            "hidden": hidden_size,
            "completion_tokens": tokens,
        },
        "logits_floor_bytes": floor,  # one float32 (tokens x vocab) tensor
        "sides": sides,
        "naive_over_fused": (naive / fused) if naive and fused else None,
        "saved_bytes": (naive - fused) if naive is not None and fused is not None else None,
        "saved_in_logits_floors": ((naive - fused) / floor) if naive is not None and fused is not None else None,
        "losses_agree": abs(sides["naive"]["loss"] - sides["fused"]["loss"])
        <= 1e-4 * max(1.0, abs(sides["naive"]["loss"])),
        "load_s": load_s,
        "machine": {**common.machine_info(), "lscpu_model": lscpu_model()},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    out = common.write_report(report, args.out or common.default_out("gemma3-memory"))
    print(
        f"naive head {naive} bytes, fused {fused} bytes: naive / fused = {report['naive_over_fused']}; "
        f"logits floor {floor} bytes; wrote {out}"
    )


if __name__ == "__main__":
    main()
