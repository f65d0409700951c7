"""Length masks, padded widths and masked pooling for zero-padded batches."""

from __future__ import annotations

import torch


def round_up(length: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``length`` (a padded batch's width)."""
    return -(-length // multiple) * multiple


def length_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """lengths [B] -> bool [B, max_length], True where the position is real (index < length)."""
    positions = torch.arange(max_length, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Mean of x [B, L, C] over ``dim`` counting only positions where mask [B, L] is True."""
    if mask is None:
        return x.mean(dim)
    weights = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
    return (x * weights).sum(dim) / weights.sum(dim).clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Max of x [B, L, C] over ``dim`` among positions where mask [B, L] is True."""
    if mask is None:
        return x.amax(dim)
    return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(dim)
