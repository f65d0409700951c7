"""Class weights from training counts in our label order, weighted CE and focal loss, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clara.config import ConfigError
from meld.finetune import load_config
from meld.losses import FocalLoss, WeightedCrossEntropy, build_loss, class_weights


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


def test_weighted_ce_is_the_weighted_sum_over_the_batch_size():
    logits = torch.tensor([[2.0, 0.0], [0.5, -1.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 0, 1, 1])  # halves of one class each: their sums of weights differ
    loss = build_loss("weighted_ce", [3, 1], power=1.0)
    weights = [2 / 3, 2.0]  # mean count 2 over each count; 3 * 2/3 + 1 * 2 = 4 examples: mean weight 1 already
    assert class_weights([3, 1], power=1.0).tolist() == pytest.approx(weights)
    nll = [-math.log(math.exp(row[y]) / sum(math.exp(v) for v in row)) for row, y in zip(logits.tolist(), target.tolist())]
    expected = sum(weights[y] * value for y, value in zip(target.tolist(), nll)) / 4
    assert float(loss(logits, target)) == pytest.approx(expected)
    # So the mean of two processes' half-batch losses (DDP) is the whole batch's loss; PyTorch's own
    # weighted mean, which divides by the batch's weights, is not.
    halves = (float(loss(logits[:2], target[:2])) + float(loss(logits[2:], target[2:]))) / 2
    assert halves == pytest.approx(expected)
    torch_mean = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))
    torch_halves = (float(torch_mean(logits[:2], target[:2])) + float(torch_mean(logits[2:], target[2:]))) / 2
    assert torch_halves != pytest.approx(float(torch_mean(logits, target)))


def test_weighted_ce_weighs_each_items_whole_smoothed_loss_by_its_class():
    # Naive reference, by hand: item i's target is (1 - eps) one-hot + eps / C, its loss l_i the cross-entropy
    # against it, and the batch loss sum_i w_{y_i} l_i / B.
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, -1.0, 0.3], [0.0, 1.0, 0.2], [1.0, 1.0, -2.0]])
    target = torch.tensor([0, 0, 1, 2])
    weights = [0.5, 1.0, 2.0]
    eps, classes = 0.2, 3
    expected = 0.0
    for row, y in zip(logits.tolist(), target.tolist()):
        log_p = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
        smoothed_target = [(1 - eps) * (c == y) + eps / classes for c in range(classes)]
        expected += weights[y] * -sum(q * lp for q, lp in zip(smoothed_target, log_p))
    loss = WeightedCrossEntropy(torch.tensor(weights), label_smoothing=eps)
    assert float(loss(logits, target)) == pytest.approx(expected / 4)
    # PyTorch's weight= weighs each class's share of the smoothed target instead: another objective.
    torch_way = F.cross_entropy(logits, target, weight=torch.tensor(weights), label_smoothing=eps, reduction="none")
    assert float(torch_way.mean()) != pytest.approx(expected / 4)


def test_weighted_ce_smoothing_keeps_the_smoothed_target_as_the_best_prediction():
    # On MELD's train counts with inverse-frequency weights, a neutral utterance's loss is least at
    # p = the smoothed target (1 - eps + eps / C on neutral), whatever its weight; with PyTorch's
    # weighted smoothing it was least at 55% neutral, the rest spread towards the rare classes.
    weights = class_weights([4710, 1743, 1205, 1109, 683, 271, 268], power=1.0)
    loss = WeightedCrossEntropy(weights, label_smoothing=0.1)
    logits = torch.zeros(1, 7, requires_grad=True)
    optimiser = torch.optim.SGD([logits], lr=1.0)
    for _ in range(500):
        optimiser.zero_grad()
        loss(logits, torch.tensor([0])).backward()
        optimiser.step()
    assert float(logits.detach().softmax(-1)[0, 0]) == pytest.approx(1 - 0.1 + 0.1 / 7, abs=1e-3)


def test_focal_loss_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p(class 0) = 0.75
    target = torch.tensor([0])
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(-math.log(0.75))
    assert float(FocalLoss(gamma=2.0)(logits, target)) == pytest.approx(-(0.25**2) * math.log(0.75))
    alpha = torch.tensor([0.5, 2.0])
    assert float(FocalLoss(gamma=2.0, alpha=alpha)(logits, target)) == pytest.approx(-0.5 * 0.25**2 * math.log(0.75))


def test_build_loss_kinds():
    assert isinstance(build_loss("ce", [1, 1]), torch.nn.CrossEntropyLoss)
    assert isinstance(build_loss("weighted_ce", [1, 1]), WeightedCrossEntropy)
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


def _naive_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: list[float]) -> torch.Tensor:
    """The textbook formula row by row, in float64 (where p_y = 1 - 1e-13 is still below 1)."""
    terms = []
    for row, y in zip(logits.double(), target.tolist()):
        p = row.exp()[y] / row.exp().sum()
        terms.append(-alpha[y] * (1 - p) ** gamma * torch.log(p))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_focal_loss_of_a_confident_example_has_the_reference_gradient_not_nan(gamma):
    # Row 0 is right by a margin of 30 logits: its p_y is exactly 1 in float32. With 0 < gamma < 1,
    # d(1 - p)^gamma/dp is infinite there, and multiplied by log p_y = 0 it gave a NaN gradient (a sweep
    # draws focal_gamma from 0.5 up), which the optimiser step then spread to every weight.
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.5, 1.0, -0.5], [0.2, -0.3, 0.1]])
    target = torch.tensor([0, 1, 2])
    alpha = [0.5, 1.0, 2.0]
    ours = logits.clone().requires_grad_(True)
    loss = FocalLoss(gamma=gamma, alpha=torch.tensor(alpha))(ours, target)
    loss.backward()
    reference = logits.double().requires_grad_(True)
    expected = _naive_focal(reference, target, gamma, alpha)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(ours.grad).all()
    assert torch.allclose(ours.grad.double(), reference.grad, atol=1e-6)
