"""Per-token log-probabilities and entropy, fused with the LM head: no (N, V) logits, forward or backward.

docs/design.md §3. With z = (hidden @ weight^T + bias) / temperature and targets t:

    logp_n    = z[n, t_n] - logsumexp(z[n])                     (always <= 0)
    entropy_n = logsumexp(z[n]) - sum_v p_nv z[n, v]            (p = softmax(z[n]))
    dz_nv     = g_logp (1[v = t_n] - p_nv) + g_ent p_nv (E_p[z] - z_nv),  times 1/temperature for the raw logits

GRPO needs the log-probability of every completion token under the policy, the old policy and the reference model
(Shao et al. 2024, arXiv:2402.03300), and materialising the (tokens x vocab) logits for it is the largest allocation of
a step (TRL #3678). Like cut-cross-entropy (Wijmans et al. 2024, arXiv:2411.09009) the fused paths only ever hold
tiles of the logits; unlike it they also return the entropy and its gradient, and take a temperature.

Four pieces, as in every op:
1. ``token_logprobs_reference`` / ``logprobs_from_logits_reference`` (rlvr_fast.ops.logprobs_reference): the spec.
2. the Triton kernels (rlvr_fast.kernels.logprobs): tiles of hidden x tiles of weight with an online logsumexp and
   online entropy, the backward recomputing logit tiles (dhidden / dweight GEMMs in cuBLAS, fp32 accumulation).
3. the torch path below: the same algorithm chunked over tokens and vocabulary (GEMM chunks of 4096 x 2048 on the CPU),
   logits recomputed in the backward, so CPU memory stays small as well.
4. the public ``token_logprobs`` and ``logprobs_from_logits``.

Rows whose target is ``ignore_index`` get logp 0 and entropy 0 and no gradient; ``token_logprobs`` drops them before
any GEMM (padding costs nothing and a NaN in a padding row's hidden state reaches nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr_fast.backends import select_backend
from rlvr_fast.ops.checks import accumulation_dtype, autocast_dtype

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LogprobsConfig:
    """How the fused paths walk the problem. The defaults are tuned; tests shrink them to cross chunk boundaries.

    torch path: GEMMs of ``tokens x vocab`` logits (4096 x 2048 fp32 = 32 MiB: big enough for MKL to run near its
    peak, and the few elementwise passes over it stay cheap next to the GEMMs); the logits-input path takes
    ``tokens * vocab`` elements of whole rows per step.
    Triton path: ``splits`` vocabulary splits in the forward (None: enough programs to fill the GPU),
    ``dz_chunk`` vocabulary columns per backward step (None: a 16M-element buffer), ``block_v`` columns per step of the
    logits-input kernels (None: 1024).
    ``empty(shape, dtype=, device=)`` allocates every buffer the fused paths fill themselves (outputs, gradients,
    scratch); tests pass one that fills with NaN to prove every element is written before it is read.
    """

    tokens: int = 4096
    vocab: int = 2048
    splits: int | None = None
    dz_chunk: int | None = None
    block_v: int | None = None
    empty: Callable[..., torch.Tensor] = torch.empty


DEFAULT_CONFIG = LogprobsConfig()


# --------------------------------------------------------------------------------------------------------------------
# Input checks (shared by both public functions)
# --------------------------------------------------------------------------------------------------------------------


def _check_flags(op: str, temperature, ignore_index, return_entropy) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a real number, got {type(temperature).__name__} {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{op}: return_entropy must be a bool, got {type(return_entropy).__name__}")


def _check_tensor(op: str, name: str, x, *, floating: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (one of {_FLOAT_DTYPES}), got dtype {x.dtype}")


def _check_targets(
    op: str, targets, lead_shape: torch.Size, vocab: int, ignore_index: int, device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat int64 targets, and the indices of the rows to keep (None when no row is ignore_index)."""
    _check_tensor(op, "targets", targets, floating=False)
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{op}: targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"{op}: targets are on {targets.device} but the inputs are on {device}")
    if targets.shape != lead_shape:
        raise ValueError(
            f"{op}: targets must have shape {tuple(lead_shape)} (the inputs' leading dims), got {tuple(targets.shape)}"
        )
    t = targets.reshape(-1).to(torch.int64).contiguous()
    if t.numel() == 0:
        return t, None
    keep = t != ignore_index
    bad = keep & ((t < 0) | (t >= vocab))
    any_bad, any_ignored = torch.stack([bad.any(), ~keep.all()]).tolist()  # one host sync for both
    if any_bad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"targets[{first}] (flat index) = {int(t[first])} ({int(bad.sum())} out of range in all)"
        )
    return t, (keep.nonzero().squeeze(1) if any_ignored else None)


