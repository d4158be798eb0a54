"""LayerNorm kernels, each one pass over memory: LN(x + bias + residual) · γ + β after the
attention-out and FFN-down projections, and LN(word + position + token-type embeddings) for
the packed input tokens.

Each program normalises ``ROWS`` whole rows held in registers: it reads its inputs (x, the
residual and the optional bias; or the three gathered embedding rows) once, computes mean and
variance in fp32 over the row (the variance from the centred values, not E[x²] - E[x]², which
cancels badly), and writes the result once in the output dtype. Any hidden size up to
``MAX_HIDDEN`` works; the row is padded to the next power of two with masked loads. Small rows
are batched several to a program so that each program still moves a useful amount of memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastbert.kernels.launch import on_device_of

MAX_HIDDEN = 8192


@triton.jit
def _layernorm_rows(h, mask, cols, col_ok, w_ptr, b_ptr, H, eps):
    """LayerNorm of the fp32 rows ``h`` [ROWS, BLOCK_H] (masked entries are ignored) · γ + β."""
    mean = tl.sum(h, 1) / H
    centred = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / H + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return centred * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _add_layernorm(
    x_ptr, res_ptr, bias_ptr, w_ptr, b_ptr, y_ptr,
    n_rows, H, stride_x, stride_res, stride_y, eps,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)[:, None]
    h = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h += tl.load(res_ptr + rows * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = _layernorm_rows(h, mask, cols, col_ok, w_ptr, b_ptr, H, eps)
    tl.store(y_ptr + rows * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embed_layernorm(
    word_ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr, b_ptr, y_ptr,
    n_rows, H, stride_word, stride_pos, stride_type, stride_y, eps,
    BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    row_ok = rows < n_rows
    mask = row_ok[:, None] & col_ok[None, :]
    # Table offsets in int64: a vocabulary x hidden table can pass 2**31 elements.
    word = tl.load(word_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
    pos = tl.load(pos_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
    kind = tl.load(type_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
    h = tl.load(word_ptr + word * stride_word + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h += tl.load(type_ptr + kind * stride_type + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h += tl.load(pos_ptr + pos * stride_pos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _layernorm_rows(h, mask, cols, col_ok, w_ptr, b_ptr, H, eps)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


class Config(NamedTuple):
    block_h: int
    rows: int
    num_warps: int


def config(hidden: int) -> Config:
    """Rows per program and warps for a hidden size: at least 2048 elements per program, 8 per thread."""
    block_h = triton.next_power_of_2(hidden)
    rows = max(1, 2048 // block_h)
    return Config(block_h, rows, min(32, max(1, block_h * rows // 256)))


def shipped_configs() -> list[Config]:
    """Every configuration the launcher can pick: one per power-of-two row width."""
    return [config(2**p) for p in range(0, MAX_HIDDEN.bit_length())]


def add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(x + bias + residual) · weight + ln_bias; see :func:`fastbert.reference.add_layernorm`.

    ``out`` (optional, shaped like ``x`` with contiguous rows) receives the result.
    """
    H = x.shape[-1]
    if H > MAX_HIDDEN:
        raise ValueError(f"hidden size {H} is above the largest the Triton add_layernorm supports, {MAX_HIDDEN}")
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have the shape of x {tuple(x.shape)}")
    x2, res2 = (t.reshape(-1, H) for t in (x, residual))
    x2, res2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, res2))
    # The [H] vectors are read as contiguous (a no-op for parameters, which are).
    bias, weight, ln_bias = (t.contiguous() if t is not None else None for t in (bias, weight, ln_bias))
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = out.view(-1, H)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out
    cfg = config(H)
    with on_device_of(x2):
        _add_layernorm[(triton.cdiv(n_rows, cfg.rows),)](
            x2, res2, bias if bias is not None else x2, weight, ln_bias, y2,
            n_rows, H, x2.stride(0), res2.stride(0), y2.stride(0), eps,
            HAS_BIAS=bias is not None, BLOCK_H=cfg.block_h, ROWS=cfg.rows, num_warps=cfg.num_warps,
        )
    return out


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(word[ids] + token_type[tt] + position[pos]); see :func:`fastbert.reference.embed_layernorm`.

    The three id tensors are ``[T]`` (int32 or int64) and are trusted to be in range (the
    encoder checks them). ``out`` (optional, ``[T, H]`` with contiguous rows) receives the result.
    """
    T = input_ids.shape[0]
    H = word_embeddings.shape[1]
    if H > MAX_HIDDEN:
        raise ValueError(f"hidden size {H} is above the largest the Triton embed_layernorm supports, {MAX_HIDDEN}")
    if position_ids.shape != (T,) or token_type_ids.shape != (T,):
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, position_ids {tuple(position_ids.shape)} and "
                         f"token_type_ids {tuple(token_type_ids.shape)} must all be [T]")
    ids = [t.contiguous() for t in (input_ids, position_ids, token_type_ids)]
    tables = [t if t.stride(-1) == 1 else t.contiguous() for t in (word_embeddings, position_embeddings, token_type_embeddings)]
    weight, ln_bias = weight.contiguous(), ln_bias.contiguous()
    if out is None:
        out = torch.empty(T, H, dtype=word_embeddings.dtype, device=word_embeddings.device)
    if T == 0:
        return out
    cfg = config(H)
    with on_device_of(out):
        _embed_layernorm[(triton.cdiv(T, cfg.rows),)](
            *ids, *tables, weight, ln_bias, out,
            T, H, *(t.stride(0) for t in tables), out.stride(0), eps,
            BLOCK_H=cfg.block_h, ROWS=cfg.rows, num_warps=cfg.num_warps,
        )
    return out
