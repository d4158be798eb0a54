"""Plain-PyTorch reference implementations of every fastbert op.

These are the ground truth of the test suite and the ``torch`` backend. They favour being
obviously right over being fast: each is a few lines of standard PyTorch, computed in the
input dtype except where noted (softmax and LayerNorm statistics in at least fp32).

Shapes (T = total valid tokens over the batch, B = batch, S = padded length, H = hidden,
N = heads, D = head dim):

- attention: q, k, v ``[T, N, D]`` packed by ``cu_seqlens`` (int32 ``[B + 1]``) -> ``[T, N, D]``;
  optional relative-position table ``[N, W]`` with ``positions`` ``[T]``
- linear: x ``[T, K]``, weight ``[F, K]``, bias ``[F]`` or None -> ``[T, F]``
- linear_gelu: x ``[T, K]``, weight ``[F, K]``, bias ``[F]`` -> ``[T, F]``
- add_layernorm: x, residual ``[T, H]`` -> ``[T, H]``
- embed_layernorm: ids ``[T]`` (word, position, token type) -> ``[T, H]``
- unpad: x ``[B, S, ...]``, indices ``[T]`` (flat positions of valid tokens) -> ``[T, ...]``
- pad: x ``[T, ...]`` -> ``[B, S, ...]`` with zeros at pad positions
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

GELU_APPROXIMATIONS = ("none", "tanh")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision inputs are computed in fp32 (as every fused kernel does); fp32/fp64 as is."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved statistics (log-sum-exp, LayerNorm mean and rstd): fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- dropout
# Philox4x32-10 as Triton's tl.randint4x / tl.rand4x draw it (triton/language/random.py),
# reproduced with int64 tensor arithmetic on 32-bit halves so it runs on any device: key (seed
# low, seed high 32 bits), counter (counter low, counter high, 0, 0); each of the four output
# words read as int32, folded to non-negative (x < 0 -> ~x) and times 4.6566127342e-10 in fp32.
# One call serves four elements: element counter c takes output word c & 3 of the call at
# Philox counter c >> 2, so the elements 4g, 4g + 1, 4g + 2, 4g + 3 share the call at g.
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_LOW32 = 0xFFFFFFFF


def _mul_wide(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values ``x``."""
    low_half, high_half = a * (x & 0xFFFF), a * (x >> 16)  # each below 2**48: exact in int64
    return (high_half + (low_half >> 16)) >> 16, (((high_half & 0xFFFF) << 16) + low_half) & _LOW32


