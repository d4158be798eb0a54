"""Inputs for the relative-position bias of the attention op, shared by its backend tests.

``positions`` gives each packed token's column in its original padded row. Real batches have
holes there (a mask with zeros inside a row), so the helpers leave some: the distance the bias
looks up is between columns, not between ranks in the packed sequence.
"""

from __future__ import annotations

import torch


def columns_with_holes(lengths, holes: int = 3, device="cpu") -> torch.Tensor:
    """int32 ``[sum(lengths)]``: for each sequence, ``length`` sorted distinct columns out of
    ``length + holes`` (so up to ``holes`` columns are skipped, anywhere in the row)."""
    rows = [torch.randperm(n + holes)[:n].sort().values for n in lengths]
    return torch.cat([torch.zeros(0, dtype=torch.long), *rows]).to(torch.int32).to(device)


def table(heads: int, width: int, device="cpu") -> torch.Tensor:
    """A random float32 ``[heads, width]`` bias table, spread like a trained T5/MPNet one."""
    return (torch.randn(heads, width) * 2).to(device)


def bad_arguments(q: torch.Tensor) -> list[tuple[dict, type, str]]:
    """(rel_bias and positions, the exception, a pattern of its message) for malformed input
    to an attention over ``q`` ([T, N, D]): every backend must refuse each one, naming it."""
    T, N = q.shape[:2]
    good_table = table(N, 9, q.device)
    good_positions = torch.arange(T, dtype=torch.int32, device=q.device)
    return [
        (dict(rel_bias=good_table, positions=None), ValueError, "positions"),
        (dict(rel_bias=good_table, positions=good_positions.long()), TypeError, "positions"),
        (dict(rel_bias=good_table, positions=good_positions[:-1]), ValueError, "positions"),
        (dict(rel_bias=good_table, positions=good_positions[:, None]), ValueError, "positions"),
        (dict(rel_bias=good_table, positions=good_positions.to("meta")), ValueError, "positions"),
        (dict(rel_bias=good_table.to("meta"), positions=good_positions), ValueError, "rel_bias"),
        (dict(rel_bias=good_table[:, :8], positions=good_positions), ValueError, "rel_bias"),
        (dict(rel_bias=good_table[:1], positions=good_positions), ValueError, "rel_bias"),
        (dict(rel_bias=good_table[0], positions=good_positions), ValueError, "rel_bias"),
        (dict(rel_bias=good_table.half(), positions=good_positions), TypeError, "rel_bias"),
    ]
