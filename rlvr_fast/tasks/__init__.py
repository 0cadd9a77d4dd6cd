"""Clean synthetic tasks (docs/design.md §8): a seeded arithmetic generator in the style of RandomCalculation,
prompt templates, train/eval splits that share no expression, and JSONL loading with line-numbered errors."""

from rlvr_fast.tasks.arithmetic import (
    OPERATIONS,
    PRESETS,
    ArithmeticConfig,
    Expression,
    expression_space_size,
    format_answer,
    get_preset,
    sample_expression,
)
from rlvr_fast.tasks.jsonl import JSONLFormatError, load_jsonl, load_jsonl_numbered, parse_jsonl_lines, save_jsonl
from rlvr_fast.tasks.prompts import PROMPT_TEMPLATES, check_template, render_prompt
from rlvr_fast.tasks.splits import generate_problems, make_splits

__all__ = [
    "OPERATIONS",
    "PRESETS",
    "PROMPT_TEMPLATES",
    "ArithmeticConfig",
    "Expression",
    "JSONLFormatError",
    "check_template",
    "expression_space_size",
    "format_answer",
    "generate_problems",
    "get_preset",
    "load_jsonl",
    "load_jsonl_numbered",
    "make_splits",
    "parse_jsonl_lines",
    "render_prompt",
    "sample_expression",
    "save_jsonl",
]
