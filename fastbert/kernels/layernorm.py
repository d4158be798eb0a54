"""LayerNorm(x + bias + residual) · γ + β in one pass over memory.

Each program normalises ``ROWS`` whole rows held in registers: it reads x, the residual and
the (optional) bias once, computes mean and variance in fp32 over the row (the variance from
the centred values, not E[x²] - E[x]², which cancels badly), and writes the result once in
the input dtype. Any hidden size up to ``MAX_HIDDEN`` works; the row is padded to the next
power of two with masked loads. Small rows are batched several to a program so that each
program still moves a useful amount of memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 8192


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
    mean = tl.sum(h, 1) / H
    centred = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / H + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


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
    _add_layernorm[(triton.cdiv(n_rows, cfg.rows),)](
        x2, res2, bias if bias is not None else x2, weight, ln_bias, y2,
        n_rows, H, x2.stride(0), res2.stride(0), y2.stride(0), eps,
        HAS_BIAS=bias is not None, BLOCK_H=cfg.block_h, ROWS=cfg.rows, num_warps=cfg.num_warps,
    )
    return out
