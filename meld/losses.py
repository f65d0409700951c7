"""Classification losses for MELD's skewed classes: plain, class-weighted and focal cross-entropy.

Class weights always come from the training counts in ``meld.labels`` order (MELD's README lists its
weights in another order than its own index map, issue #51, so they are never copied from there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def class_weights(counts: Sequence[int], power: float = 1.0) -> torch.Tensor:
    """[C] weights ``(mean count / count_c) ** power``, rescaled so the training set's mean weight is 1.

    ``power`` 1 is inverse frequency, 0.5 its square root (milder), 0 no weighting. A class absent
    from training gets weight 0: there is nothing of it to weigh, and an infinite weight would be NaN.
    """
    counts_t = torch.as_tensor(counts, dtype=torch.float64)
    if counts_t.ndim != 1 or (counts_t < 0).any() or counts_t.sum() <= 0:
        raise ValueError(f"class counts must be non-negative with a positive total, got {list(counts)}")
    present = counts_t > 0
    raw = torch.zeros_like(counts_t)
    raw[present] = (counts_t[present].mean() / counts_t[present]) ** power
    # Mean weight per training example = 1, so the loss keeps the scale (and LR) of plain CE.
    raw *= counts_t.sum() / (raw * counts_t).sum()
    return raw.float()


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with per-class ``weight`` [C], averaged over the batch: ``sum_i w_{y_i} l_i / B``,
    where ``l_i`` is item i's (label-smoothed) cross-entropy.

    PyTorch's weighted mean divides by the batch's sum of weights instead, which undoes the weighting
    inside a batch (a batch of one class has the plain CE's loss, whatever its weight) and makes the
    mean of two processes' half-batch losses differ from the whole batch's, so DDP would train another
    objective than one process.  With ``class_weights``' mean weight of 1 the scale is plain CE's.

    The weight multiplies each item's whole loss, smoothing included, as the balanced sampler does in
    expectation. PyTorch's ``weight`` with ``label_smoothing`` weighs each class's share of the smoothed
    target instead (pytorch/pytorch#104776): the smoothing of a neutral utterance then leans on the rare
    classes' large weights, and its best prediction under inverse-frequency weights on MELD and smoothing
    0.1 put 55% on neutral, not 91%.
    """

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight.float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, C], target [B] class indices -> scalar."""
        per_item = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing,
                                   reduction="none")  # [B], unweighted
        return (self.weight[target] * per_item).mean()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y) ** gamma log p_y``, mean over the batch.

    ``gamma`` 0 with no ``alpha`` is cross-entropy; ``alpha`` [C] are per-class weights.
    """

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha if alpha is None else alpha.float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, C], target [B] class indices -> scalar."""
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)  # [B]
        # 1 - p_y [B], from expm1 so it is not rounded to 0 while log p_y is not, and kept above 0:
        # once p_y is 1 in float32 (a margin of ~17 logits), d(1 - p)^gamma/dp is infinite for
        # 0 < gamma < 1, and infinity times log p_y = 0 made a NaN gradient that poisoned every weight.
        miss = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
        loss = -(miss**self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


def build_loss(name: str, train_counts: Sequence[int], *, power: float = 1.0, gamma: float = 2.0,
               focal_weighted: bool = True, label_smoothing: float = 0.0) -> nn.Module:
    """``ce``, ``weighted_ce`` (weights from ``train_counts``) or ``focal`` as a module (logits, target) -> loss."""
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    weights = class_weights(train_counts, power)
    if name == "weighted_ce":
        return WeightedCrossEntropy(weights, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma, weights if focal_weighted else None)
    raise ValueError(f"unknown loss {name!r}; expected ce, weighted_ce or focal")
