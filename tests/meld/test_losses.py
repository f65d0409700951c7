"""Class weights from training counts in our label order, weighted CE and focal loss, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clara.config import ConfigError
from meld.finetune import load_config
from meld.losses import FocalLoss, build_loss, class_weights


def test_inverse_frequency_weights_by_hand():
    # mean count 10/3: raw weights (10/3)/6, (10/3)/3, (10/3)/1; the mean weight per example is already 1.
    weights = class_weights([6, 3, 1], power=1.0)
    assert weights.tolist() == pytest.approx([5 / 9, 10 / 9, 10 / 3])
    assert float((weights * torch.tensor([6.0, 3.0, 1.0])).sum()) == pytest.approx(10.0)


def test_power_softens_and_zero_disables():
    assert class_weights([6, 3, 1], power=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    root = class_weights([4, 1], power=0.5)  # raw sqrt(2.5/4), sqrt(2.5/1), rescaled so 4 w0 + w1 = 5
    raw = [math.sqrt(2.5 / 4), math.sqrt(2.5)]
    scale = 5 / (4 * raw[0] + raw[1])
    assert root.tolist() == pytest.approx([raw[0] * scale, raw[1] * scale])


def test_weights_follow_the_given_label_order_and_absent_classes_get_zero():
    weights = class_weights([1, 0, 4], power=1.0)
    assert weights[1] == 0.0 and weights[0] > weights[2]
    with pytest.raises(ValueError):
        class_weights([0, 0])


def test_weighted_ce_matches_the_formula():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, 1])
    loss = build_loss("weighted_ce", [3, 1], power=1.0)
    weights = class_weights([3, 1], power=1.0)
    per_item = F.cross_entropy(logits, target, reduction="none")
    expected = (weights[target] * per_item).sum() / weights[target].sum()
    assert float(loss(logits, target)) == pytest.approx(float(expected))


def test_focal_loss_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p(class 0) = 0.75
    target = torch.tensor([0])
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(-math.log(0.75))
    assert float(FocalLoss(gamma=2.0)(logits, target)) == pytest.approx(-(0.25**2) * math.log(0.75))
    alpha = torch.tensor([0.5, 2.0])
    assert float(FocalLoss(gamma=2.0, alpha=alpha)(logits, target)) == pytest.approx(-0.5 * 0.25**2 * math.log(0.75))


def test_build_loss_kinds():
    assert isinstance(build_loss("ce", [1, 1]), torch.nn.CrossEntropyLoss)
    assert isinstance(build_loss("focal", [2, 1]), FocalLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge", [1, 1])


def test_label_smoothing_with_focal_loss_is_one_config_error():
    # FocalLoss takes hard targets: the smoothing is refused at load, not dropped while the run records it.
    with pytest.raises(ConfigError, match=r"overrides: loss\.label_smoothing is 0\.1, but loss\.name focal has no "
                                          r"label smoothing; set loss\.label_smoothing=0, or loss\.name ce or "
                                          r"weighted_ce$"):
        load_config(None, ["loss.name=focal", "loss.label_smoothing=0.1"])
    assert load_config(None, ["loss.name=focal", "loss.label_smoothing=0"]).loss.name == "focal"
    assert load_config(None, ["loss.name=weighted_ce", "loss.label_smoothing=0.1"]).loss.label_smoothing == 0.1