def philox_uniform4(seed: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``tl.rand4x(seed, counters)`` stacked last: fp32 uniforms in [0, 1), ``[*counters.shape, 4]``,
    the four of each int64 Philox counter; ``seed`` is int64 ``[1]``."""
    seed = seed.to(torch.int64).reshape(())
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    c0, c1 = counters & _LOW32, (counters >> 32) & _LOW32
    c2 = c3 = torch.zeros_like(counters)
    for _ in range(10):
        high_b, low_b = _mul_wide(_PHILOX_ROUND[1], c2)
        high_a, low_a = _mul_wide(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _LOW32, (k1 + _PHILOX_KEY[1]) & _LOW32
    words = torch.stack((c0, c1, c2, c3), -1)
    folded = torch.where(words >= 2**31, _LOW32 - words, words)  # int32 view, negatives to ~x
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=counters.device)


def philox_uniform(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in [0, 1), one per int64 element counter c >= 0: word c & 3 of the Philox call
    at counter c >> 2 (``tl.rand4x(seed, c >> 2)[c & 3]``); ``seed`` is int64 ``[1]``."""
    uniforms = philox_uniform4(seed, offsets >> 2)
    return uniforms.gather(-1, (offsets & 3).unsqueeze(-1)).squeeze(-1)


def dropout_keep(seed: torch.Tensor, offsets: torch.Tensor, p: float) -> torch.Tensor:
    """Which elements dropout keeps: :func:`philox_uniform` of their counters > p, compared in fp32
    (as every kernel does)."""
    return philox_uniform(seed, offsets) > torch.tensor(p, dtype=torch.float32, device=offsets.device)


def row_dropout_counters(rows: int, H: int, device=None) -> torch.Tensor:
    """The dropout counters of a ``[rows, H]`` LayerNorm tensor: token · round_up(H, 4) + column, so
    each row's columns start a Philox call (four columns to a call)."""
    stride = -(-H // 4) * 4
    return torch.arange(rows, device=device)[:, None] * stride + torch.arange(H, device=device)


def _row_dropout(h: torch.Tensor, p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """Dropout on ``[T, H]`` at :func:`row_dropout_counters`; identity when p == 0."""
    if p == 0:
        return h
    T, H = h.shape
    return h * dropout_keep(seed, row_dropout_counters(T, H, h.device), p) / (1.0 - p)


def check_dropout(p: float, seed: torch.Tensor | None) -> None:
    """Raise naming the argument unless 0 <= p < 1 and, when p > 0, ``seed`` is an int64 ``[1]`` tensor."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p > 0 and (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"seed must be an int64 tensor of one element when dropout_p > 0, got {seed!r}")


def check_rel_bias(q: torch.Tensor, rel_bias: torch.Tensor | None, positions: torch.Tensor | None) -> None:
    """Raise a ValueError/TypeError naming the argument unless ``rel_bias`` (if given) is a float32
    (with float64 q: float64) ``[N, W]`` table with W odd, on q's device, and ``positions`` an int32 ``[T]`` vector there."""
    if rel_bias is None:
        return
    T, N = q.shape[0], q.shape[1]
    if not isinstance(rel_bias, torch.Tensor) or rel_bias.dtype not in (torch.float32, _stats_dtype(q.dtype)):
        raise TypeError(f"rel_bias must be a float32 tensor (float64 with float64 q), got "
                        f"{getattr(rel_bias, 'dtype', type(rel_bias))}")
    if rel_bias.dim() != 2 or rel_bias.shape[0] != N or rel_bias.shape[1] % 2 != 1:
        raise ValueError(f"rel_bias must be [heads, 2R + 1] = [{N}, odd], got {tuple(rel_bias.shape)}")
    if rel_bias.device != q.device:
        raise ValueError(f"rel_bias is on {rel_bias.device} but q is on {q.device}")
    if positions is None:
        raise ValueError("positions (int32 [T], each token's column in its padded sequence) is required with rel_bias")
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int32:
        raise TypeError(f"positions must be an int32 tensor, got {getattr(positions, 'dtype', type(positions))}")
    if positions.shape != (T,):
        raise ValueError(f"positions must be [T] = [{T}], got {tuple(positions.shape)}")
    if positions.device != q.device:
        raise ValueError(f"positions is on {positions.device} but q is on {q.device}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None,
    rel_bias: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + rel + bias, causal) v for each packed sequence.

    ``bias`` (optional) is additive, shaped ``[B, N, max_seqlen, max_seqlen]`` (broadcast dims
    allowed); it is only meaningful when every sequence has length ``max_seqlen`` (the padded
    path). A query row whose keys are all masked (-inf) gives zeros, never NaN. Rows past
    ``cu_seqlens[-1]`` (the dummy rows of a static packing) belong to no sequence; their output
    is unspecified (zeros here).

    ``rel_bias`` (optional) is a relative-position bias given as a per-head lookup table over
    the signed key-query distance, float32 ``[N, W]`` with W = 2R + 1 odd (T5-style bucketed
    biases, MPNet's among them, are such a table): for a query at column ``pq`` and a key at
    column ``pk`` of the same sequence, head ``h`` adds ``rel_bias[h, clamp(pk - pq, -R, R) + R]``
    to the scaled score (before ``bias``, the causal mask and the softmax). It needs
    ``positions``, int32 ``[T]``: each packed token's column in its original padded sequence
    (non-negative), so the distance is between original columns even where a mask left holes;
    the rows past ``cu_seqlens[-1]`` may hold any value. ``positions`` is unused without
    ``rel_bias``. The causal mask still compares ranks within the packed sequence.
    """
    return attention_train(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, 0.0, None)[0]


class _Padded(NamedTuple):
    """The packed attention problem laid out padded, ``[B, N, S, ...]``, in the compute dtype."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor  # softmax probabilities before dropout, 0 where masked and on rows that see no key
    lse: torch.Tensor  # [B, N, S]: +inf on rows that see no key
    dropped: torch.Tensor | float  # the dropout factor on each probability: keep / (1 - p), or 1.0
    distance: torch.Tensor | None  # [B, Sq, Sk] column of rel_bias each pair reads
    index: torch.Tensor  # flat [B * S] position of each packed row
    T: int

    def packed(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, N, S, D]`` back to ``[T, N, D]`` (dummy rows zero)."""
        rows = unpad(x.transpose(1, 2), self.index).to(dtype)
        return torch.cat([rows, rows.new_zeros(self.T - rows.shape[0], *rows.shape[1:])])


def _attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p,
               seed) -> _Padded:
    """The softmax of :func:`attention_train` computed on a padded layout."""
    check_rel_bias(q, rel_bias, positions)
    cdt = _compute_dtype(q.dtype)
    T, heads = q.shape[0], q.shape[1]
    batch = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    S = max(int(max_seqlen), 1)
    # Scatter the packed tokens into a padded [B, S, N, D] layout, then plain masked softmax.
    pos = torch.arange(S, device=q.device)
    valid = pos[None, :] < lengths[:, None]  # [B, S]
    index = valid.flatten().nonzero().flatten()
    real = index.numel()

    def padded(x: torch.Tensor) -> torch.Tensor:
        return pad(x.to(cdt), index, batch, S).transpose(1, 2)  # [B, N, S, D]

    qp, kp, vp = padded(q[:real]), padded(k[:real]), padded(v[:real])
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * scale  # [B, N, S, S]
    distance = None
    if rel_bias is not None:
        radius = (rel_bias.shape[1] - 1) // 2
        columns = pad(positions[:real].long(), index, batch, S)  # [B, S]
        distance = (columns[:, None, :] - columns[:, :, None]).clamp(-radius, radius) + radius  # [B, Sq, Sk]
        scores = scores + rel_bias.to(cdt)[:, distance].transpose(0, 1)  # [N, B, S, S] -> [B, N, S, S]
    if bias is not None:
        scores = scores + bias.to(cdt)
    allowed = valid[:, None, None, :]
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])[None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows with no visible key (every score -inf) give zeros and zero gradients, never NaN.
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    scores = scores.masked_fill(dead, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(dead[..., 0], float("inf"))  # [B, N, S]
    dropped = 1.0
    if dropout_p > 0:
        rows = (cu_seqlens[:-1].long()[:, None] + pos[None, :])[:, None, :, None]  # [B, 1, Sq, 1] packed row
        offsets = ((torch.arange(heads, device=q.device)[None, :, None, None] * T + rows) << 32) | pos
        dropped = dropout_keep(seed, offsets, dropout_p) / (1.0 - dropout_p)
    return _Padded(qp, kp, vp, probs, lse, dropped, distance, index, T)


def attention_train(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p, seed):
    """:func:`attention` with dropout on the probabilities, also returning the log-sum-exp.

    Returns ``(out [T, N, D], lse [N, T])``; unlike :func:`attention`'s, the dummy rows of ``out``
    must be zeros (the backward of the layers after it multiplies them by zero gradients, which
    turns garbage such as NaN into NaN gradients). ``lse`` is fp32 (fp64 for fp64 inputs): for each
    head and packed row, log Σ exp(score) over the visible keys, the scores being those the
    softmax sees (scaled, relative and additive biases added), in natural log; +inf for rows
    with no visible key and for dummy rows, so exp(score - lse) is 0 there.

    With ``dropout_p`` > 0 each probability (after normalisation) is kept when
    :func:`dropout_keep` says so for ``seed`` and the counter ((head · T + packed row) << 32) |
    key index within its sequence, and kept ones are scaled by 1 / (1 - dropout_p).
    """
    check_dropout(dropout_p, seed)
    t = _attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p, seed)
    out = t.packed(torch.matmul(t.probs * t.dropped, t.v), q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=_stats_dtype(q.dtype), device=q.device)
    lse[:, :t.index.numel()] = unpad(t.lse.transpose(1, 2), t.index).t().to(lse.dtype)
    return out, lse


def attention_backward(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions,
                       dropout_p, seed):
    """Gradients of :func:`attention_train`'s ``out``: ``(dqkv [T, 3, N, D], d_rel_bias)``.

    ``dqkv`` holds dq, dk, dv in one buffer, in q's dtype; rows that see no key and dummy rows
    get zeros. ``d_rel_bias`` is fp32 ``[N, W]`` (fp64 for fp64 inputs), or empty ``[0]``
    without ``rel_bias``. ``bias`` gets no gradient. (``out`` and ``lse`` are what a kernel
    would save; recomputing by autograd here does not need them.)
    """
    t = _attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p, seed)
    batch, S = t.q.shape[0], t.q.shape[2]
    g = pad(grad[:t.index.numel()].to(t.q.dtype), t.index, batch, S).transpose(1, 2)  # [B, N, S, D]
    dv = torch.matmul((t.probs * t.dropped).transpose(-1, -2), g)
    dprobs = torch.matmul(g, t.v.transpose(-1, -2)) * t.dropped  # through the dropout
    # softmax: dS = P (dP - rowsum(P dP)); rowsum(P dP) = dO . O, O being the dropped output.
    ds = t.probs * (dprobs - (t.probs * dprobs).sum(-1, keepdim=True))
    dq = torch.matmul(ds, t.k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), t.q) * scale
    dqkv = torch.stack([t.packed(d, q.dtype) for d in (dq, dk, dv)], dim=1)
    if rel_bias is None:
        return dqkv, q.new_zeros(0, dtype=torch.float32)
    # Each pair's dS lands in the table column its distance reads (the bias is added unscaled).
    heads = q.shape[1]
    flat = ds.transpose(0, 1).reshape(heads, -1)
    return dqkv, flat.new_zeros(rel_bias.shape).index_add_(1, t.distance.reshape(-1), flat)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Exact erf GELU (``"none"``) or the tanh form (``"tanh"``, HF ``gelu_new``)."""
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b (every GEMM of the encoder that is not fused with GELU)."""
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU(x Wᵀ + b)."""
    cdt = _compute_dtype(x.dtype)
    y = F.linear(x, weight, bias).to(cdt)
    return gelu(y, approximate).to(x.dtype)


def add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm(x + bias + residual) · weight + ln_bias, statistics in at least fp32."""
    cdt = _compute_dtype(x.dtype)
    h = x.to(cdt) + residual.to(cdt)
    if bias is not None:
        h = h + bias.to(cdt)
    return F.layer_norm(h, h.shape[-1:], weight.to(cdt), ln_bias.to(cdt), eps).to(x.dtype)


def embed_layernorm(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm(word[ids] + token_type[tt] + position[pos]) for packed tokens."""
    cdt = _compute_dtype(word_embeddings.dtype)
    h = word_embeddings[input_ids].to(cdt) + token_type_embeddings[token_type_ids].to(cdt)
    h = h + position_embeddings[position_ids].to(cdt)
    return F.layer_norm(h, h.shape[-1:], weight.to(cdt), ln_bias.to(cdt), eps).to(word_embeddings.dtype)


def unpad(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather the valid tokens of a padded ``[B, S, ...]`` tensor into ``[T, ...]``."""
    return x.flatten(0, 1)[indices]


def pad(x: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed ``[T, ...]`` tokens back to ``[B, S, ...]``; pad positions are zero."""
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    out[indices] = x
    return out.view(batch, seqlen, *x.shape[1:])


# ----------------------------------------------------------------------------- training
# Forward ops that also return what their backward needs, and the backward ops. Each backward
# here recomputes its forward under autograd (obviously right; the kernels use the saved
# statistics instead).


def gelu_grad(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """d GELU(x) / dx: Φ(x) + x φ(x), or the tanh form's derivative."""
    if approximate == "none":
        return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def _layernorm_backward(grad, h, weight, mean, rstd):
    """(dh, dweight, dln_bias) of LayerNorm(h) · weight + ln_bias, from the saved mean and rstd."""
    xhat = (h - mean[:, None].to(h.dtype)) * rstd[:, None].to(h.dtype)
    g = grad.to(h.dtype)
    dxhat = g * weight.to(h.dtype)
    dh = rstd[:, None].to(h.dtype) * (dxhat - dxhat.mean(-1, keepdim=True)
                                      - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dh, (g * xhat).sum(0).to(weight.dtype), g.sum(0).to(weight.dtype)


def _dropout_factor(shape, device, p: float, seed) -> torch.Tensor | float:
    """keep / (1 - p) per element of a ``[T, H]`` tensor (at :func:`row_dropout_counters`), or 1.0 at p = 0."""
    return 1.0 if p == 0 else _row_dropout(torch.ones(shape, device=device), p, seed)


def linear_gelu_train(x, weight, bias, approximate):
    """(GELU(x Wᵀ + b), the pre-activation x Wᵀ + b) — the pre-activation is what the backward needs."""
    pre = F.linear(x, weight, bias)
    return gelu(pre.to(_compute_dtype(x.dtype)), approximate).to(x.dtype), pre


def linear_gelu_backward(grad, x, weight, pre, approximate):
    """(dx, dweight, dbias) of :func:`linear_gelu_train`: GELU′ at ``pre``, then the GEMMs."""
    cdt = _compute_dtype(pre.dtype)
    dpre = (grad.to(cdt) * gelu_grad(pre.to(cdt), approximate)).to(x.dtype)
    return dpre @ weight, dpre.t() @ x, dpre.sum(0)


def _layernorm(h, weight, ln_bias, eps):
    """(LayerNorm(h) · weight + ln_bias, mean, rstd), all in h's dtype."""
    mean = h.mean(-1)
    rstd = torch.rsqrt(h.var(-1, unbiased=False) + eps)
    return (h - mean[:, None]) * rstd[:, None] * weight.to(h.dtype) + ln_bias.to(h.dtype), mean, rstd


def _add_layernorm(x, residual, bias, weight, ln_bias, eps, dropout_p, seed):
    cdt = _compute_dtype(x.dtype)
    h = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    out, mean, rstd = _layernorm(_row_dropout(h, dropout_p, seed) + residual.to(cdt), weight, ln_bias, eps)
    stats = _stats_dtype(x.dtype)
    return out.to(x.dtype), mean.to(stats), rstd.to(stats)


def add_layernorm_train(x, residual, bias, weight, ln_bias, eps, dropout_p, seed):
    """LayerNorm(dropout(x + bias) + residual) · weight + ln_bias, and the fp32 mean and rstd.

    ``x`` and ``residual`` are ``[T, H]`` or any ``[..., H]``, taken as rows (the tokens);
    mean and rstd are shaped ``x.shape[:-1]``. Dropout keeps element (token, column) as
    :func:`dropout_keep` says for ``seed`` and the counter token · round_up(H, 4) + column
    (:func:`row_dropout_counters`; kept ones scaled by 1 / (1 - dropout_p)).
    """
    check_dropout(dropout_p, seed)
    H = x.shape[-1]
    out, mean, rstd = _add_layernorm(x.reshape(-1, H), residual.reshape(-1, H), bias, weight, ln_bias, eps, dropout_p,
                                     seed)
    return out.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def add_layernorm_backward(grad, x, residual, bias, weight, ln_bias, mean, rstd, eps, dropout_p, seed):
    """(dx, dresidual, dbias, dweight, dln_bias) of :func:`add_layernorm_train`; dbias is empty ``[0]`` without bias."""
    H = x.shape[-1]
    grad, x2, residual2 = (t.reshape(-1, H) for t in (grad, x, residual))
    mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    cdt = _compute_dtype(x.dtype)
    factor = _dropout_factor(x2.shape, x.device, dropout_p, seed)
    h = (x2.to(cdt) if bias is None else x2.to(cdt) + bias.to(cdt)) * factor + residual2.to(cdt)
    dh, dweight, dln_bias = _layernorm_backward(grad, h, weight, mean, rstd)
    dx = dh * factor
    dbias = x.new_zeros(0) if bias is None else dx.sum(0).to(bias.dtype)
    return dx.to(x.dtype).reshape(x.shape), dh.to(residual.dtype).reshape(residual.shape), dbias, dweight, dln_bias


def _embeddings_sum(input_ids, position_ids, token_type_ids, word, position, token_type):
    cdt = _compute_dtype(word.dtype)
    return word[input_ids].to(cdt) + token_type[token_type_ids].to(cdt) + position[position_ids].to(cdt)


def embed_layernorm_train(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                          token_type_embeddings, weight, ln_bias, eps, dropout_p, seed, word_padding_idx,
                          position_padding_idx):
    """dropout(:func:`embed_layernorm`), and the fp32 mean and rstd ``[T]``; counters as
    :func:`row_dropout_counters` gives them for E columns.

    The padding indices (-1: none) only matter to the backward: they are the tables'
    ``nn.Embedding.padding_idx``, whose row gets no gradient.
    """
    check_dropout(dropout_p, seed)
    h = _embeddings_sum(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                        token_type_embeddings)
    out, mean, rstd = _layernorm(h, weight, ln_bias, eps)
    stats = _stats_dtype(word_embeddings.dtype)
    return _row_dropout(out, dropout_p, seed).to(word_embeddings.dtype), mean.to(stats), rstd.to(stats)


def table_grad(ids: torch.Tensor, grad: torch.Tensor, rows: int, padding_idx: int) -> torch.Tensor:
    """Σ of ``grad``'s rows per id, ``[rows, E]``, the ``padding_idx`` row (if >= 0) zero.

    Deterministic: on CPU ``index_add_`` adds the rows in order (``index_put_`` with
    ``accumulate`` does not: its bits vary between calls there); on CUDA ``index_put_`` with
    ``accumulate`` sorts the ids and reduces each run (``index_add_`` uses atomics there).
    """
    out = grad.new_zeros(rows, grad.shape[1])
    if grad.device.type == "cpu":
        out.index_add_(0, ids.long(), grad)
    else:
        out.index_put_((ids.long(),), grad, accumulate=True)
    if padding_idx >= 0:
        out[padding_idx] = 0
    return out


def embed_layernorm_backward(grad, input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                             token_type_embeddings, weight, ln_bias, mean, rstd, eps, dropout_p, seed,
                             word_padding_idx, position_padding_idx):
    """(dword, dposition, dtoken_type, dweight, dln_bias) of :func:`embed_layernorm_train`."""
    # word + token type + position rows: each table's gradient is dh summed over its ids.
    h = _embeddings_sum(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                        token_type_embeddings)
    factor = _dropout_factor(h.shape, h.device, dropout_p, seed)
    dh, dw, db = _layernorm_backward(grad.to(h.dtype) * factor, h, weight, mean, rstd)
    dtype = word_embeddings.dtype
    return (table_grad(input_ids, dh, word_embeddings.shape[0], word_padding_idx).to(dtype),
            table_grad(position_ids, dh, position_embeddings.shape[0], position_padding_idx).to(dtype),
            table_grad(token_type_ids, dh, token_type_embeddings.shape[0], -1).to(dtype), dw, db)
