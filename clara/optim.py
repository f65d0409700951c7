"""AdamW with decay / no-decay groups, and the reference's warmup + cosine-with-restarts schedule.

A parameter group may carry an ``lr_scale`` (1 when absent): its rate is that multiple of the
schedule's at every step (layer-wise learning-rate decay, a slower pretrained backbone, ...).

The schedule is the one the reference trained with: every cycle of ``cycle_steps`` optimiser steps
starts with a linear warmup from ``min_lr`` to ``lr`` over ``warmup_steps``, then follows a half
cosine back down to ``min_lr`` over the rest of the cycle, and the next cycle starts again.  The
reference recipe is lr 1e-4, min_lr 1e-6, warmup 1000, cycles of 5000 steps (1000 warmup + 4000
cosine).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def param_groups(model: nn.Module, weight_decay: float, *, decay_1d: bool = False) -> list[dict]:
    """Split trainable parameters into a decayed group and a no-decay group.

    Tensors with fewer than two dimensions (biases, LayerNorm gains, the temperature scalars) are
    not decayed: shrinking them towards zero changes what the layer computes rather than limiting
    its capacity.  ``decay_1d=True`` decays everything, as the reference did.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if decay_1d or parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw(groups: list[dict], lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the given parameter groups (``params``, ``weight_decay``, optional ``lr_scale``),
    with the fused kernel where this PyTorch build has one."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        # Fused AdamW needs every parameter on a supported device type with a float dtype.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, cycle_steps: int) -> float:
    """The learning rate for optimiser step ``step`` (0-based) of the warmup + cosine-restarts schedule."""
    position = step % cycle_steps
    if position < warmup_steps:
        return min_lr + (lr - min_lr) * position / warmup_steps
    progress = (position - warmup_steps) / max(1, cycle_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineRestarts(LRScheduler):
    """``lr_at`` as a PyTorch scheduler; call ``step()`` once after every optimiser step.

    Every parameter group gets that rate times its ``lr_scale`` (1 when absent).  The state
    (``last_epoch`` counts optimiser steps) round-trips through ``state_dict`` for exact resume.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr: float,
        min_lr: float,
        warmup_steps: int,
        cycle_steps: int,
    ) -> None:
        if cycle_steps < 1:
            raise ValueError(f"cycle_steps must be at least 1, got {cycle_steps}")
        if not 0 <= warmup_steps < cycle_steps:
            raise ValueError(f"warmup_steps must be in [0, cycle_steps={cycle_steps}), got {warmup_steps}")
        self.peak_lr = lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.cycle_steps = cycle_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        rate = lr_at(
            self.last_epoch,
            lr=self.peak_lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            cycle_steps=self.cycle_steps,
        )
        return [rate * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]
