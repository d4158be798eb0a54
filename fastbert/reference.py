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

import torch
import torch.nn.functional as F

GELU_APPROXIMATIONS = ("none", "tanh")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision inputs are computed in fp32 (as every fused kernel does); fp32/fp64 as is."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_rel_bias(q: torch.Tensor, rel_bias: torch.Tensor | None, positions: torch.Tensor | None) -> None:
    """Raise a ValueError/TypeError naming the argument unless ``rel_bias`` (if given) is a float32
    ``[N, W]`` table with W odd, on q's device, and ``positions`` an int32 ``[T]`` vector there."""
    if rel_bias is None:
        return
    T, N = q.shape[0], q.shape[1]
    if not isinstance(rel_bias, torch.Tensor) or rel_bias.dtype != torch.float32:
        raise TypeError(f"rel_bias must be a float32 tensor, got {getattr(rel_bias, 'dtype', type(rel_bias))}")
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
    check_rel_bias(q, rel_bias, positions)
    out_dtype = q.dtype
    cdt = _compute_dtype(q.dtype)
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
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with every key masked
    out = torch.matmul(probs, vp).transpose(1, 2)  # [B, S, N, D]
    packed = unpad(out, index).to(out_dtype)
    return torch.cat([packed, packed.new_zeros(q.shape[0] - real, *packed.shape[1:])])


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
