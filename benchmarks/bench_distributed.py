"""Data-parallel training steps on the CPU: throughput of 1 process vs ``torchrun --nproc_per_node=2``, and
the bytes FSDP2 all-gathers / reduce-scatters (or DDP all-reduces) per step, counted at the collectives, against the
count on paper (docs/design.md, "Data parallelism").

A random tiny Llama (``--hidden``, ``--layers``; a character tokenizer, no download) trains on the built-in arithmetic
task; each process times ``Trainer.train_step`` (rollout, scoring, update) over ``--steps`` steps after one warm-up
step. The collectives are counted by wrapping ``torch.distributed.all_gather_single``, ``reduce_scatter_single`` and
``all_reduce`` in the worker (FSDP2 calls them through the module's attributes): bytes of the full tensor each call
moves (gathered output / scattered input / reduced buffer), summed over the measured steps and divided by their
number. DDP's gradient all-reduces run inside its C++ reducer, which these counters do not see: under ``ddp`` only the
count on paper is given for them.

``--prefix-sharing off`` runs the update without the shared prefix (the trainer's ``prefix_sharing``; the rollout
unchanged, so the update batches are the same as with it); ``--random-reward W`` adds the random reward mode so that
every step has groups to update. ``--shared-update``, the flag's former name, is still accepted (with a warning on
stderr); the result files keep their names (``-unshared-update`` for ``off``).

    python benchmarks/bench_distributed.py                       # fsdp, 2 processes vs 1, JSON in benchmarks/results
    python benchmarks/bench_distributed.py --parallel ddp --steps 2
    python benchmarks/bench_distributed.py --prefix-sharing off      # the update without the shared prefix

On a machine whose cores are shared, 2 processes on 2 cores do not double anything: the numbers say what they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _count_collectives(counts: dict) -> None:
    import torch.distributed as dist

    def wrap(name: str, size_of):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            t = size_of(*args, **kwargs)
            counts[name] = counts.get(name, 0) + t.numel() * t.element_size()
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def argument(position: int, *names: str):
        def pick(*args, **kwargs):
            for name in names:
                if name in kwargs:
                    return kwargs[name]
            return args[position]

        return pick

    wrap("all_gather_single", argument(0, "output_tensor", "output"))  # FSDP2's all-gather (torch 2.13): the output
    wrap("reduce_scatter_single", argument(1, "input_tensor", "input"))  # FSDP2's reduce-scatter: the input
    wrap("all_reduce", argument(0, "tensor"))  # DDP's gradient buckets, and our metric / normaliser sums


def _paper_bytes(trainer, micro_batches: float, parallel: str, world: int) -> dict:
    """The count on paper per step, in the convention of the counters (full tensor sizes, fp32): FSDP all-gathers the
    whole model for generation, each layer at each of its calls in every micro-batch's forward and again in its
    backward (two calls with the shared prefix: the prompts, then the completions; one without), the root once for
    the update; reduce-scatters every parameter's gradient once per micro-batch. DDP all-reduces every gradient per
    micro-batch."""
    model = trainer.model
    decoder = getattr(model, model.base_model_prefix)
    layer_params = sum(p.numel() for layer in decoder.layers for p in layer.parameters())
    all_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # DTensor numel is the global size; FSDP pads dim 0 to a multiple of the world size (ignored here)
    root_params = all_params - layer_params
    # decoder calls per micro-batch forward (parallel/wrappers.py module doc)
    calls = 2 if trainer.prefix_sharing else 1
    if parallel == "fsdp":
        gathered = all_params + 2 * calls * micro_batches * layer_params + root_params
        return {"all_gather_single": 4 * gathered, "reduce_scatter_single": 4 * micro_batches * all_params}
    return {"all_reduce": 4 * micro_batches * all_params}


def worker(args) -> None:
    import torch

    from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.loop import Trainer
    from rlvr_fast.trainer.model import LoadedModel

    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden=args.hidden, layers=args.layers)
    cfg = RLVRConfig(
        task="arithmetic",
        train_size=64,
        eval_size=4,
        group_size=args.group,
        prompts_per_step=args.prompts,
        max_prompt_length=128,
        max_completion_length=args.completion_len,
        steps=args.steps + 1,
        progress=False,
        checkpoint_every=0,
        grad_clip=1.0,
        rewards={"correct": 1.0, **({"random": args.random_reward} if args.random_reward else {})},
        parallel=args.parallel,
        output_dir=args.output_dir,
        overwrite=True,
    )
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    if args.prefix_sharing == "off":  # the update only: the rollout (and so the update batch) stays the same
        trainer.prefix_sharing = False
    trainer.train_step(0)  # warm-up (lazy initialisation, allocator)
    counts: dict = {}
    _count_collectives(counts)
    seconds, tokens, micro, decoder_tokens, update_seconds = 0.0, 0.0, 0.0, 0.0, 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        record = trainer.train_step(step)
        seconds += time.perf_counter() - start
        tokens += record["completion_tokens"]
        micro += record.get("micro_batches", 0)
        decoder_tokens += record.get("decoder_tokens", 0)
        update_seconds += record["time_forward_backward_s"]
    if trainer.world.is_main:
        world = trainer.world.world_size
        out = {
            "world_size": world,
            "parallel": trainer.world.mode,
            "prefix_sharing_update": trainer.prefix_sharing,
            "seconds_per_step": seconds / args.steps,
            "forward_backward_seconds_per_step": update_seconds / args.steps,
            "completion_tokens_per_s": tokens / seconds,
            "micro_batches_per_step": micro / args.steps,  # rank 0's count (every rank runs as many)
            "decoder_tokens_per_step": decoder_tokens / args.steps,  # all ranks' positions, fillers included
            "measured_bytes_per_step": {k: v / args.steps for k, v in counts.items()},
        }
        if world > 1:
            # micro_batches in the record: every rank's count, the filler micro-batches included
            out["paper_bytes_per_step_rank0_plan"] = _paper_bytes(
                trainer, micro / args.steps, trainer.world.mode, world
            )
        with open(args.result, "w") as f:
            json.dump(out, f)


# Former spellings of flags -> the current one: still accepted, each use warns once on stderr.
RENAMED_FLAGS = {"--shared-update": "--prefix-sharing"}


class _RenamedFlag(argparse.Action):
    """Stores the value like ``store``; given under a former spelling (``RENAMED_FLAGS``), also says the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in RENAMED_FLAGS:
            print(
                f"{parser.prog}: warning: {option_string} is renamed {RENAMED_FLAGS[option_string]}; "
                f"use {RENAMED_FLAGS[option_string]} {values}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (tests/project/test_bench_flags.py parses with it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", default="fsdp", choices=["fsdp", "ddp"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=16)
    p.add_argument(
        "--random-reward",
        type=float,
        default=0.0,
        help="weight of the random reward mode beside correct (> 0: groups of unequal rewards, an update every step)",
    )
    p.add_argument(
        "--prefix-sharing",
        *RENAMED_FLAGS,  # the former spelling, same meaning
        dest="prefix_sharing",
        action=_RenamedFlag,
        default="on",
        choices=["on", "off"],
        help="the update with the shared prefix (on: as the trainer's prefix_sharing=auto resolves for the model) or "
        "without (off); --shared-update is its former name",
    )
    p.add_argument("--json", default=None, help="where to write the results (default: benchmarks/results/...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        worker(args)
        return
    shape = ["--parallel", args.parallel, "--steps", str(args.steps), "--hidden", str(args.hidden), "--layers",
             str(args.layers), "--prompts", str(args.prompts), "--group", str(args.group), "--completion-len",
             str(args.completion_len), "--prefix-sharing", args.prefix_sharing, "--random-reward",
             str(args.random_reward)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            result, out_dir = os.path.join(tmp, f"w{world}.json"), os.path.join(tmp, f"run{world}")
            tail = [__file__, "--worker", "--result", result, "--output-dir", out_dir, *shape]
            launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", f"--nproc_per_node={world}"]  # fmt: skip
            subprocess.run([*launcher, *tail], env=env, check=True)
            with open(result) as f:
                results.append(json.load(f))
    report = {"shape": dict(zip(shape[::2], shape[1::2])), "runs": results, "cpu_count": os.cpu_count()}
    report["speedup_2_vs_1"] = results[1]["completion_tokens_per_s"] / results[0]["completion_tokens_per_s"]
    # the file names keep the flag's former name: results measured before the rename still match
    sharing = ("" if args.prefix_sharing == "on" else "-unshared-update") + (
        "-random-reward" if args.random_reward else ""
    )
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"distributed-{args.parallel}{sharing}-cpu.json"
    )
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
