"""LayerNorm kernels, each one pass over memory: LN(x + bias + residual) · γ + β after the
attention-out and FFN-down projections, and LN(word + position + token-type embeddings) for
the packed input tokens.

Each program normalises ``ROWS`` whole rows held in registers: it reads its inputs (x, the
residual and the optional bias; or the three gathered embedding rows) once, computes mean and
variance in fp32 over the row (the variance from the centred values, not E[x²] - E[x]², which
cancels badly), and writes the result once in the output dtype. Any hidden size up to
``MAX_HIDDEN`` works; the row is padded to the next power of two with masked loads. Small rows
are batched several to a program so that each program still moves a useful amount of memory.

Training: the same kernels store the fp32 mean and rstd (``STATS``) and apply dropout
(``DROPOUT``: on x + bias before the residual for add+LN, on the output for embeddings+LN;
counter token · round_up(H, 4) + column, four columns to a ``tl.rand4x`` call). The backward
kernels recompute the row from the inputs and the saved statistics, write the row gradients,
and sum the parameter gradients per program into a [programs, H] fp32 buffer reduced afterwards
in a fixed order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastbert import _compat, reference
from fastbert.kernels.dropout import dropout_keep
from fastbert.kernels.launch import on_device_of

MAX_HIDDEN = 8192


@triton.jit
def _row_dropout_keep(seed, rows, H, BLOCK_H: tl.constexpr, dropout_p):
    """The keep mask [ROWS, BLOCK_H] of rows ``rows`` (int64 [ROWS, 1]): counters token · round_up(H, 4)
    + column (:func:`fastbert.reference.row_dropout_counters`), so each row starts a Philox call."""
    return dropout_keep(seed, tl.reshape(rows, [rows.shape[0]]) * ((H + 3) // 4 * 4), 0, BLOCK_H, dropout_p)


@triton.jit
def _layernorm_rows(h, mask, cols, col_ok, w_ptr, b_ptr, H, eps):
    """LayerNorm of the fp32 rows ``h`` [ROWS, BLOCK_H] (masked entries are ignored) · γ + β,
    with each row's mean and rstd."""
    mean = tl.sum(h, 1) / H
    centred = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / H + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return centred * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@triton.jit
