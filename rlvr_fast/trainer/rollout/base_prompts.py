"""The prompt a base model sees: a named plain-text template, given to its tokenizer as its chat template.

A pretrained (not instruction-tuned) model ships a tokenizer without a chat template. ``load_tokenizer``
(``trainer/model.py``) gives such a tokenizer a template of ``BASE_PROMPTS``, written as a chat template
(``base_chat_template``): the one the model's registry entry names (``shipped_models``: gemma3-270m gets
``question_answer``, "Question: <message>\nAnswer:", because asked the bare question it continues the question), else
``DEFAULT_BASE_PROMPT`` (``plain``: the bare message, what such a model was always sent: a local folder's base model
has no known format). Because it is the tokenizer's chat template, everything that renders prompts renders the same
text: the rollout, the held-out evaluation, the prompt-length check before the load, the TRL integration, a saved
checkpoint's tokenizer.

The rollout tokenizes prompts without special tokens (a chat template writes its own BOS), so every base template
starts with the BOS token exactly where the tokenizer itself would put one (Gemma and Llama do, GPT-2 does not): the
model sees the same first token as at the start of its pretraining documents.
"""

from __future__ import annotations

import json

# name -> (text before the user message, text after it). The answer is what the model writes after the last part.
BASE_PROMPTS: dict[str, tuple[str, str]] = {
    "question_answer": ("Question: ", "\nAnswer:"),  # "Question: What is 2 + 3? ...\nAnswer:"
    "plain": ("", ""),  # the bare message
}
DEFAULT_BASE_PROMPT = "plain"


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding (``add_special_tokens=True``) starts with its BOS token."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos_id]


def base_chat_template(name: str, bos: bool) -> str:
    """The Jinja chat template of the base prompt ``name``: [BOS], then per message: a system message and a blank
    line, a user message inside the template's two parts, an assistant message (a previous answer: a space, the text,
    a blank line)."""
    if name not in BASE_PROMPTS:
        raise ValueError(f"base prompt template must be one of {tuple(BASE_PROMPTS)}, got {name!r}")
    before, after = (json.dumps(part) for part in BASE_PROMPTS[name])  # Jinja string literals
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        + "{% if message['role'] == 'system' %}{{ message['content'] }}{{ '\\n\\n' }}"
        + f"{{% elif message['role'] == 'user' %}}{{{{ {before} }}}}{{{{ message['content'] }}}}{{{{ {after} }}}}"
        + "{% else %}{{ ' ' }}{{ message['content'] }}{{ '\\n\\n' }}{% endif %}"
        + "{% endfor %}"
    )


def use_base_prompt(tokenizer, name: str) -> bool:
    """Give ``tokenizer`` the base prompt ``name`` as its chat template where it has none (module doc); returns
    whether it did. A tokenizer with a chat template keeps it."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = base_chat_template(name, adds_bos(tokenizer))
    return True
