"""Layer-wise learning-rate decay for fine-tuning: lower layers move less than the head.

A parameter at depth d of a tower whose top is T trains at ``lr * decay ** (T - d)``; the head at
``lr``. The engine's optimiser gives every parameter one rate, so ``install`` swaps in AdamW over
these groups and a copy of the engine's warmup + cosine schedule that multiplies each group's rate
by its ``lr_scale``. Both live on the Trainer, so checkpoints and exact resume cover them as before.
"""

from __future__ import annotations

import torch

from clara.engine import Trainer
from clara.optim import WarmupCosineRestarts
from meld.classifier import MeldClassifier, parameter_depth


class ScaledWarmupCosine(WarmupCosineRestarts):
    """The engine's schedule, times each parameter group's ``lr_scale``."""

    def get_lr(self) -> list[float]:
        return [rate * group.get("lr_scale", 1.0) for rate, group in zip(super().get_lr(), self.optimizer.param_groups)]


def decayed_groups(classifier: MeldClassifier, decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters, one per (lr scale, decayed or not), head first.

    As in ``clara.optim.param_groups``, tensors of fewer than 2 dimensions get no weight decay.
    """
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in classifier.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = parameter_depth(name, classifier)
        scale = 1.0 if depth is None else decay ** (depth[2] - depth[1] + 1)
        groups.setdefault((scale, parameter.ndim >= 2), []).append(parameter)
    ordered = sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))
    return [{"params": params, "lr_scale": scale, "weight_decay": weight_decay if decayed else 0.0}
            for (scale, decayed), params in ordered]


def install(trainer: Trainer, groups: list[dict]) -> None:
    """Replace the trainer's optimiser and schedule by layer-decayed ones (before ``fit``)."""
    config = trainer.config
    trainer.optimizer = torch.optim.AdamW(groups, lr=config.lr)
    trainer.scheduler = ScaledWarmupCosine(
        trainer.optimizer, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
        cycle_steps=config.cycle_steps or trainer.total_steps,
    )  # fmt: skip
