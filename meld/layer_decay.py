"""Layer-wise learning-rate decay for fine-tuning: lower layers move less than the head.

A parameter at depth d of a tower whose top is T trains at ``lr * decay ** (T - d + 1)``; the head at
``lr``. ``decayed_groups`` gives the engine's optimiser one parameter group per rate, each with its
``lr_scale`` (``clara.engine.Trainer(groups=...)``), which the engine's schedule multiplies in.
"""

from __future__ import annotations

import torch

from meld.classifier import MeldClassifier, parameter_depth


def decayed_groups(classifier: MeldClassifier, decay: float, weight_decay: float, *, decay_1d: bool = False) -> list[dict]:
    """AdamW groups of the trainable parameters, one per (lr scale, decayed or not), head first.

    As in ``clara.optim.param_groups`` (and with its ``decay_1d``, the engine's ``train.decay_1d``),
    tensors of fewer than 2 dimensions get no weight decay unless ``decay_1d``.
    """
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in classifier.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = parameter_depth(name, classifier)
        scale = 1.0 if depth is None else decay ** (depth[2] - depth[1] + 1)
        groups.setdefault((scale, decay_1d or parameter.ndim >= 2), []).append(parameter)
    ordered = sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))
    return [{"params": params, "lr_scale": scale, "weight_decay": weight_decay if decayed else 0.0}
            for (scale, decayed), params in ordered]
