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
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastbert import _compat, reference
from fastbert.kernels.launch import on_device_of

LOG2E = math.log2(math.e)
# Any head dim up to the last works; these are the ones the tests compile and run.
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
# CUDA caps the second and third grid dimensions (heads, sequences) at 65535 programs.
MAX_GRID_YZ = 65535

_LOG2E = tl.constexpr(LOG2E)
# The most negative finite bias whose base-2 rescale (x log2(e)) still fits in fp32.
_MIN_BIAS = tl.constexpr(-torch.finfo(torch.float32).max / LOG2E)


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, k_base, v_base, bias_base, rel_base, pos_base, q_pos, start_n, rows, row_ok, seq_len,
    stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
):
    """Fold one block of keys into the running softmax state (acc, l_i, m_i) of a query block.

    With MASKED false every key of the block exists and is visible to every row, so no key
    masking is done (the common case: all blocks but the last and, causal, the diagonal ones).
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, REL_BIAS: tl.constexpr,
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
            stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_BIAS, REL_BIAS)
    for start_n in range(full_end, end_n, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, bias_base, rel_base, pos_base, q_pos, start_n, rows, row_ok, seq_len,
            stride_kt, stride_vt, stride_bm, stride_bn, rel_radius, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_BIAS, REL_BIAS)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_base = out_ptr + seq_start * stride_ot + head * stride_oh
    tl.store(out_base + rows[:, None] * stride_ot + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def block_d(head_dim: int) -> int:
    """The power-of-two tile width that holds ``head_dim`` (at least 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def config(head_dim: int, dtype: torch.dtype, interpreting: bool = False, arch: int = 80,
           masked: bool = True, rel_bias: bool = False) -> Config:
    """The launch configuration (a heuristic; no autotuning) for a head dim and dtype on GPU
    architecture ``arch`` (80: Ampere, 90: Hopper), ``masked`` when causal, with a bias or with
    a relative bias (the variants with more live values), ``rel_bias`` with the latter.

    Under the interpreter the blocks are small so that short test sequences still span several
    key blocks and exercise the online softmax, partial blocks and the causal diagonal.
    """
    if interpreting:
        return Config(16, 16, 1, 1)
    # The largest tiles that spill no registers with Triton 3.6 or 3.9 (the compile tests check
    # every shipped configuration on its architecture).
    width = block_d(head_dim)
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


def shipped_configs() -> list[tuple[int, torch.dtype, int, bool, bool, Config]]:
    """(head_dim, dtype, arch, masked, rel_bias, config) for every case the launcher serves on a GPU."""
    return [(d, dt, arch, masked, rel, config(d, dt, arch=arch, masked=masked, rel_bias=rel)) for d in HEAD_DIMS
            for dt in (torch.float16, torch.bfloat16, torch.float32) for arch in ARCHS
            for masked, rel in ((False, False), (True, False), (True, True))]


@functools.cache
def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


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
    overrides the configuration :func:`config` picks.
    """
    T, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one [T, N, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if head_dim > max(HEAD_DIMS):
        raise ValueError(f"head dim {head_dim} is above the largest supported, {max(HEAD_DIMS)}")
    if max(heads, batch) > MAX_GRID_YZ:
        raise ValueError(f"{heads} heads x {batch} sequences: at most {MAX_GRID_YZ} of each per call")
    reference.check_rel_bias(q, rel_bias, positions)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty(T, heads, head_dim, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dim, got {tuple(out.shape)}")
    if T == 0 or batch == 0 or max_seqlen == 0:
        return out.zero_()
    cfg = launch or config(head_dim, q.dtype, _compat.interpreting(), _arch(q.device) if q.is_cuda else 80,
                           masked=causal or bias is not None or rel_bias is not None, rel_bias=rel_bias is not None)
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
    grid = (triton.cdiv(max_seqlen, cfg.block_m), heads, batch)
    with on_device_of(q):
        _attention_fwd[grid](
            q, k, v, out, bias_args[0], rel_args[0], rel_args[1], cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            *bias_args[1:], *rel_args[2:],
            scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, HAS_BIAS=bias is not None, REL_BIAS=rel_bias is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