def _add_layernorm(
    x_ptr,  # [T, H] input, unit stride over H
    res_ptr,  # [T, H] residual
    bias_ptr,  # [H] bias added to x (HAS_BIAS)
    w_ptr,  # [H] LayerNorm weight
    b_ptr,  # [H] LayerNorm bias
    y_ptr,  # [T, H] output
    n_rows,  # T
    H,  # hidden size
    stride_x, stride_res, stride_y,  # between rows
    eps,
    mean_ptr,  # [T] fp32 row means (STATS)
    rstd_ptr,  # [T] fp32 row reciprocal standard deviations (STATS)
    seed_ptr,  # [1] int64 dropout seed (DROPOUT)
    dropout_p,  # probability of dropping an element of x + bias (DROPOUT)
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
    STATS: tl.constexpr, DROPOUT: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    row_ok = rows < n_rows
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)[:, None]
    h = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        # dropout(x + bias) + residual
        if HAS_BIAS:
            h += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        keep = _row_dropout_keep(tl.load(seed_ptr), rows, H, BLOCK_H, dropout_p)
        h = tl.where(keep, h * (1.0 / (1.0 - dropout_p)), 0.0)
        h += tl.load(res_ptr + rows * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        h += tl.load(res_ptr + rows * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y, mean, rstd = _layernorm_rows(h, mask, cols, col_ok, w_ptr, b_ptr, H, eps)
    tl.store(y_ptr + rows * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STATS:
        row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        tl.store(mean_ptr + row_ids, mean, mask=row_ok)
        tl.store(rstd_ptr + row_ids, rstd, mask=row_ok)


@triton.jit
def _embed_layernorm(
    word_ids_ptr, pos_ids_ptr, type_ids_ptr,  # [T] int32/int64 ids into the three tables
    word_ptr, pos_ptr, type_ptr,  # [rows, H] embedding tables, unit stride over H
    w_ptr,  # [H] LayerNorm weight
    b_ptr,  # [H] LayerNorm bias
    y_ptr,  # [T, H] output
    n_rows,  # T
    H,  # hidden size
    stride_word, stride_pos, stride_type, stride_y,  # between rows
    eps,
    mean_ptr,  # [T] fp32 row means (STATS)
    rstd_ptr,  # [T] fp32 row reciprocal standard deviations (STATS)
    seed_ptr,  # [1] int64 dropout seed (DROPOUT)
    dropout_p,  # probability of dropping an output element (DROPOUT)
    BLOCK_H: tl.constexpr, ROWS: tl.constexpr, STATS: tl.constexpr, DROPOUT: tl.constexpr,
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
    y, mean, rstd = _layernorm_rows(h, mask, cols, col_ok, w_ptr, b_ptr, H, eps)
    rows = rows.to(tl.int64)[:, None]
    if DROPOUT:
        keep = _row_dropout_keep(tl.load(seed_ptr), rows, H, BLOCK_H, dropout_p)
        y = tl.where(keep, y * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(y_ptr + rows * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STATS:
        row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        tl.store(mean_ptr + row_ids, mean, mask=row_ok)
        tl.store(rstd_ptr + row_ids, rstd, mask=row_ok)


# ----------------------------------------------------------------------------- backward
# Each program walks a contiguous range of rows ROWS at a time, writes the row gradients and
# keeps column sums (dγ, dβ and the bias's) in registers, stored once to its own row of a
# [programs, H] fp32 buffer that the host reduces in a fixed order: no atomics, deterministic.


@triton.jit
def _layernorm_bwd_rows(h, dy, mask, mean, rstd, w, H):
    """(dh, x̂) of LayerNorm rows from the fp32 input rows ``h``, the output gradient ``dy``
    (masked entries 0), the saved ``mean``/``rstd`` and the weight ``w``."""
    xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy * w[None, :]
    c1 = tl.sum(xhat * wdy, 1) / H
    c2 = tl.sum(wdy, 1) / H
    dh = tl.where(mask, (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)
    return dh, xhat


@triton.jit
def _add_layernorm_bwd(
    grad_ptr,  # [T, H] gradient of the output, unit stride over H
    x_ptr,  # [T, H] input
    res_ptr,  # [T, H] residual
    bias_ptr,  # [H] bias added to x (HAS_BIAS)
    w_ptr,  # [H] LayerNorm weight
    mean_ptr,  # [T] fp32 saved row means
    rstd_ptr,  # [T] fp32 saved row reciprocal standard deviations
    seed_ptr,  # [1] int64 dropout seed (DROPOUT)
    dx_ptr,  # [T, H] gradient of x
    dres_ptr,  # [T, H] gradient of the residual
    partial_ptr,  # [3, programs, H] fp32 column sums of dγ, dβ, dbias per program
    n_rows,  # T
    H,  # hidden size
    rows_per_program,  # a multiple of ROWS
    stride_g, stride_x, stride_res, stride_dx, stride_dres,  # between rows
    dropout_p,  # probability of dropping an element of x + bias (DROPOUT)
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    inv_keep = 1.0 / (1.0 - dropout_p)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    dlb = tl.zeros([BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(first, tl.minimum(first + rows_per_program, n_rows), ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        h = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += bias[None, :]
        if DROPOUT:
            keep = _row_dropout_keep(seed, r64, H, BLOCK_H, dropout_p)
            h = tl.where(keep, h * inv_keep, 0.0)
        h += tl.load(res_ptr + r64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        dh, xhat = _layernorm_bwd_rows(h, dy, mask, mean, rstd, w, H)
        dw += tl.sum(dy * xhat, 0)
        dlb += tl.sum(dy, 0)
        tl.store(dres_ptr + r64 * stride_dres + cols[None, :], dh.to(dres_ptr.dtype.element_ty), mask=mask)
        if DROPOUT:
            dh = tl.where(keep, dh * inv_keep, 0.0)
        tl.store(dx_ptr + r64 * stride_dx + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)
        db += tl.sum(dh, 0)
    programs = tl.num_programs(0)
    tl.store(partial_ptr + pid * H + cols, dw, mask=col_ok)
    tl.store(partial_ptr + (programs + pid) * H + cols, dlb, mask=col_ok)
    if HAS_BIAS:
        tl.store(partial_ptr + (2 * programs + pid) * H + cols, db, mask=col_ok)


@triton.jit
def _embed_layernorm_bwd(
    grad_ptr,  # [T, H] gradient of the output, unit stride over H
    word_ids_ptr, pos_ids_ptr, type_ids_ptr,  # [T] int32/int64 ids into the three tables
    word_ptr, pos_ptr, type_ptr,  # [rows, H] embedding tables, unit stride over H
    w_ptr,  # [H] LayerNorm weight
    mean_ptr,  # [T] fp32 saved row means
    rstd_ptr,  # [T] fp32 saved row reciprocal standard deviations
    seed_ptr,  # [1] int64 dropout seed (DROPOUT)
    dh_ptr,  # [T, H] fp32 gradient of the embeddings' sum (summed into the tables by the host)
    partial_ptr,  # [2, programs, H] fp32 column sums of dγ, dβ per program
    n_rows,  # T
    H,  # hidden size
    rows_per_program,  # a multiple of ROWS
    stride_g, stride_word, stride_pos, stride_type, stride_dh,  # between rows
    dropout_p,  # probability of dropping an output element (DROPOUT)
    DROPOUT: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    dlb = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(first, tl.minimum(first + rows_per_program, n_rows), ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        word = tl.load(word_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
        pos = tl.load(pos_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
        kind = tl.load(type_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
        h = tl.load(word_ptr + word * stride_word + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h += tl.load(type_ptr + kind * stride_type + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h += tl.load(pos_ptr + pos * stride_pos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(grad_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = _row_dropout_keep(seed, r64, H, BLOCK_H, dropout_p)
            dy = tl.where(keep, dy * (1.0 / (1.0 - dropout_p)), 0.0)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        dh, xhat = _layernorm_bwd_rows(h, dy, mask, mean, rstd, w, H)
        dw += tl.sum(dy * xhat, 0)
        dlb += tl.sum(dy, 0)
        tl.store(dh_ptr + r64 * stride_dh + cols[None, :], dh, mask=mask)
    tl.store(partial_ptr + pid * H + cols, dw, mask=col_ok)
    tl.store(partial_ptr + (tl.num_programs(0) + pid) * H + cols, dlb, mask=col_ok)


class Config(NamedTuple):
    block_h: int
    rows: int
    num_warps: int


def config(hidden: int) -> Config:
    """Rows per program and warps for a hidden size: at least 2048 elements per program, 8 per thread."""
    block_h = triton.next_power_of_2(hidden)
    rows = max(1, 2048 // block_h)
    # At most 8 warps: 16 at hidden 4096 spilled on sm_90 with Triton 3.8.
    return Config(block_h, rows, min(8, max(1, block_h * rows // 256)))


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
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(x + bias + residual) · weight + ln_bias; see :func:`fastbert.reference.add_layernorm`.

    ``out`` (optional, shaped like ``x`` with contiguous rows) receives the result. (``mean``,
    ``rstd``, ``dropout_p`` and ``seed`` serve :func:`add_layernorm_train`.)
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
            x2 if mean is None else mean, x2 if rstd is None else rstd, seed if dropout_p > 0 else x2, float(dropout_p),
            HAS_BIAS=bias is not None, BLOCK_H=cfg.block_h, ROWS=cfg.rows,
            STATS=mean is not None, DROPOUT=dropout_p > 0, num_warps=cfg.num_warps,
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
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(word[ids] + token_type[tt] + position[pos]); see :func:`fastbert.reference.embed_layernorm`.

    The three id tensors are ``[T]`` (int32 or int64) and are trusted to be in range (the
    encoder checks them). ``out`` (optional, ``[T, H]`` with contiguous rows) receives the result.
    (``mean``, ``rstd``, ``dropout_p`` and ``seed`` serve :func:`embed_layernorm_train`.)
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
            out if mean is None else mean, out if rstd is None else rstd, seed if dropout_p > 0 else out,
            float(dropout_p), BLOCK_H=cfg.block_h, ROWS=cfg.rows, STATS=mean is not None, DROPOUT=dropout_p > 0,
            num_warps=cfg.num_warps,
        )
    return out


# ----------------------------------------------------------------------------- training

# The most programs a backward launch uses: each adds one row of H partial sums to reduce.
MAX_PARTIALS = 512
# The backward keeps four rows' worth of values live (input, gradient, x̂, dh): at 8192 columns
# that spilled at 16 and 32 warps, so it serves up to 4096 (every BERT-family hidden size).
MAX_BACKWARD_HIDDEN = 4096


def backward_config(hidden: int, interpreting: bool = False) -> Config:
    """Rows per step and warps of the backward kernels: half the forward's rows (they keep
    more rows live: input, gradient, x̂, dh). Under the interpreter 2 rows a step, so that
    tiny tests span several steps and programs."""
    block_h = triton.next_power_of_2(hidden)
    if interpreting:
        return Config(block_h, 2, 1)
    rows = max(1, 1024 // block_h)
    # At most 8 warps: 16 at hidden 4096 spilled on sm_90 with Triton 3.8.
    return Config(block_h, rows, min(8, max(1, block_h * rows // 256)))


def shipped_backward_configs() -> list[Config]:
    return [backward_config(2**p) for p in range(0, MAX_BACKWARD_HIDDEN.bit_length())]


def _split_rows(n_rows: int, rows: int, interpreting: bool) -> tuple[int, int]:
    """(programs, rows per program): at most MAX_PARTIALS programs (4 in the interpreter),
    each a whole number of ``rows`` steps. Fixed by the shape alone, so results are too."""
    cap = 4 if interpreting else MAX_PARTIALS
    programs = min(triton.cdiv(n_rows, rows), cap)
    per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
    return triton.cdiv(n_rows, per_program), per_program


def _stats(rows: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 mean and rstd of each row, shaped ``rows`` (the input's shape without its last dim)."""
    return tuple(torch.empty(rows, dtype=torch.float32, device=device) for _ in range(2))


def add_layernorm_train(x, residual, bias, weight, ln_bias, eps, dropout_p, seed, out=None):
    """(LayerNorm(dropout(x + bias) + residual) · weight + ln_bias, mean, rstd fp32 shaped ``x.shape[:-1]``);
    see :func:`fastbert.reference.add_layernorm_train` (dropout counters
    :func:`fastbert.reference.row_dropout_counters`)."""
    reference.check_dropout(dropout_p, seed)
    mean, rstd = _stats(x.shape[:-1], x.device)
    out = add_layernorm(x, residual, bias, weight, ln_bias, eps, out=out, mean=mean, rstd=rstd,
                        dropout_p=dropout_p, seed=seed)
    return out, mean, rstd


def add_layernorm_backward(grad, x, residual, bias, weight, ln_bias, mean, rstd, eps, dropout_p, seed):
    """(dx, dresidual, dbias or empty [0], dweight, dln_bias); see
    :func:`fastbert.reference.add_layernorm_backward`. One row kernel recomputes the input
    (dropout mask included) from x, bias, residual and the saved statistics; the parameter
    gradients are per-program fp32 column sums reduced afterwards in a fixed order."""
    reference.check_dropout(dropout_p, seed)
    H = x.shape[-1]
    if H > MAX_BACKWARD_HIDDEN:
        raise ValueError(f"hidden size {H} is above the largest the Triton add_layernorm_backward supports, "
                         f"{MAX_BACKWARD_HIDDEN}")
    x2, res2, g2 = (t.reshape(-1, H) for t in (x, residual, grad))
    x2, res2, g2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, res2, g2))
    bias, weight = (t.contiguous() if t is not None else None for t in (bias, weight))
    n_rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dres = torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
    interpreting = _compat.interpreting()
    cfg = backward_config(H, interpreting)
    programs, per_program = _split_rows(max(n_rows, 1), cfg.rows, interpreting)
    partial = torch.zeros(3, programs, H, dtype=torch.float32, device=x.device)
    if n_rows:
        with on_device_of(x2):
            _add_layernorm_bwd[(programs,)](
                g2, x2, res2, bias if bias is not None else x2, weight, mean.contiguous(), rstd.contiguous(),
                seed if dropout_p > 0 else x2, dx.view(-1, H), dres.view(-1, H), partial,
                n_rows, H, per_program, g2.stride(0), x2.stride(0), res2.stride(0), H, H, float(dropout_p),
                HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, BLOCK_H=cfg.block_h, ROWS=cfg.rows,
                num_warps=cfg.num_warps,
            )
    # A fixed-order reduction over the programs, one tensor per gradient (an op's outputs may not alias).
    sums = [row.clone() for row in partial.sum(1)]
    dbias = sums[2].to(bias.dtype) if bias is not None else x.new_zeros(0)
    return dx, dres, dbias, sums[0].to(weight.dtype), sums[1].to(ln_bias.dtype)


def embed_layernorm_train(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                          token_type_embeddings, weight, ln_bias, eps, dropout_p, seed, word_padding_idx,
                          position_padding_idx, out=None):
    """(dropout(LayerNorm(embeddings)), mean [T], rstd [T] fp32); see
    :func:`fastbert.reference.embed_layernorm_train` (dropout counters
    :func:`fastbert.reference.row_dropout_counters`; the padding indices only matter to the backward)."""
    reference.check_dropout(dropout_p, seed)
    mean, rstd = _stats(input_ids.shape, word_embeddings.device)
    out = embed_layernorm(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                          token_type_embeddings, weight, ln_bias, eps, out=out, mean=mean, rstd=rstd,
                          dropout_p=dropout_p, seed=seed)
    return out, mean, rstd


def embed_layernorm_backward(grad, input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                             token_type_embeddings, weight, ln_bias, mean, rstd, eps, dropout_p, seed,
                             word_padding_idx, position_padding_idx):
    """(dword, dposition, dtoken_type, dweight, dln_bias); see
    :func:`fastbert.reference.embed_layernorm_backward`. A row kernel gives dh (the gradient of
    the embeddings' sum, fp32) and per-program column sums for the LayerNorm parameters; each
    table's gradient is dh summed per id by :func:`fastbert.reference.table_grad`
    (deterministic)."""
    reference.check_dropout(dropout_p, seed)
    T, H = input_ids.shape[0], word_embeddings.shape[1]
    if H > MAX_BACKWARD_HIDDEN:
        raise ValueError(f"hidden size {H} is above the largest the Triton embed_layernorm_backward supports, "
                         f"{MAX_BACKWARD_HIDDEN}")
    ids = [t.contiguous() for t in (input_ids, position_ids, token_type_ids)]
    tables = [t if t.stride(-1) == 1 else t.contiguous() for t in (word_embeddings, position_embeddings, token_type_embeddings)]
    g2 = grad if grad.stride(-1) == 1 else grad.contiguous()
    dh = torch.empty(T, H, dtype=torch.float32, device=grad.device)
    interpreting = _compat.interpreting()
    cfg = backward_config(H, interpreting)
    programs, per_program = _split_rows(max(T, 1), cfg.rows, interpreting)
    partial = torch.zeros(2, programs, H, dtype=torch.float32, device=grad.device)
    if T:
        with on_device_of(dh):
            _embed_layernorm_bwd[(programs,)](
                g2, *ids, *tables, weight.contiguous(), mean.contiguous(), rstd.contiguous(),
                seed if dropout_p > 0 else dh, dh, partial, T, H, per_program,
                g2.stride(0), *(t.stride(0) for t in tables), dh.stride(0), float(dropout_p),
                DROPOUT=dropout_p > 0, BLOCK_H=cfg.block_h, ROWS=cfg.rows, num_warps=cfg.num_warps,
            )
    sums = [row.clone() for row in partial.sum(1)]  # separate tensors: an op's outputs may not alias
    dtype = word_embeddings.dtype
    return (reference.table_grad(input_ids, dh, word_embeddings.shape[0], word_padding_idx).to(dtype),
            reference.table_grad(position_ids, dh, position_embeddings.shape[0], position_padding_idx).to(dtype),
            reference.table_grad(token_type_ids, dh, token_type_embeddings.shape[0], -1).to(dtype),
            sums[0].to(weight.dtype), sums[1].to(ln_bias.dtype))