@dataclass(frozen=True)
class _TokenInputs:
    hidden: torch.Tensor  # (N, D), unit column stride
    weight: torch.Tensor  # (V, D), unit column stride
    bias: torch.Tensor | None  # (V,)
    targets: torch.Tensor  # (N,) int64
    keep: torch.Tensor | None  # indices of the rows whose target is not ignore_index (None: all rows)
    out_shape: torch.Size


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_token_inputs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy) -> _TokenInputs:
    op = "token_logprobs"
    _check_tensor(op, "hidden", hidden, floating=True)
    _check_tensor(op, "weight", weight, floating=True)
    _check_flags(op, temperature, ignore_index, return_entropy)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{op}: hidden must be (N, D) or (B, T, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be (V, D), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{op}: weight must have V >= 1 rows and D >= 1 columns, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden size mismatch: hidden has D={hidden.shape[-1]} (shape {tuple(hidden.shape)}) but weight "
            f"has D={weight.shape[1]} (shape {tuple(weight.shape)})"
        )
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight is on {weight.device} but hidden is on {hidden.device}")
    if autocast_dtype(hidden.device) is not None:  # the LM head's matmul runs in the autocast dtype, as nn.Linear's
        dt = autocast_dtype(hidden.device)
        hidden, weight = hidden.to(dt), weight.to(dt)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{op}: hidden and weight must share a dtype, got hidden {hidden.dtype} and weight {weight.dtype}"
        )
    if bias is not None:
        _check_tensor(op, "bias", bias, floating=True)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"{op}: bias is on {bias.device} but hidden is on {hidden.device}")
        bias = bias.contiguous()
    t, keep = _check_targets(op, targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden.device)
    return _TokenInputs(
        hidden=_unit_stride(hidden.reshape(-1, hidden.shape[-1])),
        weight=_unit_stride(weight),
        bias=bias,
        targets=t,
        keep=keep,
        out_shape=targets.shape,
    )


