"""GELU(x Wᵀ + b): the FFN up-projection with its bias and activation fused into the GEMM.

A tiled matrix multiply: each program owns a ``BLOCK_M x BLOCK_N`` tile of the output, walks K
in ``BLOCK_K`` steps with ``tl.dot`` accumulating in fp32, then adds the bias, applies GELU in
fp32 and stores once in the input dtype. Output tiles are visited in groups of ``GROUP_M``
rows so that consecutive programs reuse the same weight columns from L2.

``W`` is an ``nn.Linear`` weight ``[F, K]``; it is read transposed through its strides, never
copied. Triton lowers the fp16/bf16 ``tl.dot`` to ``wgmma`` on Hopper (sm_90) and ``mma`` on
Ampere (sm_80). fp32 inputs are multiplied at full fp32 precision (``input_precision="ieee"``)
rather than TF32, which is slower but keeps parity with PyTorch's fp32 ``F.linear``.

GELU is exact (erf) by default; ``approximate="tanh"`` is HF's ``gelu_new`` /
``gelu_pytorch_tanh``, written as ``x * sigmoid(2u)`` (= ``0.5 x (1 + tanh u)``) through
``exp2``, so it needs no libdevice ``tanh``.

Training: with ``STORE_PRE`` the kernel also stores the pre-activation x Wᵀ + b; the backward
is one elementwise kernel for dpre = grad · GELU′(pre) (tanh through ``exp2`` there too) with
per-row-block column sums for dbias, then two torch matmuls for dx and dW.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastbert import _compat, tuning
from fastbert.kernels.launch import gpu_arch, on_device_of, tile
from fastbert.reference import GELU_APPROXIMATIONS

_SQRT1_2 = tl.constexpr(math.sqrt(0.5))
# tanh-GELU: x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); sigmoid through exp2.
_TANH_SCALE = tl.constexpr(-2.0 * math.sqrt(2.0 / math.pi) * math.log2(math.e))


@triton.jit
def _linear_gelu(
    x_ptr,  # [M, K] input, unit stride over K
    w_ptr,  # [N, K] nn.Linear weight, unit stride over K
    b_ptr,  # [N] bias
    y_ptr,  # [M, N] output
    M, N, K,  # sizes
    stride_xm, stride_wn, stride_ym,  # between rows
    pre_ptr,  # [M, N] pre-activation x Wᵀ + b, row stride stride_ym (STORE_PRE)
    APPROX_TANH: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STORE_PRE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge are wrapped rather than masked in the K loop: they read
    # valid memory, their results are never stored, and the loads stay unconditional.
    x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * stride_wn + ks[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(k + ks)[None, :] < K, other=0.0)
            b = tl.load(w_ptrs, mask=(k + ks)[:, None] < K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    y = acc + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], y.to(pre_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])
    if APPROX_TANH:
        y = y / (1.0 + tl.exp2((y + 0.044715 * y * y * y) * _TANH_SCALE))
    else:
        y = 0.5 * y * (1.0 + tl.math.erf(y * _SQRT1_2))
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def config(M: int, dtype: torch.dtype, interpreting: bool = False) -> Config:
    """The launch configuration (a heuristic; no autotuning, so no retuning per shape).

    Under the interpreter the tiles are small so that tiny test shapes still span several
    tiles and K steps.
    """
    if interpreting:
        return Config(16, 32, 16, 2, 1, 1)
    if dtype == torch.float32:
        return Config(64, 64, 32, 8, 4, 2)
    if M <= 64:
        return Config(64, 128, 64, 8, 4, 4)
    return Config(128, 128, 64, 8, 8, 3)


def config_candidates(M: int, dtype: torch.dtype, arch: int, even_k: bool) -> tuple[Config, ...]:
    """The configurations a launch may measure (see :mod:`fastbert.kernels.launch`), :func:`config`'s first."""
    return (config(M, dtype),)


# The option measured beside the Triton configurations: cuBLAS's GEMM with the bias, then GELU.
CUBLAS = "cublas"


def _cublas(x2, weight, bias, y2, pre2, approximate) -> None:
    """y2 = GELU(x2 Wᵀ + b) (pre2 = x2 Wᵀ + b when given) by cuBLAS and one elementwise pass."""
    if pre2 is None:
        torch.addmm(bias, x2, weight.t(), out=y2)
        torch.ops.aten.gelu_(y2, approximate=approximate)
    else:
        torch.addmm(bias, x2, weight.t(), out=pre2)
        torch.ops.aten.gelu.out(pre2, approximate=approximate, out=y2)


