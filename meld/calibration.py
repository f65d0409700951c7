"""Calibrating zero-shot scores for skewed classes, without looking at any label.

A zero-shot classifier has a bias of its own: some class names simply sit closer to most audio
embeddings. Both corrections here estimate the classifier's prior p̂ (the class distribution it
predicts on average) and divide it out of the probabilities, p'(c|x) ∝ p(c|x) / p̂(c), i.e. subtract
log p̂ from the logits:

* ``prior``: p̂ = the mean softmax over unlabelled audio (train clips; their labels are never read),
  which pushes the predicted class distribution towards uniform, the balance macro-F1 rewards;
* ``content_free``: p̂ = the softmax of inputs that carry no content (silence of a few lengths), as
  in "Calibrate before use" (Zhao et al., 2021): whatever the model predicts for them is bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CALIBRATIONS = ("none", "prior", "content_free")
_FLOOR = 1e-12  # keeps log p̂ finite where a class is never predicted


def mean_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, C] -> the mean softmax [C] (sums to 1)."""
    return logits.float().softmax(dim=-1).mean(dim=0)


def calibrate(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """logits [N, C], prior [C] -> logits [N, C] - log prior: softmax gives p(c|x) / prior(c), renormalised."""
    return logits.float() - prior.float().clamp_min(_FLOOR).log()


def silence(seconds: Sequence[float], sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Content-free audio: zero waveforms of the given lengths, ([K, max samples], lengths [K])."""
    lengths = torch.tensor([int(round(s * sample_rate)) for s in seconds], dtype=torch.long)
    return torch.zeros(len(seconds), int(lengths.max())), lengths
