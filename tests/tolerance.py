"""The accuracy rule every op test uses (DESIGN: Tests).

An implementation passes when its error against a float64 reference is at most twice the error
of plain PyTorch computing the same thing in the same dtype, plus a small absolute floor:

    max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + floor(dtype)
"""

from __future__ import annotations

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(ours: torch.Tensor, ref64: torch.Tensor, peer: torch.Tensor, floor: float | None = None) -> None:
    """Assert ``ours`` is within the rule; ``peer`` is PyTorch's result in ``ours``' dtype."""
    assert ours.shape == ref64.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), "output holds NaN or Inf (unwritten or overflowed elements)"
    floor = FLOOR[ours.dtype] if floor is None else floor
    err, peer_err = max_error(ours, ref64), max_error(peer, ref64)
    bound = 2 * peer_err + floor
    assert err <= bound, f"max error {err:.3e} > 2 x torch's {peer_err:.3e} + floor {floor:.0e} = {bound:.3e}"