def shipped_configs() -> list[tuple[torch.dtype, Config]]:
    """(dtype, config) for every configuration the launcher uses on a GPU."""
    return [(dt, config(M, dt)) for dt in (torch.float16, torch.bfloat16) for M in (64, 4096)] + [
        (torch.float32, config(4096, torch.float32))
    ]


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str,
    out: torch.Tensor | None = None,
    launch: Config | None = None,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    """GELU(x Wᵀ + b); see :func:`fastbert.reference.linear_gelu`.

    ``x`` is ``[..., K]``; ``out`` (optional, ``[..., F]`` with contiguous rows) receives the
    result; ``launch`` (a :class:`Config`, or :data:`CUBLAS`) overrides the option measured among
    :func:`config_candidates` and cuBLAS (see :mod:`fastbert.kernels.launch`); ``pre`` (optional,
    contiguous, shaped like ``out``) also receives the pre-activation x Wᵀ + b.
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    *lead, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or bias.shape != (N,):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match")
    if weight.dtype != x.dtype:
        raise TypeError(f"linear_gelu needs x and weight of one dtype, got x {x.dtype} and weight {weight.dtype}")
    M = math.prod(lead)
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    bias = bias.contiguous()
    if out is None:
        out = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    y2 = out.view(M, N)
    pre2 = None if pre is None else pre.view(M, N)
    if M == 0 or N == 0:
        return out
    if K == 0:  # x Wᵀ is all zeros
        if pre2 is not None:
            pre2.copy_(bias.expand_as(pre2))
        y2.copy_(torch.nn.functional.gelu(bias.float(), approximate=approximate).expand_as(y2))
        return out

    def run(cfg: Config | str) -> None:
        if cfg == CUBLAS:
            _cublas(x2, weight, bias, y2, pre2, approximate)
            return
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        with on_device_of(x2):
            _linear_gelu[grid](
                x2, weight, bias, y2, M, N, K, x2.stride(0), weight.stride(0), y2.stride(0),
                y2 if pre2 is None else pre2,
                APPROX_TANH=approximate == "tanh", EVEN_K=K % cfg.block_k == 0, STORE_PRE=pre2 is not None,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

    if launch is None:
        if _compat.interpreting():
            launch = config(M, x.dtype, True)
        else:
            arch = gpu_arch(x.device)
            key = (arch, x.dtype, N, K, tuning.bucket(M), approximate, pre2 is not None)
            launch = tile("linear_gelu", key, x2,
                          lambda: (*config_candidates(M, x.dtype, arch, K % 16 == 0), CUBLAS), run)
    run(launch)
    return out


# ----------------------------------------------------------------------------- training

_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_TWO_LOG2E = tl.constexpr(2.0 * math.log2(math.e))


@triton.jit
def _gelu_bwd(
    grad_ptr,  # [M, N] gradient of the output, unit stride over N
    pre_ptr,  # [M, N] saved pre-activation
    dpre_ptr,  # [M, N] gradient of the pre-activation, contiguous
    partial_ptr,  # [programs over M, N] fp32 column sums of dpre per row block
    M, N,  # sizes
    stride_gm, stride_pm,  # between rows
    APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dpre = grad · GELU′(pre) in fp32, and the column sums (dbias) of this block of rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(grad_ptr + r64 * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(pre_ptr + r64 * stride_pm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        # 0.5 (1 + t) + 0.5 x (1 - t²) u′, t = tanh u = 1 - 2 / (1 + e^{2u}) (no libdevice tanh).
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t = 1.0 - 2.0 / (1.0 + tl.exp2(u * _TWO_LOG2E))
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        # Φ(x) + x φ(x)
        slope = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    dpre = g * slope
    tl.store(dpre_ptr + r64 * N + cols[None, :], dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * N + cols, tl.sum(dpre, 0), mask=cols < N)


class BackwardConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int


def backward_config(interpreting: bool = False) -> BackwardConfig:
    """Tiles of the elementwise GELU′ kernel: 64 rows (one partial dbias row per 64 rows) by 128
    columns, 8 elements per thread. Under the interpreter 16 x 32, so tiny shapes span several."""
    return BackwardConfig(16, 32, 1) if interpreting else BackwardConfig(64, 128, 4)


def linear_gelu_train(x, weight, bias, approximate, out=None, launch=None):
    """(GELU(x Wᵀ + b), x Wᵀ + b): the fused GEMM also storing its pre-activation; see
    :func:`fastbert.reference.linear_gelu_train`."""
    pre = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    out = linear_gelu(x, weight, bias, approximate, out=out, launch=launch, pre=pre)
    return out, pre


def linear_gelu_backward(grad, x, weight, pre, approximate):
    """(dx, dweight, dbias); see :func:`fastbert.reference.linear_gelu_backward`. A fused
    elementwise kernel gives dpre = grad · GELU′(pre) (in x's dtype) and per-row-block fp32
    column sums for dbias, reduced in a fixed order; then dx = dpre W and dW = dpreᵀ x by torch's
    matmul (cuBLAS on a GPU)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    N, K = weight.shape
    if pre.shape[-1] != N or grad.shape != pre.shape or x.shape[-1] != K:
        raise ValueError(f"grad {tuple(grad.shape)}, x {tuple(x.shape)}, weight {tuple(weight.shape)} and "
                         f"pre {tuple(pre.shape)} do not match")
    M = pre.numel() // N if N else 0
    g2, p2 = grad.reshape(M, N), pre.reshape(M, N)
    g2, p2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (g2, p2))
    dpre = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = backward_config(_compat.interpreting())
    blocks_m = triton.cdiv(M, cfg.block_m)
    partial = torch.zeros(max(blocks_m, 1), N, dtype=torch.float32, device=x.device)
    if M and N:
        with on_device_of(g2):
            _gelu_bwd[(blocks_m, triton.cdiv(N, cfg.block_n))](
                g2, p2, dpre, partial, M, N, g2.stride(0), p2.stride(0),
                APPROX_TANH=approximate == "tanh", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps,
            )
    x2 = x.reshape(M, K)
    dx = (dpre @ weight).view(*x.shape)
    return dx, dpre.t() @ x2, partial.sum(0).to(x.dtype)
