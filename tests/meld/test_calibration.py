"""Label-free calibration on hand-computed cases."""

from __future__ import annotations

import math

import torch

from meld.calibration import calibrate, mean_probabilities, silence


def test_mean_probabilities_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax rows [0.5, 0.5] and [0.75, 0.25]
    torch.testing.assert_close(mean_probabilities(logits), torch.tensor([0.625, 0.375]))


def test_calibrate_divides_the_prior_out():
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]])  # p = [0.6, 0.4]
    prior = torch.tensor([0.8, 0.2])
    # p / prior = [0.75, 2.0] -> renormalised [3/11, 8/11]: the prediction flips to class 1.
    probs = calibrate(logits, prior).softmax(dim=-1)
    torch.testing.assert_close(probs, torch.tensor([[3 / 11, 8 / 11]]))


def test_uniform_prior_changes_nothing():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    torch.testing.assert_close(calibrate(logits, torch.full((3,), 1 / 3)).softmax(-1), logits.softmax(-1))


def test_prior_from_the_same_clips_undoes_a_constant_bias():
    # A classifier that adds +2 to class 0 for every clip predicts class 0 everywhere; clips 2 and 3
    # lean to class 1 underneath. The mean-softmax prior removes most of the bias, so they come back.
    underlying = torch.tensor([[1.0, 0.0], [0.8, 0.0], [0.0, 1.0], [0.0, 0.9]])
    biased = underlying + torch.tensor([2.0, 0.0])
    assert biased.argmax(dim=1).tolist() == [0, 0, 0, 0]
    prior = mean_probabilities(biased)
    assert prior[0] > 0.8
    assert calibrate(biased, prior).argmax(dim=1).tolist() == [0, 0, 1, 1]


def test_a_class_never_predicted_stays_finite():
    out = calibrate(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(out).all() and out.argmax().item() == 1


def test_silence():
    wave, lengths = silence((0.5, 1.0), 48_000)
    assert wave.shape == (2, 48_000) and lengths.tolist() == [24_000, 48_000]
    assert not wave.any()
