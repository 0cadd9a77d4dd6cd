"""``rlvr-fast eval``: the held-out evaluation of a model, or of a checkpoint's weights, without training."""

from __future__ import annotations

import json

from rlvr_fast.trainer.checkpoint import load_model_weights
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.data import load_problems
from rlvr_fast.trainer.evaluation import evaluate, evaluation_kwargs
from rlvr_fast.trainer.generation import HFGeneration
from rlvr_fast.trainer.model import load_model


def run_eval(cfg: RLVRConfig, checkpoint: str | None = None, loaded=None) -> str:
    """Evaluate the configured model (``loaded``: an already loaded one), with ``checkpoint``'s weights when given."""
    loaded = loaded or load_model(cfg)
    if checkpoint is not None:
        load_model_weights(checkpoint, loaded.model)  # strict: a checkpoint of another model is an error
    _, problems = load_problems(cfg)
    generator = HFGeneration(loaded.model, loaded.tokenizer, cfg.max_prompt_length, prefix_sharing=cfg.prefix_sharing)
    result = evaluate(generator, loaded.tokenizer, problems, **evaluation_kwargs(cfg))
    lines = [f"{len(problems)} problems x n={result.n}: pass@k [95% CI]"]
    for k, s in result.pass_at_k.items():
        lines.append(f"  pass@{k}: {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]")
    if result.calibration:
        lines.append("calibration: " + json.dumps(result.calibration))
    for name, f in result.formats.items():
        lines.append(f"format {name}: frequency {f['frequency']:.3f}, accuracy {f['accuracy']}")
    return "\n".join(lines)
