"""Attention over packed variable-length sequences: a FlashAttention-style forward.

One program computes ``BLOCK_M`` query rows of one head of one sequence and streams that
sequence's keys and values through in ``BLOCK_N`` blocks, keeping the running row maximum and
normaliser of an online softmax, so the ``S x S`` score matrix never exists in memory.

* Sequences are found through ``cu_seqlens``; the grid is (query block, head, sequence), and
  programs whose block starts past their sequence's end exit at once.
* q, k and v are ``[T, N, D]`` views with any token and head strides (the encoder passes the
  three slices of its ``[T, 3, N, D]`` QKV projection); the head dim must be contiguous.
* The softmax runs in base 2: ``scale * log2(e)`` is folded into one multiply of the scores and
  ``exp2`` replaces ``exp``. Scores, softmax and accumulation are fp32 whatever the input dtype.
* Head dims that are not powers of two (80, 96) are padded to the next one with masked loads.
* Causal programs stop at the diagonal: key blocks wholly above it are never loaded. Only the
  blocks that need it (the sequence's last, causal diagonal ones) pay for key masking.
* An additive bias ``[B, N, S, S]`` (any strides, 0 for broadcast dims) serves arbitrary masks
  on the padded path. ``-inf`` masks a key; a row with every key masked gives zeros, never NaN.
  Finite biases are clamped to ``-FLT_MAX / log2(e)`` before the base-2 rescale, so a mask
  built from ``finfo(float32).min`` (as Hugging Face builds them) stays finite and gives the
  same result as the natural-base softmax of the reference instead of a masked row.
* A relative-position bias (``REL_BIAS``) adds ``rel_bias[h, clamp(pk - pq, -R, R) + R]``, a
  per-head table ``[N, 2R + 1]`` gathered by the key and query columns ``positions`` (int32
  ``[T]``). The columns of the query block are loaded once, those of each key block with it;
  the clamped index always lies in the table, so the gather needs no mask.
* Each sequence's base offset is computed in int64, so packed tensors beyond 2**31 elements
  index correctly; offsets within one sequence (length x token stride) must fit in int32.

Training (:func:`attention_train`, :func:`attention_backward`): the same forward kernel with
two constexpr flags stores the natural-log log-sum-exp (``STORE_LSE``) and drops normalised
probabilities (``DROPOUT``) at the counter ``((head * T + packed row) << 32) | key``, four keys
to a ``tl.rand4x`` call (:func:`fastbert.kernels.dropout.dropout_keep`), the seed read from a
one-element int64 tensor in the kernel; with both off it is the inference kernel. The backward is FlashAttention-2's: D = rowsum(dO * O) (which also zeroes the dummy
rows' gradients), a dK/dV kernel per key block walking its sequence's query blocks, a dQ kernel
per query block walking the key blocks, both recomputing P = exp(s - lse) and the dropout mask,
with the forward's causal split and biases. Where fp32 lost log l from a row's lse = m + log l
(its largest score huge: every key masked by a finite minimum, as Hugging Face masks are), a
kernel before them recomputes m and l for that row's block, shifts by m and divides the row's
dO and D by l instead (:func:`_attention_bwd_lse`), so such rows get exact gradients. No atomics: the relative-bias gradient is summed per
distance bucket inside each dQ program (one bucket at a time over the range a tile touches, so
it costs about a tile pass per bucket there: correct and deterministic, not fast) and over the
programs in a fixed order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastbert import _compat, reference, tuning
from fastbert.kernels.dropout import dropout_keep
from fastbert.kernels.launch import gpu_arch, on_device_of, tile

LOG2E = math.log2(math.e)
# Any head dim up to the last works; these are the ones the tests compile and run.
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
# CUDA caps the second and third grid dimensions (heads, sequences) at 65535 programs.
MAX_GRID_YZ = 65535

_LOG2E = tl.constexpr(LOG2E)
# The most negative finite bias whose base-2 rescale (x log2(e)) still fits in fp32.
_MIN_BIAS = tl.constexpr(-torch.finfo(torch.float32).max / LOG2E)
# From this base-2 magnitude up, fp32 keeps log2 l of lse = m + log2 l to worse than 2^-16
# (1.1e-5 relative in each probability): the backward recomputes those rows' m and l.
_INEXACT_LSE2 = tl.constexpr(256.0)


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, k_base, v_base, bias_base, rel_base, pos_base, q_pos, start_n, rows, row_ok, seq_len,
    stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale, seed, drop_rows, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Fold one block of keys into the running softmax state (acc, l_i, m_i) of a query block.

    With MASKED false every key of the block exists and is visible to every row, so no key
    masking is done (the common case: all blocks but the last and, causal, the diagonal ones).
    With DROPOUT the normaliser l_i takes every probability but the accumulator only the kept
    ones (``drop_rows`` holds each row's dropout counter, shifted left by 32 bits); the caller
    scales by 1 / (1 - p) at the end.
    """
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < seq_len
    # K is read transposed, [BLOCK_D, BLOCK_N], so the score block is a plain q @ kT.
    k_ptrs = k_base + keys[None, :] * stride_kt + dims[:, None]
    v_ptrs = v_base + keys[:, None] * stride_vt + dims[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=(dims < HEAD_DIM)[:, None] & key_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptrs, mask=(dims < HEAD_DIM)[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(dims < HEAD_DIM)[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, k, input_precision="ieee") * qk_scale
    if DROPOUT:
        # Drawn here rather than where it is applied: with the Philox state live next to the
        # probabilities, the 128 x 64 tiles spilled 52-76 B on sm_90 (head dims 80-128, Triton 3.9).
        keep_p = dropout_keep(seed, drop_rows, start_n, BLOCK_N, dropout_p)
    if REL_BIAS:
        if MASKED:
            k_pos = tl.load(pos_base + keys, mask=key_ok, other=0)
        else:
            k_pos = tl.load(pos_base + keys)
        # Columns are non-negative int32, so their difference cannot overflow.
        distance = tl.minimum(tl.maximum(k_pos[None, :] - q_pos[:, None], -rel_radius), rel_radius)
        s += tl.load(rel_base + distance + rel_radius) * _LOG2E
    if HAS_BIAS:
        b = tl.load(bias_base + rows[:, None] * stride_bm + keys[None, :] * stride_bn,
                    mask=row_ok[:, None] & key_ok[None, :], other=0.0).to(tl.float32)
        b = tl.where(b == float("-inf"), b, tl.maximum(b, _MIN_BIAS))
        s += b * _LOG2E
    if MASKED:
        keep = key_ok[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row masked so far has m_new == -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(keep_p, p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def _attention_fwd(
    q_ptr,  # [T, N, D] queries, unit stride over D
    k_ptr,  # [T, N, D] keys
    v_ptr,  # [T, N, D] values
    out_ptr,  # [T, N, D] output
    bias_ptr,  # [B, N, S, S] additive bias by strides (HAS_BIAS)
    rel_ptr,  # [N, 2R + 1] fp32 relative-bias table, unit stride over the distance (REL_BIAS)
    pos_ptr,  # [T] int32 column of each token in its padded sequence (REL_BIAS)
    cu_seqlens_ptr,  # [B + 1] int32 sequence starts
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_rh,  # rel_ptr: between heads
    rel_radius,  # R: distances are clamped to [-R, R]
    qk_scale,  # scale * log2(e)
    lse_ptr,  # [N, T] fp32 natural log-sum-exp of each row, contiguous (STORE_LSE)
    seed_ptr,  # [1] int64 dropout seed, read here so a new seed needs no recompile (DROPOUT)
    n_tokens,  # T: rows of q (the lse row stride and the dropout counter's head stride)
    dropout_p,  # probability of dropping a probability (DROPOUT)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
    STORE_LSE: tl.constexpr, DROPOUT: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    if start_m >= seq_len:
        return

    # The sequence's base addresses are int64; offsets inside one sequence fit in int32, and
    # pointer blocks are rebuilt each step from 1D offsets rather than kept live (registers).
    q_base = q_ptr + seq_start * stride_qt + head * stride_qh
    k_base = k_ptr + seq_start * stride_kt + head * stride_kh
    v_base = v_ptr + seq_start * stride_vt + head * stride_vh
    bias_base = bias_ptr + seq.to(tl.int64) * stride_bb + head * stride_bh
    rel_base = rel_ptr + head * stride_rh
    pos_base = pos_ptr + seq_start
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    q_pos = tl.load(pos_base + rows, mask=row_ok, other=0) if REL_BIAS else rows
    io_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_base + rows[:, None] * stride_qt + dims[None, :], mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Row (head, packed row) of the lse and of the dropout counter, in int64: N x T can pass 2**31.
    lse_rows = head * n_tokens + seq_start + rows
    drop_rows = lse_rows << 32
    seed = tl.load(seed_ptr) if DROPOUT else 0

    # Key blocks [0, full_end) need no masking: they lie inside the sequence and, causal, wholly
    # at or below the block's first row. Blocks [full_end, end_n) are masked; causal programs
    # stop at the diagonal.
    if CAUSAL:
        full_end = (tl.minimum(start_m + 1, seq_len) // BLOCK_N) * BLOCK_N
        end_n = tl.minimum(seq_len, start_m + BLOCK_M)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        end_n = seq_len
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, bias_base, rel_base, pos_base, q_pos, start_n, rows, row_ok, seq_len,
            stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale, seed, drop_rows, dropout_p,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_BIAS, REL_BIAS, DROPOUT)
    for start_n in range(full_end, end_n, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, bias_base, rel_base, pos_base, q_pos, start_n, rows, row_ok, seq_len,
            stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale, seed, drop_rows, dropout_p,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_BIAS, REL_BIAS, DROPOUT)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    if STORE_LSE:
        # Natural log; +inf where no key was visible, so exp(score - lse) is 0 there.
        lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) / _LOG2E)
        tl.store(lse_ptr + lse_rows, lse, mask=row_ok)
    out_base = out_ptr + seq_start * stride_ot + head * stride_oh
    tl.store(out_base + rows[:, None] * stride_ot + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------- backward
# FlashAttention-2's backward, recomputing P = exp(s - lse) from the saved log-sum-exp: a
# preprocess kernel for D = rowsum(dO * O), a dK/dV kernel per (key block, head, sequence) that
# walks the query blocks of its sequence, a dQ kernel per (query block, head, sequence) that
# walks the key blocks. Each output element is written by one program: no atomics, so the
# result is deterministic. The base-2 scores are those of the forward; dS is the gradient with
# respect to the natural-log score (the one the biases add to).


@triton.jit
def _attention_bwd_preprocess(
    out_ptr,  # [T, N, D] the forward's output (after dropout), unit stride over D
    do_ptr,  # [T, N, D] gradient of the output
    delta_ptr,  # [N, T] fp32: D = rowsum(dO * O), contiguous
    dqkv_ptr,  # [T, 3, N, D] gradients; rows past the last sequence are zeroed here
    cu_seqlens_ptr,  # [B + 1] int32 sequence starts
    stride_ot, stride_oh, stride_dot, stride_doh,
    stride_gt, stride_gw, stride_gh,  # dqkv_ptr: between tokens, between q/k/v, between heads
    n_tokens,  # T
    n_seqs,  # B: cu_seqlens[B] is where the dummy rows start
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    total = tl.load(cu_seqlens_ptr + n_seqs)
    row_ok = rows < n_tokens
    real = row_ok & (rows < total)
    rows64 = rows.to(tl.int64)[:, None]
    dim_ok = (dims < HEAD_DIM)[None, :]
    o = tl.load(out_ptr + rows64 * stride_ot + head * stride_oh + dims[None, :], mask=real[:, None] & dim_ok,
                other=0.0).to(tl.float32)
    do = tl.load(do_ptr + rows64 * stride_dot + head * stride_doh + dims[None, :], mask=real[:, None] & dim_ok,
                 other=0.0).to(tl.float32)
    tl.store(delta_ptr + head * n_tokens + rows, tl.sum(o * do, 1), mask=row_ok)
    # Dummy rows belong to no sequence: no other kernel visits them, so their gradients are zeroed here.
    zeros = tl.zeros([BLOCK_M, BLOCK_D], dtype=dqkv_ptr.dtype.element_ty)
    dummy = (row_ok & (rows >= total))[:, None] & dim_ok
    g_ptrs = dqkv_ptr + rows64 * stride_gt + head * stride_gh + dims[None, :]
    tl.store(g_ptrs, zeros, mask=dummy)
    tl.store(g_ptrs + stride_gw, zeros, mask=dummy)
    tl.store(g_ptrs + 2 * stride_gw, zeros, mask=dummy)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, k_pos, start_n, keys, key_ok, start_m, seq_len, q_base, do_base, lse_base, delta_base,
    bias_base, rel_base, pos_base, stride_qt, stride_dot, stride_bm, stride_bn, rel_radius, qk_scale, seed,
    drop_base, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Add one block of queries' contribution to a key block's dK and dV, computed transposed
    ([keys, queries]) so that both are plain dots. With MASKED false every query row exists
    and sees every key of the block (no masking)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    dim_ok = dims < HEAD_DIM
    qt_ptrs = q_base + rows[None, :] * stride_qt + dims[:, None]  # [BLOCK_D, BLOCK_M]
    do_ptrs = do_base + rows[:, None] * stride_dot + dims[None, :]  # [BLOCK_M, BLOCK_D]
    if MASKED:
        qt = tl.load(qt_ptrs, mask=dim_ok[:, None] & row_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        if HEAD_DIM != BLOCK_D:
            qt = tl.load(qt_ptrs, mask=dim_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=dim_ok[None, :], other=0.0)
        else:
            qt = tl.load(qt_ptrs)
            do = tl.load(do_ptrs)
        lse2 = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    st = tl.dot(k, qt, input_precision="ieee") * qk_scale  # [BLOCK_N, BLOCK_M], base 2
    if REL_BIAS:
        q_pos = tl.load(pos_base + rows, mask=row_ok, other=0)
        distance = tl.minimum(tl.maximum(k_pos[:, None] - q_pos[None, :], -rel_radius), rel_radius)
        st += tl.load(rel_base + distance + rel_radius) * _LOG2E
    if HAS_BIAS:
        b = tl.load(bias_base + rows[None, :] * stride_bm + keys[:, None] * stride_bn,
                    mask=key_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
        b = tl.where(b == float("-inf"), b, tl.maximum(b, _MIN_BIAS))
        st += b * _LOG2E
    if MASKED:
        visible = key_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[:, None] <= rows[None, :])
        st = tl.where(visible, st, float("-inf"))
    # lse = +inf (rows that see no key; rows past the end) makes every probability 0, never NaN.
    pt = tl.exp2(st - lse2[None, :])
    dpt = tl.dot(v, tl.trans(do), input_precision="ieee")  # dO V^T, transposed
    if DROPOUT:
        kept = tl.trans(dropout_keep(seed, (drop_base + rows) << 32, start_n, BLOCK_N, dropout_p))
        inv_keep = 1.0 / (1.0 - dropout_p)
        dv += tl.dot(tl.where(kept, pt * inv_keep, 0.0).to(do.dtype), do, input_precision="ieee")
        dpt = tl.where(kept, dpt * inv_keep, 0.0)
    else:
        dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision="ieee")
    return dk, dv


@triton.jit
def _attention_bwd_dkdv(
    q_ptr,  # [T, N, D] queries, unit stride over D
    k_ptr,  # [T, N, D] keys
    v_ptr,  # [T, N, D] values
    do_ptr,  # [T, N, D] gradient of the output
    dk_ptr,  # [T, N, D] key gradients (a slice of dqkv)
    dv_ptr,  # [T, N, D] value gradients (a slice of dqkv, strides of dk_ptr)
    lse_ptr,  # [N, T] fp32 base-2 row shift of the probabilities, contiguous (see _attention_bwd_lse)
    delta_ptr,  # [N, T] fp32 rowsum(dO * O), contiguous
    bias_ptr,  # [B, N, S, S] additive bias by strides (HAS_BIAS)
    rel_ptr,  # [N, 2R + 1] fp32 relative-bias table, unit stride over the distance (REL_BIAS)
    pos_ptr,  # [T] int32 column of each token in its padded sequence (REL_BIAS)
    cu_seqlens_ptr,  # [B + 1] int32 sequence starts
    seed_ptr,  # [1] int64 dropout seed (DROPOUT)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_gt, stride_gh,  # dk_ptr / dv_ptr: between tokens, between heads
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_rh,  # rel_ptr: between heads
    rel_radius,  # R: distances are clamped to [-R, R]
    n_tokens,  # T: rows of q (lse/delta row stride, dropout counter's head stride)
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    dropout_p,  # probability of dropping a probability (DROPOUT)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    if start_n >= seq_len:
        return

    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < seq_len
    io_mask = key_ok[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + seq_start * stride_kt + head * stride_kh + keys[:, None] * stride_kt + dims[None, :],
                mask=io_mask, other=0.0)
    v = tl.load(v_ptr + seq_start * stride_vt + head * stride_vh + keys[:, None] * stride_vt + dims[None, :],
                mask=io_mask, other=0.0)
    pos_base = pos_ptr + seq_start
    k_pos = tl.load(pos_base + keys, mask=key_ok, other=0) if REL_BIAS else keys
    q_base = q_ptr + seq_start * stride_qt + head * stride_qh
    do_base = do_ptr + seq_start * stride_dot + head * stride_doh
    drop_base = head * n_tokens + seq_start  # int64: the (head, packed row) counter of row 0
    lse_base = lse_ptr + drop_base
    delta_base = delta_ptr + drop_base
    bias_base = bias_ptr + seq.to(tl.int64) * stride_bb + head * stride_bh
    rel_base = rel_ptr + head * stride_rh
    seed = tl.load(seed_ptr) if DROPOUT else 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [first_m, mid) straddle the causal diagonal (masked); [mid, full_end) are
    # whole and see every key of the block (unmasked); [max(mid, full_end), seq_len) hold the
    # sequence's partial last block (masked). A key block past the end masks every step.
    if CAUSAL:
        first_m = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        first_m = 0
        mid = 0
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    if start_n + BLOCK_N > seq_len:
        full_end = mid
    for start_m in range(first_m, tl.minimum(mid, seq_len), BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, k_pos, start_n, keys, key_ok, start_m, seq_len, q_base, do_base, lse_base, delta_base,
            bias_base, rel_base, pos_base, stride_qt, stride_dot, stride_bm, stride_bn, rel_radius, qk_scale, seed,
            drop_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_BIAS, REL_BIAS, DROPOUT)
    for start_m in range(mid, full_end, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, k_pos, start_n, keys, key_ok, start_m, seq_len, q_base, do_base, lse_base, delta_base,
            bias_base, rel_base, pos_base, stride_qt, stride_dot, stride_bm, stride_bn, rel_radius, qk_scale, seed,
            drop_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_BIAS, REL_BIAS, DROPOUT)
    for start_m in range(tl.maximum(mid, full_end), seq_len, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, k_pos, start_n, keys, key_ok, start_m, seq_len, q_base, do_base, lse_base, delta_base,
            bias_base, rel_base, pos_base, stride_qt, stride_dot, stride_bm, stride_bn, rel_radius, qk_scale, seed,
            drop_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_BIAS, REL_BIAS, DROPOUT)

    g_offs = seq_start * stride_gt + head * stride_gh + keys[:, None] * stride_gt + dims[None, :]
    tl.store(dk_ptr + g_offs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=io_mask)
    tl.store(dv_ptr + g_offs, dv.to(dv_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _dq_scores(
    q, kt, q_pos, rows, row_ok, keys, key_ok, bias_base, rel_base, pos_base, stride_bm, stride_bn, rel_radius,
    qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
):
    """The forward's base-2 scores of a query block against one key block (``kt``: K transposed,
    [BLOCK_D, keys]), [queries, keys], -inf where masked; returns (scores, each pair's bucket of
    the relative-bias table (REL_BIAS; else 0))."""
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale
    bucket = 0
    if REL_BIAS:
        k_pos = tl.load(pos_base + keys, mask=key_ok, other=0)
        bucket = tl.minimum(tl.maximum(k_pos[None, :] - q_pos[:, None], -rel_radius), rel_radius) + rel_radius
        s += tl.load(rel_base + bucket) * _LOG2E
    if HAS_BIAS:
        b = tl.load(bias_base + rows[:, None] * stride_bm + keys[None, :] * stride_bn,
                    mask=row_ok[:, None] & key_ok[None, :], other=0.0).to(tl.float32)
        b = tl.where(b == float("-inf"), b, tl.maximum(b, _MIN_BIAS))
        s += b * _LOG2E
    if MASKED:
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s, bucket


@triton.jit
def _dq_block(
    dq, d_rel, q, do, lse2, delta, q_pos, rows, row_ok, start_n, seq_len, k_base, v_base, bias_base, rel_base,
    pos_base, stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale, seed, drop_rows, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Add one key block's contribution to a query block's dQ (and, REL_BIAS, to its partial
    sums of dS per distance bucket, ``d_rel`` [BLOCK_W]). With MASKED false every key of the
    block exists and is visible to every row."""
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < seq_len
    dim_ok = dims < HEAD_DIM
    kt_ptrs = k_base + keys[None, :] * stride_kt + dims[:, None]  # [BLOCK_D, BLOCK_N]
    vt_ptrs = v_base + keys[None, :] * stride_vt + dims[:, None]
    if MASKED:
        kt = tl.load(kt_ptrs, mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
        vt = tl.load(vt_ptrs, mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
    elif HEAD_DIM != BLOCK_D:
        kt = tl.load(kt_ptrs, mask=dim_ok[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=dim_ok[:, None], other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        vt = tl.load(vt_ptrs)
    s, bucket = _dq_scores(q, kt, q_pos, rows, row_ok, keys, key_ok, bias_base, rel_base, pos_base, stride_bm,
                           stride_bn, rel_radius, qk_scale, MASKED, CAUSAL, HAS_BIAS, REL_BIAS)
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, vt, input_precision="ieee")
    if DROPOUT:
        kept = dropout_keep(seed, drop_rows, start_n, BLOCK_N, dropout_p)
        dp = tl.where(kept, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
    if REL_BIAS:
        # Σ dS per bucket, one bucket at a time over the range this tile touches, into a
        # register vector: a fixed order, so the sums are deterministic (no atomics).
        inside = row_ok[:, None] & key_ok[None, :]
        lowest = tl.min(tl.min(tl.where(inside, bucket, 2 * rel_radius), 1), 0)
        highest = tl.max(tl.max(tl.where(inside, bucket, 0), 1), 0)
        slots = tl.arange(0, BLOCK_W)
        for w in range(lowest, highest + 1):
            total = tl.sum(tl.sum(tl.where(bucket == w, ds, 0.0), 1), 0)
            d_rel += tl.where(slots == w, total, 0.0)
    return dq, d_rel


@triton.jit
def _attention_bwd_lse(
    q_ptr,  # [T, N, D] queries, unit stride over D
    k_ptr,  # [T, N, D] keys
    do_ptr,  # [T, N, D] gradient of the output
    do2_ptr,  # [T, N, D] contiguous: dO / l (l = 1 but on the rows recomputed here), for the dQ and dK/dV kernels
    lse_ptr,  # [N, T] fp32 natural log-sum-exp of the forward, contiguous
    lse2_ptr,  # [N, T] fp32 base-2 row shift for the dQ and dK/dV kernels, contiguous
    delta_ptr,  # [N, T] fp32 rowsum(dO * O) of the preprocess, divided by l here where l is recomputed
    bias_ptr,  # [B, N, S, S] additive bias by strides (HAS_BIAS)
    rel_ptr,  # [N, 2R + 1] fp32 relative-bias table, unit stride over the distance (REL_BIAS)
    pos_ptr,  # [T] int32 column of each token in its padded sequence (REL_BIAS)
    cu_seqlens_ptr,  # [B + 1] int32 sequence starts
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dot, stride_doh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_rh,  # rel_ptr: between heads
    rel_radius,  # R: distances are clamped to [-R, R]
    n_tokens,  # T: rows of q (the lse row stride)
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
):
    """The row shift the gradient kernels subtract from the scores: lse · log2(e), except on rows
    where the saved lse is inexact. A row whose largest score is huge (every key masked by a
    finite minimum, as Hugging Face masks are: scores near -3.4e38) has an lse = m + log l from
    which fp32 dropped log l, so exp(s - lse) would be 1 instead of 1/l. For a query block
    holding such a row the forward's m and l are recomputed; the shift is m, which makes the
    probabilities l times too large, and dO and D are divided by l instead (every gradient is
    linear in them). In a kernel of its own, so that this rare pass costs the gradient kernels
    no registers; the copy of dO it writes is their only cost."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    if start_m >= seq_len:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    io_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    stat_rows = head * n_tokens + seq_start + rows  # int64 (head, packed row)
    lse2 = tl.load(lse_ptr + stat_rows, mask=row_ok, other=float("inf")) * _LOG2E
    inv_l = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    finite = lse2 < float("inf")  # not rows that see no key, nor rows past the end
    if tl.max(tl.where(finite, tl.abs(lse2), 0.0), 0) >= _INEXACT_LSE2:
        q = tl.load(q_ptr + seq_start * stride_qt + head * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                    mask=io_mask, other=0.0)
        pos_base = pos_ptr + seq_start
        q_pos = tl.load(pos_base + rows, mask=row_ok, other=0) if REL_BIAS else rows
        k_base = k_ptr + seq_start * stride_kt + head * stride_kh
        bias_base = bias_ptr + seq.to(tl.int64) * stride_bb + head * stride_bh
        rel_base = rel_ptr + head * stride_rh
        end_n = tl.minimum(seq_len, start_m + BLOCK_M) if CAUSAL else seq_len
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, end_n, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys < seq_len
            kt = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None],
                         mask=(dims < HEAD_DIM)[:, None] & key_ok[None, :], other=0.0)
            s, _ = _dq_scores(q, kt, q_pos, rows, row_ok, keys, key_ok, bias_base, rel_base, pos_base, stride_bm,
                              stride_bn, rel_radius, qk_scale, True, CAUSAL, HAS_BIAS, REL_BIAS)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
            m_i = m_new
        lse2 = tl.where(finite, m_i, lse2)
        inv_l = tl.where(finite, 1.0 / tl.where(finite, l_i, 1.0), 1.0)
        delta = tl.load(delta_ptr + stat_rows, mask=row_ok, other=0.0)
        tl.store(delta_ptr + stat_rows, delta * inv_l, mask=row_ok)
    tl.store(lse2_ptr + stat_rows, lse2, mask=row_ok)
    do = tl.load(do_ptr + seq_start * stride_dot + head * stride_doh + rows[:, None] * stride_dot + dims[None, :],
                 mask=io_mask, other=0.0)
    n_heads = tl.num_programs(1)
    do2_offs = ((seq_start + rows[:, None]) * n_heads + head) * HEAD_DIM + dims[None, :]
    tl.store(do2_ptr + do2_offs, (do.to(tl.float32) * inv_l[:, None]).to(do2_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _attention_bwd_dq(
    q_ptr,  # [T, N, D] queries, unit stride over D
    k_ptr,  # [T, N, D] keys
    v_ptr,  # [T, N, D] values
    do_ptr,  # [T, N, D] gradient of the output
    dq_ptr,  # [T, N, D] query gradients (a slice of dqkv)
    lse_ptr,  # [N, T] fp32 base-2 row shift of the probabilities, contiguous (see _attention_bwd_lse)
    delta_ptr,  # [N, T] fp32 rowsum(dO * O), contiguous
    bias_ptr,  # [B, N, S, S] additive bias by strides (HAS_BIAS)
    rel_ptr,  # [N, 2R + 1] fp32 relative-bias table, unit stride over the distance (REL_BIAS)
    pos_ptr,  # [T] int32 column of each token in its padded sequence (REL_BIAS)
    cu_seqlens_ptr,  # [B + 1] int32 sequence starts
    seed_ptr,  # [1] int64 dropout seed (DROPOUT)
    drel_ptr,  # [N, B, query blocks, 2R + 1] fp32 per-program sums of dS per bucket (REL_BIAS)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_gt, stride_gh,  # dq_ptr: between tokens, between heads
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_rh,  # rel_ptr: between heads
    rel_radius,  # R: distances are clamped to [-R, R]
    n_tokens,  # T: rows of q (lse/delta row stride, dropout counter's head stride)
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    dropout_p,  # probability of dropping a probability (DROPOUT)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # power of two >= 2R + 1 (REL_BIAS)
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    if start_m >= seq_len:
        return

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    io_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq_start * stride_qt + head * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                mask=io_mask, other=0.0)
    do = tl.load(do_ptr + seq_start * stride_dot + head * stride_doh + rows[:, None] * stride_dot + dims[None, :],
                 mask=io_mask, other=0.0)
    stat_rows = head * n_tokens + seq_start + rows  # int64 (head, packed row)
    # Rows past the end get lse = +inf: probability 0, so they contribute nothing.
    lse2 = tl.load(lse_ptr + stat_rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stat_rows, mask=row_ok, other=0.0)
    drop_rows = stat_rows << 32
    seed = tl.load(seed_ptr) if DROPOUT else 0
    pos_base = pos_ptr + seq_start
    q_pos = tl.load(pos_base + rows, mask=row_ok, other=0) if REL_BIAS else rows
    k_base = k_ptr + seq_start * stride_kt + head * stride_kh
    v_base = v_ptr + seq_start * stride_vt + head * stride_vh
    bias_base = bias_ptr + seq.to(tl.int64) * stride_bb + head * stride_bh
    rel_base = rel_ptr + head * stride_rh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    d_rel = tl.zeros([BLOCK_W], dtype=tl.float32)

    # The forward's split: unmasked key blocks [0, full_end), masked [full_end, end_n).
    if CAUSAL:
        full_end = (tl.minimum(start_m + 1, seq_len) // BLOCK_N) * BLOCK_N
        end_n = tl.minimum(seq_len, start_m + BLOCK_M)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        end_n = seq_len
    for start_n in range(0, full_end, BLOCK_N):
        dq, d_rel = _dq_block(
            dq, d_rel, q, do, lse2, delta, q_pos, rows, row_ok, start_n, seq_len, k_base, v_base, bias_base,
            rel_base, pos_base, stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale, seed, drop_rows,
            dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_W, False, CAUSAL, HAS_BIAS, REL_BIAS, DROPOUT)
    for start_n in range(full_end, end_n, BLOCK_N):
        dq, d_rel = _dq_block(
            dq, d_rel, q, do, lse2, delta, q_pos, rows, row_ok, start_n, seq_len, k_base, v_base, bias_base,
            rel_base, pos_base, stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale, seed, drop_rows,
            dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_W, True, CAUSAL, HAS_BIAS, REL_BIAS, DROPOUT)

    g_offs = seq_start * stride_gt + head * stride_gh + rows[:, None] * stride_gt + dims[None, :]
    tl.store(dq_ptr + g_offs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=io_mask)
    if REL_BIAS:
        width = 2 * rel_radius + 1
        slot = (head * tl.num_programs(2) + seq) * tl.num_programs(0) + tl.program_id(0)
        slots = tl.arange(0, BLOCK_W)
        tl.store(drel_ptr + slot * width + slots, d_rel, mask=slots < width)


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def block_d(head_dim: int) -> int:
    """The power-of-two tile width that holds ``head_dim`` (at least 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def config(head_dim: int, dtype: torch.dtype, interpreting: bool = False, arch: int = 80,
           masked: bool = True, rel_bias: bool = False, train: bool = False) -> Config:
    """The launch configuration (a heuristic; no autotuning) for a head dim and dtype on GPU
    architecture ``arch`` (80: Ampere, 90: Hopper), ``masked`` when causal, with a bias or with
    a relative bias (the variants with more live values), ``rel_bias`` with the latter.

    Under the interpreter the blocks are small so that short test sequences still span several
    key blocks and exercise the online softmax, partial blocks and the causal diagonal.
    """
    if interpreting:
        return Config(16, 16, 1, 1)
    # The largest tiles that spill no registers with Triton 3.6, 3.8 or 3.9 (the compile tests
    # check every shipped configuration on its architecture; the training variants were checked
    # with 3.8 and 3.9 only).
    width = block_d(head_dim)
    if train and dtype != torch.float32:
        # The training forward (lse stored, a Philox tile per step when dropping) spilled at the
        # inference tiles on sm_80 for head dims 33-128 and on sm_90 at 256 with the relative
        # bias: fewer keys per step there.
        if arch < 90 and 32 < width <= 128:
            return Config(128, 32, 8, 2) if width <= 64 else Config(64, 32, 8, 2)
        if arch >= 90 and width > 128:
            return Config(64, 16, 8, 2)
        if arch >= 90 and rel_bias and width > 64:  # 64 keys spilled (bf16, Triton 3.8)
            return Config(128, 32, 8, 2)
    if dtype == torch.float32:
        # fp32 runs its dots as exact fp32 FMAs (no tensor cores): small tiles. With the
        # relative-bias gather live too, sm_80 spilled (8-32 bytes) at 32x32 tiles for head dims
        # 33-64 and at 4 warps for 65-128.
        if rel_bias and arch < 90 and 32 < width <= 128:
            return Config(16, 16, 4 if width <= 64 else 8, 2)
        return Config(32, 32, 4 if width <= 32 else 8, 2) if width <= 64 else Config(16, 16, 4, 2)
    if arch >= 90:
        # wgmma keeps its accumulators in fewer registers than mma: wider key blocks fit, but
        # 128 keys spill once the causal/bias code is live too.
        if width <= 64 and not masked:
            return Config(128, 128, 8, 2)
        if width <= 128:
            return Config(128, 64, 8, 3 if width <= 64 else 2)
        return Config(64, 32, 8, 2)
    if width <= 32:
        return Config(64, 64, 4, 3)
    if width <= 64:
        return Config(128, 64, 8, 3)
    if width <= 128:
        return Config(128, 32, 8, 2)
    return Config(64, 32, 8, 2)


ARCHS = (80, 90)


def config_candidates(head_dim: int, dtype: torch.dtype, arch: int, masked: bool, rel_bias: bool,
                      train: bool) -> tuple[Config, ...]:
    """The forward configurations a launch may measure (see :mod:`fastbert.kernels.launch`),
    :func:`config`'s first."""
    return (config(head_dim, dtype, arch=arch, masked=masked, rel_bias=rel_bias, train=train),)


def shipped_train_configs() -> list[tuple[int, torch.dtype, int, bool, Config]]:
    """(head_dim, dtype, arch, rel_bias, config) for every case the training forward serves on a GPU."""
    return [(d, dt, arch, rel, config(d, dt, arch=arch, rel_bias=rel, train=True)) for d in HEAD_DIMS
            for dt in (torch.float16, torch.bfloat16, torch.float32) for arch in ARCHS for rel in (False, True)]


def shipped_configs() -> list[tuple[int, torch.dtype, int, bool, bool, Config]]:
    """(head_dim, dtype, arch, masked, rel_bias, config) for every case the launcher serves on a GPU."""
    return [(d, dt, arch, masked, rel, config(d, dt, arch=arch, masked=masked, rel_bias=rel)) for d in HEAD_DIMS
            for dt in (torch.float16, torch.bfloat16, torch.float32) for arch in ARCHS
            for masked, rel in ((False, False), (True, False), (True, True))]


def _check_inputs(q, k, v, cu_seqlens, rel_bias, positions):
    """Refuse what the kernels do not serve, naming the argument (the checks of every attention op)."""
    heads, head_dim = q.shape[1], q.shape[2]
    batch = cu_seqlens.numel() - 1
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one [T, N, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if head_dim > max(HEAD_DIMS):
        raise ValueError(f"head dim {head_dim} is above the largest supported, {max(HEAD_DIMS)}")
    if max(heads, batch) > MAX_GRID_YZ:
        raise ValueError(f"{heads} heads x {batch} sequences: at most {MAX_GRID_YZ} of each per call")
    reference.check_rel_bias(q, rel_bias, positions)


def _extra_args(q, cu_seqlens, max_seqlen, bias, rel_bias, positions):
    """(bias, its 4 strides) and (table, positions, head stride, R), with placeholders when absent."""
    batch, heads = cu_seqlens.numel() - 1, q.shape[1]
    if bias is not None:
        bias = bias.expand(batch, heads, max_seqlen, max_seqlen)
        bias_args = (bias, *bias.stride())
    else:
        bias_args = (q, 0, 0, 0, 0)
    if rel_bias is not None:
        rel_bias, positions = rel_bias if rel_bias.stride(1) == 1 else rel_bias.contiguous(), positions.contiguous()
        rel_args = (rel_bias, positions, rel_bias.stride(0), (rel_bias.shape[1] - 1) // 2)
    else:
        rel_args = (q, cu_seqlens, 0, 0)
    return bias_args, rel_args


def _launch_key(q, causal, bias, rel_bias, dropout, max_seqlen) -> tuple:
    """What a measured launch configuration is kept under (see :mod:`fastbert.kernels.launch`):
    the architecture (first), head dim, dtype, the flags and the max sequence length's bucket."""
    return (gpu_arch(q.device), q.shape[2], q.dtype, causal, bias is not None, rel_bias is not None, dropout,
            tuning.bucket(max_seqlen))


def _forward(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, out, launch, lse, dropout_p,
             seed):
    """Launch the forward kernel; ``lse`` (or None) receives the log-sum-exp, dropout when ``dropout_p`` > 0."""
    T, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    _check_inputs(q, k, v, cu_seqlens, rel_bias, positions)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty(T, heads, head_dim, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dim, got {tuple(out.shape)}")
    if T == 0 or batch == 0 or max_seqlen == 0:
        return out.zero_()
    dropout = dropout_p > 0
    bias_args, rel_args = _extra_args(q, cu_seqlens, max_seqlen, bias, rel_bias, positions)

    def run(cfg: Config) -> None:
        grid = (triton.cdiv(max_seqlen, cfg.block_m), heads, batch)
        with on_device_of(q):
            _attention_fwd[grid](
                q, k, v, out, bias_args[0], rel_args[0], rel_args[1], cu_seqlens,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
                out.stride(1), *bias_args[1:], *rel_args[2:],
                scale * LOG2E, q if lse is None else lse, seed if dropout else cu_seqlens, T, float(dropout_p),
                HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                CAUSAL=causal, HAS_BIAS=bias is not None, REL_BIAS=rel_bias is not None,
                STORE_LSE=lse is not None, DROPOUT=dropout,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

    if launch is None:
        masked, train = causal or bias is not None or rel_bias is not None or lse is not None, lse is not None
        if _compat.interpreting():
            launch = config(head_dim, q.dtype, True)
        else:
            key = _launch_key(q, causal, bias, rel_bias, dropout, max_seqlen)
            launch = tile("attention_train" if train else "attention", key, q,
                          lambda: config_candidates(head_dim, q.dtype, key[0], masked, rel_bias is not None, train),
                          run)
    run(launch)
    return out


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
    out: torch.Tensor | None = None,
    launch: Config | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + rel + bias, causal) v; see :func:`fastbert.reference.attention`.

    ``out`` (optional, ``[T, N, D]`` with a contiguous head dim) receives the result; ``launch``
    overrides the configuration measured among :func:`config_candidates` (see
    :mod:`fastbert.kernels.launch`).
    """
    return _forward(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, out, launch,
                    None, 0.0, None)


def attention_train(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p, seed,
                    out=None, lse=None, launch=None):
    """(out [T, N, D], lse [N, T] fp32); see :func:`fastbert.reference.attention_train`.

    The same kernel as :func:`attention` also storing the natural-log log-sum-exp (+inf for rows
    that see no key and for dummy rows) and, with ``dropout_p`` > 0, dropping normalised
    probabilities at the counter ``((head · T + row) << 32) | key`` (four keys to a Philox call, as
    :func:`fastbert.reference.dropout_keep` draws them). The seed tensor is
    read by the kernel: a new seed costs no host sync and no recompile. ``out`` and ``lse``
    (optional, contiguous ``[N, T]`` fp32) receive the results; dummy rows of ``out`` are left
    as they are (zeros when it is allocated here: the layers after attention and their
    backward multiply them by zero gradients, which NaN garbage would turn into NaN).
    """
    reference.check_dropout(dropout_p, seed)
    T, heads = q.shape[0], q.shape[1]
    if out is None:
        out = torch.zeros(T, heads, v.shape[2], dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(heads, T, dtype=torch.float32, device=q.device)
    elif lse.shape != (heads, T) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 [{heads}, {T}], got {lse.dtype} {tuple(lse.shape)}")
    # Rows no program visits (dummy rows; every row of an empty batch) see no key.
    lse.fill_(float("inf"))
    out = _forward(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, out, launch, lse,
                   dropout_p, seed)
    return out, lse


class BackwardConfig(NamedTuple):
    dkdv: Config  # block_m: queries per step, block_n: keys per program
    dq: Config  # block_m: queries per program, block_n: keys per step


def backward_config(head_dim: int, dtype: torch.dtype, interpreting: bool = False, arch: int = 80) -> BackwardConfig:
    """Launch configurations of the dK/dV and dQ kernels (a heuristic; no autotuning).

    The dK/dV kernel keeps two fp32 accumulators [keys, D] and the dQ kernel one [queries, D];
    each also holds a tile of Philox state when dropout is on, the variant that sets the sizes
    (the compile tests check causal + bias + relative bias + dropout on every architecture, and
    none of these spills). Steps over the other sequence axis are 16 wide. The block each program
    owns is 64 where it fits, the smallest ``wgmma`` tile on Hopper; the dK/dV kernel at head
    dims above 64 and both kernels above 128 need 32 (sm_90 then runs ``mma``). fp32 runs its dots
    as FMAs: 16 x 16 tiles. Under the interpreter the blocks are small so that short sequences
    span several blocks.
    """
    if interpreting:
        return BackwardConfig(Config(16, 16, 1, 1), Config(16, 16, 1, 1))
    width = block_d(head_dim)
    if dtype == torch.float32:
        if arch >= 90:  # more dQ warps spilled 8-28 bytes there with Triton 3.8 (at 64-80 registers)
            # 8 dK/dV warps spilled 24 bytes at head dims 80 and 96 with Triton 3.9 (at 80 registers),
            # 4 did at 128 with the relative bias; above 128, with dropout drawing four values per
            # Philox call, 8 spilled 8 bytes (relative bias, Triton 3.9) and 16 do not.
            dkdv_warps = 4 if head_dim <= 96 else 8 if head_dim <= 128 else 16
            return BackwardConfig(Config(16, 16, dkdv_warps, 1), Config(16, 16, 4, 1))
        dq_warps = 4 if width <= 64 else 8 if width <= 128 else 16  # fewer spill (16-96 bytes on sm_80)
        return BackwardConfig(Config(16, 16, 4 if width <= 64 else 8, 1), Config(16, 16, dq_warps, 1))
    if width <= 64:
        return BackwardConfig(Config(16, 64, 4, 1), Config(64, 16, 4, 1))
    if width <= 128:
        # On sm_90 a 64-query dQ block spilled with the relative bias (Triton 3.8): 32 (mma).
        return BackwardConfig(Config(16, 32, 8, 1), Config(64 if arch < 90 else 32, 16, 8, 1))
    return BackwardConfig(Config(16, 32, 8, 1), Config(32, 16, 8, 1))


def backward_config_candidates(head_dim: int, dtype: torch.dtype, arch: int) -> tuple[BackwardConfig, ...]:
    """The backward configurations a launch may measure, :func:`backward_config`'s first."""
    return (backward_config(head_dim, dtype, arch=arch),)


def shipped_backward_configs() -> list[tuple[int, torch.dtype, int, BackwardConfig]]:
    """(head_dim, dtype, arch, config) for every case the backward launcher serves on a GPU."""
    return [(d, dt, arch, backward_config(d, dt, arch=arch)) for d in HEAD_DIMS
            for dt in (torch.float16, torch.bfloat16, torch.float32) for arch in ARCHS]


# The widest relative-bias table whose gradient the dQ kernel keeps in registers.
MAX_REL_WIDTH = 4095
# Rows per program of the preprocess kernel, and its warps for a tile width.
PREPROCESS_ROWS = 16


def preprocess_warps(width: int) -> int:
    return 4 if width <= 64 else 8


def attention_backward(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions,
                       dropout_p, seed, dqkv=None, launch: BackwardConfig | None = None):
    """(dqkv [T, 3, N, D], d_rel_bias); see :func:`fastbert.reference.attention_backward`.

    FlashAttention-2's backward from the saved ``out`` (after dropout) and ``lse``: D =
    rowsum(dO * O), the rows' shifts (recomputed where ``lse`` is inexact, see
    :func:`_attention_bwd_lse`), then dQ and dK/dV kernels recomputing the probabilities and
    the dropout mask. Deterministic: every gradient element is written by one program, and the relative
    bias's gradient is summed per bucket inside each dQ program and over programs in a fixed
    order. Dummy rows and rows that see no key get zero dq (dummy rows zero dk and dv too).
    ``dqkv`` (optional, contiguous ``[T, 3, N, D]`` in q's dtype) receives the gradients;
    ``launch`` overrides the configuration measured among :func:`backward_config_candidates`
    (see :mod:`fastbert.kernels.launch`).
    """
    reference.check_dropout(dropout_p, seed)
    _check_inputs(q, k, v, cu_seqlens, rel_bias, positions)
    T, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    for name, t in (("grad", grad), ("out", out)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must be {tuple(q.shape)}, got {tuple(t.shape)}")
    if lse.shape != (heads, T) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [{heads}, {T}], got {lse.dtype} {tuple(lse.shape)}")
    width = rel_bias.shape[1] if rel_bias is not None else 0
    if width > MAX_REL_WIDTH:
        raise NotImplementedError(f"the triton backend has no gradient for rel_bias tables wider than {MAX_REL_WIDTH}")
    q, k, v, grad, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, grad, out))
    lse = lse.contiguous()
    if dqkv is None:
        dqkv = torch.empty(T, 3, heads, head_dim, dtype=q.dtype, device=q.device)
    elif dqkv.shape != (T, 3, heads, head_dim) or dqkv.dtype != q.dtype or dqkv.stride(-1) != 1:
        raise ValueError(f"dqkv must be {q.dtype} [{T}, 3, {heads}, {head_dim}] with a contiguous last dim, "
                         f"got {dqkv.dtype} {tuple(dqkv.shape)}")
    d_rel = torch.zeros(rel_bias.shape if rel_bias is not None else (0,), dtype=torch.float32, device=q.device)
    if T == 0 or batch == 0 or max_seqlen == 0:
        return dqkv.zero_(), d_rel
    dropout = dropout_p > 0
    seed_arg = seed if dropout else cu_seqlens
    bias_args, rel_args = _extra_args(q, cu_seqlens, max_seqlen, bias, rel_bias, positions)
    dq, dk, dv = dqkv.unbind(1)
    delta = torch.empty(heads, T, dtype=torch.float32, device=q.device)
    width_d = block_d(head_dim)
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=width_d, CAUSAL=causal, HAS_BIAS=bias is not None,
                 REL_BIAS=rel_bias is not None, DROPOUT=dropout)
    # What the gradient kernels read in place of lse and dO (see _attention_bwd_lse).
    lse2 = torch.empty_like(lse)
    grad2 = torch.empty(T, heads, head_dim, dtype=grad.dtype, device=q.device)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad2.stride(0), grad2.stride(1), dqkv.stride(0), dqkv.stride(2))
    with on_device_of(q):
        _attention_bwd_preprocess[(triton.cdiv(T, PREPROCESS_ROWS), heads)](
            out, grad, delta, dqkv, cu_seqlens, out.stride(0), out.stride(1), grad.stride(0), grad.stride(1),
            dqkv.stride(0), dqkv.stride(1), dqkv.stride(2), T, batch,
            HEAD_DIM=head_dim, BLOCK_D=width_d, BLOCK_M=PREPROCESS_ROWS, num_warps=preprocess_warps(width_d))

    def run(cfg: BackwardConfig) -> torch.Tensor:
        """The gradient kernels at ``cfg``; returns the relative bias's per-program partial sums."""
        c = cfg.dq
        blocks_m = triton.cdiv(max_seqlen, c.block_m)
        with on_device_of(q):
            _attention_bwd_lse[(blocks_m, heads, batch)](
                q, k, grad, grad2, lse, lse2, delta, bias_args[0], rel_args[0], rel_args[1], cu_seqlens, *strides[:4],
                grad.stride(0), grad.stride(1), *bias_args[1:], *rel_args[2:], T, scale * LOG2E, BLOCK_M=c.block_m,
                BLOCK_N=c.block_n, HEAD_DIM=head_dim, BLOCK_D=width_d, CAUSAL=causal, HAS_BIAS=bias is not None,
                REL_BIAS=rel_bias is not None, num_warps=c.num_warps, num_stages=c.num_stages)
            partial = (torch.zeros(heads, batch, blocks_m, width, dtype=torch.float32, device=q.device)
                       if rel_bias is not None else d_rel)
            _attention_bwd_dq[(blocks_m, heads, batch)](
                q, k, v, grad2, dq, lse2, delta, bias_args[0], rel_args[0], rel_args[1], cu_seqlens, seed_arg, partial,
                *strides, *bias_args[1:], *rel_args[2:], T, scale * LOG2E, scale, float(dropout_p),
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_W=max(16, triton.next_power_of_2(width)), **flags,
                num_warps=c.num_warps, num_stages=c.num_stages)
            c = cfg.dkdv
            _attention_bwd_dkdv[(triton.cdiv(max_seqlen, c.block_n), heads, batch)](
                q, k, v, grad2, dk, dv, lse2, delta, bias_args[0], rel_args[0], rel_args[1], cu_seqlens, seed_arg,
                *strides, *bias_args[1:], *rel_args[2:], T, scale * LOG2E, scale, float(dropout_p),
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, **flags, num_warps=c.num_warps, num_stages=c.num_stages)
        return partial

    if launch is None:
        if _compat.interpreting():
            launch = backward_config(head_dim, q.dtype, True)
        else:
            key = _launch_key(q, causal, bias, rel_bias, dropout, max_seqlen)
            launch = tile("attention_backward", key, q,
                          lambda: backward_config_candidates(head_dim, q.dtype, key[0]), run)
    partial = run(launch)
    if rel_bias is not None:
        d_rel = partial.sum((1, 2))  # a fixed-order reduction over the programs' partial sums
    return dqkv, d_rel