# --------------------------------------------------------------------------------------------------------------------
# The torch path: chunked over tokens and vocabulary, logits recomputed in the backward
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _RowStats:
    """Online softmax statistics of a set of rows: max m, s = sum exp(z - m), a = sum exp(z - m) (z - m), target z."""

    m: torch.Tensor
    s: torch.Tensor
    a: torch.Tensor
    target: torch.Tensor

    @classmethod
    def allocate(cls, n: int, dtype: torch.dtype, device, empty=torch.empty) -> _RowStats:
        # no initial values: the first vocabulary chunk assigns m, s, a and every valid row's target lies in one chunk
        return cls(*(empty((n,), dtype=dtype, device=device) for _ in range(4)))

    def rows(self, r0: int, r1: int) -> _RowStats:
        return _RowStats(self.m[r0:r1], self.s[r0:r1], self.a[r0:r1], self.target[r0:r1])

    def results(self, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        log_s = torch.log(self.s)
        # (target - m) first: both are logits as computed, so the difference is exact when they are close and logp
        # keeps its own precision at |z| ~ 1e4 instead of lse's
        logp = (self.target - self.m) - log_s
        return logp, (log_s - self.a / self.s) if with_entropy else None, self.m + log_s


def _fold_chunk(
    z: torch.Tensor, scratch: torch.Tensor, local_t: torch.Tensor, st: _RowStats, *, first: bool, with_entropy: bool
) -> None:
    """Fold one (rows, cols) chunk of logits into ``st`` (in place). ``z`` is overwritten; ``scratch`` >= z.numel().

    local_t: the rows' targets minus the chunk's first column. When the chunk raises a row's max from m to m',
    s' = exp(m - m') s and a' = exp(m - m') (a + (m - m') s): every sum stays relative to the current max.
    """
    rows, cols = z.shape
    inside = (local_t >= 0) & (local_t < cols)
    picked = z.gather(1, local_t.clamp(0, cols - 1).unsqueeze(1)).squeeze(1)
    st.target.copy_(torch.where(inside, picked, st.target))
    m_new = z.amax(dim=1)
    if not first:
        m_new = torch.maximum(st.m, m_new)
    z.sub_(m_new.unsqueeze(1))  # z - m', in place: one (rows, cols) buffer besides scratch
    e = torch.exp(z, out=scratch[: rows * cols].view(rows, cols))
    s_chunk = e.sum(dim=1)
    a_chunk = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(rows) if with_entropy else None  # row dots, one pass
    if first:
        st.s.copy_(s_chunk)
        if with_entropy:
            st.a.copy_(a_chunk)
    else:
        alpha = torch.exp(st.m - m_new)
        if with_entropy:
            st.a.copy_(alpha * (st.a + (st.m - m_new) * st.s) + a_chunk)
        st.s.copy_(alpha * st.s + s_chunk)
    st.m.copy_(m_new)


def _logits_chunk(buf: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, inv_t: float):
    """(rows, cols) = (h @ w^T + b) * inv_t into the front of ``buf``, contiguous, in one GEMM (addmm's beta, alpha)."""
    out = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if b is not None:
        return torch.addmm(b, h, w.t(), beta=inv_t, alpha=inv_t, out=out)
    if inv_t == 1.0:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(out, h, w.t(), beta=0.0, alpha=inv_t, out=out)  # beta=0: out's old contents are never read


def _spans(total: int, step: int):
    return ((i, min(i + step, total)) for i in range(0, total, step))


def _token_fwd_torch(hidden, weight, bias, targets, inv_t, with_entropy, config: LogprobsConfig):
    n, _ = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    st = _RowStats.allocate(n, acc, hidden.device, config.empty)
    if n == 0:
        return st.results(with_entropy)
    nc, vc = min(n, config.tokens), min(v, config.vocab)
    zbuf = config.empty((nc * vc,), dtype=acc, device=hidden.device)
    ebuf = config.empty((nc * vc,), dtype=acc, device=hidden.device)
    # vocabulary outside, tokens inside: a weight chunk is read from memory once and reused by every token chunk
    for v0, v1 in _spans(v, vc):
        w = weight[v0:v1].to(acc)
        b = None if bias is None else bias[v0:v1].to(acc)
        for n0, n1 in _spans(n, nc):
            z = _logits_chunk(zbuf, hidden[n0:n1].to(acc), w, b, inv_t)
            _fold_chunk(z, ebuf, targets[n0:n1] - v0, st.rows(n0, n1), first=v0 == 0, with_entropy=with_entropy)
    return st.results(with_entropy)


def _dz_coefficients(lse, entropy, g_logp, g_ent, inv_t, acc):
    """Per-row coefficients of dz = p * (c0 + c1 * logp) + onehot * gl (docs/design.md §3 rearranged):
    with gl = g_logp / T and ge = g_ent / T, c1 = -ge and c0 = -(gl + ge * H)."""
    gl = None if g_logp is None else g_logp.to(acc) * inv_t
    ge = None if g_ent is None else g_ent.to(acc) * inv_t
    c0 = torch.zeros_like(lse) if gl is None else -gl
    if ge is not None:
        c0 = c0 - ge * entropy
    return gl, (None if ge is None else -ge), c0


def _dz_from_logits(z, scratch, lse, gl, c1, c0, local_t):
    """Overwrite z (logits) with scratch-backed dz; returns dz (a view of scratch)."""
    rows, cols = z.shape
    z.sub_(lse.unsqueeze(1))  # log p
    p = torch.exp(z, out=scratch[: rows * cols].view(rows, cols))
    if c1 is not None:
        torch.addcmul(c0.unsqueeze(1), z, c1.unsqueeze(1), out=z)  # c0 + c1 log p, in place
        p.mul_(z)
    else:
        p.mul_(c0.unsqueeze(1))
    if gl is not None:
        inside = (local_t >= 0) & (local_t < cols)
        p.scatter_add_(1, local_t.clamp(0, cols - 1).unsqueeze(1), torch.where(inside, gl, 0.0).unsqueeze(1))
    return p


def _token_bwd_torch(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, inv_t, needs, config: LogprobsConfig):
    need_h, need_w, need_b = needs
    n, d = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    dev = hidden.device
    work = n > 0 and (g_logp is not None or g_ent is not None)
    # The first GEMM into each accumulator runs with beta=0, so they start uninitialised unless there is no work.
    new = config.empty if work else torch.zeros
    # fp32 accumulators; for fp32 / fp64 inputs they are the outputs themselves
    dh = new((n, d), dtype=acc, device=dev) if need_h else None
    dw = new(tuple(weight.shape), dtype=weight.dtype, device=dev) if need_w else None
    dw_acc = (
        None if (not need_w or weight.dtype == acc) else config.empty((min(v, config.vocab), d), dtype=acc, device=dev)
    )
    db = new((v,), dtype=acc, device=dev) if need_b else None
    if work:
        gl, c1, c0 = _dz_coefficients(lse, entropy, g_logp, g_ent, inv_t, acc)
        nc, vc = min(n, config.tokens), min(v, config.vocab)
        zbuf = config.empty((nc * vc,), dtype=acc, device=dev)
        ebuf = config.empty((nc * vc,), dtype=acc, device=dev)
        for v0, v1 in _spans(v, vc):
            w = weight[v0:v1].to(acc)
            b = None if bias is None else bias[v0:v1].to(acc)
            dw_c = None if dw is None else (dw[v0:v1] if dw_acc is None else dw_acc[: v1 - v0])
            for n0, n1 in _spans(n, nc):
                h = hidden[n0:n1].to(acc)
                z = _logits_chunk(zbuf, h, w, b, inv_t)
                dz = _dz_from_logits(
                    z,
                    ebuf,
                    lse[n0:n1],
                    None if gl is None else gl[n0:n1],
                    None if c1 is None else c1[n0:n1],
                    c0[n0:n1],
                    targets[n0:n1] - v0,
                )
                if dh is not None:
                    dh[n0:n1].addmm_(dz, w, beta=0.0 if v0 == 0 else 1.0)
                if dw_c is not None:
                    dw_c.addmm_(dz.t(), h, beta=0.0 if n0 == 0 else 1.0)
                if db is not None:
                    if n0 == 0:
                        torch.sum(dz, dim=0, out=db[v0:v1])
                    else:
                        db[v0:v1] += dz.sum(dim=0)
            if dw_acc is not None:
                dw[v0:v1].copy_(dw_c)
    return (
        None if dh is None else dh.to(hidden.dtype),
        dw,
        None if db is None else db.to(bias.dtype),
    )


def _logits_rows_per_chunk(v: int, config: LogprobsConfig) -> int:
    return max(1, (config.tokens * config.vocab) // v)


def _logits_fwd_torch(logits, targets, inv_t, ignore_index, with_entropy, config: LogprobsConfig):
    n, v = logits.shape
    acc = accumulation_dtype(logits.dtype)
    st = _RowStats.allocate(n, acc, logits.device, config.empty)
    if n == 0:
        return st.results(with_entropy)
    st.target.zero_()  # an ignored row's target lies in no chunk
    nc = min(n, _logits_rows_per_chunk(v, config))
    zbuf = config.empty((nc * v,), dtype=acc, device=logits.device)
    ebuf = config.empty((nc * v,), dtype=acc, device=logits.device)
    for n0, n1 in _spans(n, nc):
        z = zbuf[: (n1 - n0) * v].view(n1 - n0, v).copy_(logits[n0:n1])  # never write into the caller's logits
        if inv_t != 1.0:
            z.mul_(inv_t)
        _fold_chunk(z, ebuf, targets[n0:n1], st.rows(n0, n1), first=True, with_entropy=with_entropy)
    keep = targets != ignore_index
    return tuple(None if x is None else torch.where(keep, x, 0.0) for x in st.results(with_entropy))


def _logits_bwd_torch(logits, targets, lse, entropy, g_logp, g_ent, inv_t, ignore_index, config: LogprobsConfig):
    n, v = logits.shape
    acc = accumulation_dtype(logits.dtype)
    dlogits = config.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return dlogits
    gl, c1, c0 = _dz_coefficients(lse, entropy, g_logp, g_ent, inv_t, acc)
    nc = min(n, _logits_rows_per_chunk(v, config))
    zbuf = config.empty((nc * v,), dtype=acc, device=logits.device)
    # fp32 / fp64 logits: dz is written straight into the gradient; otherwise through one chunk buffer
    ebuf = None if logits.dtype == acc else config.empty((nc * v,), dtype=acc, device=logits.device)
    for n0, n1 in _spans(n, nc):
        rows = n1 - n0
        z = zbuf[: rows * v].view(rows, v).copy_(logits[n0:n1])
        if inv_t != 1.0:
            z.mul_(inv_t)
        out = dlogits[n0:n1]
        scratch = out.view(-1) if ebuf is None else ebuf
        dz = _dz_from_logits(
            z,
            scratch,
            lse[n0:n1],
            None if gl is None else gl[n0:n1],
            None if c1 is None else c1[n0:n1],
            c0[n0:n1],
            targets[n0:n1],
        )
        ignored = (targets[n0:n1] == ignore_index).nonzero().squeeze(1)
        if ignored.numel():
            dz.index_fill_(0, ignored, 0.0)  # padding rows: no gradient, whatever their logits hold
        if ebuf is not None:
            out.copy_(dz)
    return dlogits


# --------------------------------------------------------------------------------------------------------------------
# The Triton path (rlvr_fast.kernels.logprobs), imported late: TRITON_INTERPRET must be set first
# --------------------------------------------------------------------------------------------------------------------


def _token_fwd_triton(hidden, weight, bias, targets, inv_t, with_entropy, config: LogprobsConfig):
    from rlvr_fast.kernels.logprobs import token_logprobs_fwd

    return token_logprobs_fwd(
        hidden, weight, bias, targets, inv_t, with_entropy=with_entropy, splits=config.splits, empty=config.empty
    )


def _token_bwd_triton(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, inv_t, needs, config: LogprobsConfig):
    from rlvr_fast.kernels.logprobs import token_logprobs_bwd

    need_h, need_w, need_b = needs
    return token_logprobs_bwd(
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        g_logp,
        g_ent,
        inv_t,
        need_hidden=need_h,
        need_weight=need_w,
        need_bias=need_b,
        chunk=config.dz_chunk,
        empty=config.empty,
    )


def _logits_fwd_triton(logits, targets, inv_t, ignore_index, with_entropy, config: LogprobsConfig):
    from rlvr_fast.kernels.logprobs import logprobs_from_logits_fwd

    return logprobs_from_logits_fwd(
        logits, targets, inv_t, ignore_index, with_entropy=with_entropy, block_v=config.block_v, empty=config.empty
    )


def _logits_bwd_triton(logits, targets, lse, entropy, g_logp, g_ent, inv_t, ignore_index, config: LogprobsConfig):
    from rlvr_fast.kernels.logprobs import logprobs_from_logits_bwd

    return logprobs_from_logits_bwd(
        logits, targets, lse, entropy, g_logp, g_ent, inv_t, ignore_index, block_v=config.block_v, empty=config.empty
    )


@dataclass(frozen=True)
class _Path:
    fwd: Callable
    bwd: Callable


TOKEN_PATHS: dict[str, _Path] = {
    "torch": _Path(_token_fwd_torch, _token_bwd_torch),
    "triton": _Path(_token_fwd_triton, _token_bwd_triton),
}
_LOGITS_PATHS: dict[str, _Path] = {
    "torch": _Path(_logits_fwd_torch, _logits_bwd_torch),
    "triton": _Path(_logits_fwd_triton, _logits_bwd_triton),
}


# --------------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------------


def _entropy_output(entropy: torch.Tensor | None, like: torch.Tensor, ctx) -> torch.Tensor:
    if entropy is not None:
        return entropy
    dummy = like.new_empty(0)
    ctx.mark_non_differentiable(dummy)
    return dummy


class TokenLogprobsFunction(torch.autograd.Function):
    """(logp, entropy) of targets under softmax((hidden @ weight^T + bias) * inv_t), never holding (N, V) logits.

    apply(hidden (N, D), weight (V, D), bias (V,) | None, targets (N,) int64 in [0, V), inv_t, with_entropy,
    backend "torch" | "triton", config) -> logp (N,), entropy (N,) (empty when not asked), both in fp32 (fp64 for
    fp64 inputs). Saves hidden, weight, bias, targets and the per-row lse and entropy: O(N) besides the inputs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, with_entropy, backend, config):
        ctx.set_materialize_grads(False)  # an entropy computed for logging only costs no backward work
        with torch.autocast(hidden.device.type, enabled=False):  # the paths pick their own precision
            logp, entropy, lse = TOKEN_PATHS[backend].fwd(hidden, weight, bias, targets, inv_t, with_entropy, config)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_t, ctx.backend, ctx.config = inv_t, backend, config
        return logp, _entropy_output(entropy, logp, ctx)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if entropy is None:
            g_ent = None
        needs = tuple(ctx.needs_input_grad[:3])
        needs = (needs[0], needs[1], needs[2] and bias is not None)
        if not any(needs) or (g_logp is None and g_ent is None):
            return None, None, None, None, None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = TOKEN_PATHS[ctx.backend].bwd(
                hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, ctx.inv_t, needs, ctx.config
            )
        return dh, dw, db, None, None, None, None, None


class LogprobsFromLogitsFunction(torch.autograd.Function):
    """(logp, entropy) of targets under softmax(logits * inv_t) in one pass over the logits.

    apply(logits (N, V), targets (N,) int64 in [0, V) or ignore_index, inv_t, ignore_index, with_entropy, backend,
    config) -> logp (N,), entropy (N,) (empty when not asked). The backward writes dlogits (the logits' dtype)
    directly: no second (N, V) buffer.
    """

    @staticmethod
    def forward(ctx, logits, targets, inv_t, ignore_index, with_entropy, backend, config):
        ctx.set_materialize_grads(False)
        with torch.autocast(logits.device.type, enabled=False):
            logp, entropy, lse = _LOGITS_PATHS[backend].fwd(logits, targets, inv_t, ignore_index, with_entropy, config)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.inv_t, ctx.ignore_index, ctx.backend, ctx.config = inv_t, ignore_index, backend, config
        return logp, _entropy_output(entropy, logp, ctx)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, entropy = ctx.saved_tensors
        if entropy is None:
            g_ent = None
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None, None, None, None
        with torch.autocast(logits.device.type, enabled=False):
            dlogits = _LOGITS_PATHS[ctx.backend].bwd(
                logits, targets, lse, entropy, g_logp, g_ent, ctx.inv_t, ctx.ignore_index, ctx.config
            )
        return dlogits, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------------
# The public ops
# --------------------------------------------------------------------------------------------------------------------


def _finish(outputs, keep: torch.Tensor | None, n: int, shape: torch.Size, return_entropy: bool):
    """float32 outputs of the targets' shape; dropped (ignore_index) rows get exactly 0."""
    results = []
    for x in outputs[: 2 if return_entropy else 1]:
        x = x.float()
        if keep is not None:
            x = x.new_zeros(n).index_copy(0, keep, x)
        results.append(x.reshape(shape))
    return tuple(results) if return_entropy else results[0]


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    config: LogprobsConfig = DEFAULT_CONFIG,
):
    """Log-probability (and entropy) of each target token under softmax((hidden @ weight^T + bias) / temperature).

    Fuses the LM head with log_softmax + gather (+ entropy): the (N, V) logits never exist, forward or backward.

    Args:
        hidden: (N, D) or (B, T, D) floating (fp16 / bf16 / fp32 / fp64), the last hidden states.
        weight: (V, D), the LM head (or tied embedding), hidden's dtype. Under ``torch.autocast`` both are cast to the
            autocast dtype first (as nn.Linear's matmul would be), and their gradients flow back in their own dtypes.
        targets: (N,) or (B, T) integer token ids in [0, V), or ``ignore_index``.
        bias: optional (V,) floating.
        temperature: > 0; the logits are divided by it (the sampling temperature of the rollout).
        ignore_index: targets equal to it give logp 0, entropy 0 and no gradient (their rows are skipped).
        return_entropy: also return the entropy of each row's distribution (differentiable too).
        backend: "auto" | "triton" | "cuda" | "torch" (rlvr_fast.backends); an unavailable one raises.
        config: chunk sizes of the fused paths (advanced; the defaults are tuned), see ``LogprobsConfig``.

    Returns:
        logp: float32, the targets' shape, <= 0; with ``return_entropy`` a tuple (logp, entropy).
        Differentiable w.r.t. hidden, weight and bias; their gradients come in their dtypes, accumulated in fp32.
        A NaN in a hidden row gives NaN in that row's outputs only.
    """
    chk = _check_token_inputs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy)
    chosen = select_backend(backend, chk.hidden.device, op="token_logprobs")
    h, t = chk.hidden, chk.targets
    if chk.keep is not None:
        h, t = h.index_select(0, chk.keep), t.index_select(0, chk.keep)
    if h.shape[0] == 0:
        chosen = "torch"  # nothing to launch; the torch path returns empty, differentiable outputs
    outputs = TokenLogprobsFunction.apply(h, chk.weight, chk.bias, t, 1.0 / temperature, return_entropy, chosen, config)
    return _finish(outputs, chk.keep, chk.targets.numel(), chk.out_shape, return_entropy)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    config: LogprobsConfig = DEFAULT_CONFIG,
):
    """``token_logprobs`` for callers that already hold the logits: one pass with an online logsumexp.

    Args:
        logits: (N, V) or (B, T, V) floating.
        targets: (N,) or (B, T) integer token ids in [0, V), or ``ignore_index``.
        temperature, ignore_index, return_entropy, backend, config: as in ``token_logprobs``.

    Returns:
        logp (float32, the targets' shape), or (logp, entropy). The backward writes the logits' gradient directly,
        without a second (N, V) buffer.
    """
    op = "logprobs_from_logits"
    _check_tensor(op, "logits", logits, floating=True)
    _check_flags(op, temperature, ignore_index, return_entropy)
    if logits.dim() not in (2, 3):
        raise ValueError(f"{op}: logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have V >= 1 columns, got shape {tuple(logits.shape)}")
    t, _ = _check_targets(op, targets, logits.shape[:-1], logits.shape[-1], ignore_index, logits.device)
    z = _unit_stride(logits.reshape(-1, logits.shape[-1]))
    chosen = select_backend(backend, z.device, op=op)
    if z.shape[0] == 0:
        chosen = "torch"
    outputs = LogprobsFromLogitsFunction.apply(z, t, 1.0 / temperature, ignore_index, return_entropy, chosen, config)
    return _finish(outputs, None, t.numel(), targets.shape, return_entropy)
