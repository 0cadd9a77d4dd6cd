"""Assertion helpers shared by the tests and the benchmarks (one place, imported everywhere).

Conventions (docs/design.md, "Testing"): compare against the reference by relative RMS error and report it; check NaN
parity; poison outputs before a kernel writes them and check every element was written.
"""

from __future__ import annotations

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / max(||expected||_2, tiny), computed in float64 over the finite entries of ``expected``.

    Entries where ``expected`` is NaN are left to ``assert_nan_parity``.
    """
    a = actual.detach().to(torch.float64).cpu().reshape(-1)
    e = expected.detach().to(torch.float64).cpu().reshape(-1)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    keep = torch.isfinite(e)
    a, e = a[keep], e[keep]
    if e.numel() == 0:
        return 0.0
    num = torch.linalg.vector_norm(a - e)
    den = torch.linalg.vector_norm(e).clamp_min(torch.finfo(torch.float64).tiny)
    if not torch.isfinite(num):
        return float("inf")
    return float(num / den)


def assert_nan_parity(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    """NaN exactly where the reference has NaN, nowhere else."""
    a_nan = torch.isnan(actual.detach().cpu())
    e_nan = torch.isnan(expected.detach().cpu())
    if not torch.equal(a_nan, e_nan):
        extra = (a_nan & ~e_nan).nonzero().tolist()[:5]
        missing = (~a_nan & e_nan).nonzero().tolist()[:5]
        raise AssertionError(
            f"{name}: NaN pattern differs; NaN only in actual at {extra}, only in expected at {missing}"
        )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    name: str = "output",
) -> None:
    """Same shape, same NaN pattern, and relative RMS error <= rtol (or max abs error <= atol where rtol fails).

    The message always reports the relative RMS error and the worst element.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    assert_nan_parity(actual, expected, name)
    err = rel_rms_error(actual, expected)
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if err <= rtol or max_abs <= atol:
        return
    worst = int(diff.reshape(-1).argmax()) if diff.numel() else 0
    raise AssertionError(
        f"{name}: relative RMS error {err:.3e} > rtol {rtol:.1e} (max abs error {max_abs:.3e} > atol {atol:.1e}); "
        f"worst flat index {worst}: actual {a.reshape(-1)[worst].item()!r} vs expected {e.reshape(-1)[worst].item()!r}"
    )


def poisoned(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A tensor full of NaN (or the dtype's max for integers): anything a kernel fails to write stays visible."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def assert_all_written(t: torch.Tensor, name: str = "output") -> None:
    """No element of a poisoned output is still NaN."""
    bad = torch.isnan(t.detach().cpu()) if t.is_floating_point() else t.detach().cpu() == torch.iinfo(t.dtype).max
    if bool(bad.any()):
        raise AssertionError(
            f"{name}: {int(bad.sum())} elements were never written, first at {bad.nonzero()[0].tolist()}"
        )


def assert_low_precision_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    plain: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 0.0,
    name: str = "output",
) -> None:
    """The low-precision rule (docs/design.md, "Testing"): ``actual``'s relative RMS error against the fp32 reference
    ``expected`` is at most ``factor`` times that of ``plain`` (plain PyTorch run in the same low precision) plus
    ``atol``; NaN patterns must agree."""
    assert_nan_parity(actual, expected, name)
    err, base = rel_rms_error(actual, expected), rel_rms_error(plain, expected)
    if err > factor * base + atol:
        raise AssertionError(
            f"{name}: relative RMS error {err:.3e} > {factor} x plain low-precision PyTorch's {base:.3e} + {atol:.1e}"
        )


# --------------------------------------------------------------------------------------------------------------------
# A tiny causal LM and a character tokenizer, built offline, for trainer and integration tests
# --------------------------------------------------------------------------------------------------------------------


def char_tokenizer():
    """A character-level transformers tokenizer over printable ASCII (+ <pad>=0, <eos>=1, <unk>=2), no download."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    hf.padding_side = "left"
    return hf


def tiny_causal_lm(
    tokenizer,
    *,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    token_bias: dict[str, float] | None = None,
):
    """A randomly initialised Llama or Qwen2 built from a config (no download), float32, in eval mode.

    ``token_bias`` adds a bias to the LM head's logits of the named tokens (e.g. make digits likely so that a reward
    that checks a numeric answer fires sometimes); the head is then untied from the embeddings and has a bias.
    """
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=token_bias is None,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_cls(config)
        if token_bias:
            head = torch.nn.Linear(hidden, len(tokenizer), bias=True)
            with torch.no_grad():
                head.weight.copy_(model.get_input_embeddings().weight)
                head.bias.zero_()
                for token, value in token_bias.items():
                    head.bias[tokenizer.convert_tokens_to_ids(token)] = value
            model.set_output_embeddings(head)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def cuda_backend_skip_reason() -> str | None:
    """Why tests cannot run ``backend="cuda"`` here (None when they can): the extension rlvr_fast._C must be built and
    a CUDA device present (the tests' ``device`` fixture is then CUDA). Use it as a skip mark's reason, so the cuda
    cases show up as skipped, with the reason, wherever they cannot run."""
    from rlvr_fast.backends import has_cuda_extension

    if not has_cuda_extension():
        return "backend='cuda' needs the extension rlvr_fast._C (built only where torch has CUDA and nvcc is found)"
    if not torch.cuda.is_available():
        return "backend='cuda' needs a CUDA device"
    return None


def backend_params(*backends: str) -> list:
    """pytest parameters for ``backends``, "cuda" marked to skip with ``cuda_backend_skip_reason()`` when it cannot
    run; the others run everywhere."""
    import pytest

    reason = cuda_backend_skip_reason()
    return [
        pytest.param(b, marks=pytest.mark.skipif(reason is not None, reason=reason or "")) if b == "cuda" else b
        for b in backends
    ]


def _faithful_rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def fp64_faithful_norms(model):
    """Make each RMSNorm of ``model`` compute in its input's dtype (returns the model).

    transformers' RMSNorm computes in float32 whatever the input dtype (it casts fp64 down and back), which caps any
    fp64 comparison of two paths through the decoder at fp32 rounding; with the same formula in the input's dtype an
    fp64 model is fp64 throughout.
    """
    import types

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_faithful_rms_norm, module)
    return model


def random_rollout(tokenizer, prompts: list[str], group_size: int, max_completion: int, generator: torch.Generator):
    """A ``Rollout`` of ``prompts`` (left-padded, each repeated ``group_size`` times) and random right-padded
    completions of random lengths in [1, max_completion] (row 0 the full width), for update tests without sampling."""
    from rlvr_fast.trainer.rollout.engines import Rollout

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = len(prompts) * group_size
    ids = torch.randint(3, len(tokenizer), (rows, max_completion), generator=generator)
    lengths = torch.randint(1, max_completion + 1, (rows,), generator=generator)
    lengths[0] = max_completion
    mask = (torch.arange(max_completion)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, tokenizer.pad_token_id)
    return Rollout(
        prompt_ids=enc["input_ids"].repeat_interleave(group_size, dim=0),
        prompt_mask=enc["attention_mask"].repeat_interleave(group_size, dim=0),
        completion_ids=ids,
        completion_mask=mask,
        truncated=torch.zeros(rows, dtype=torch.bool),
        texts=[""] * rows,
    )
