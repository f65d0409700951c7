"""Synthetic workloads shared by the benchmarks."""

from __future__ import annotations

import math

import torch

FRAMES_PER_SECOND = 48_000 / 512  # CLARA's front-end: 48 kHz, hop 512
# MELD train clip durations (from the CSV timestamps, 9,989 rows): median 2.46 s, 5th percentile
# 0.67 s, 95th 7.9 s; log-durations have mean 0.91 and standard deviation 0.71.
LOG_SECONDS_MEAN, LOG_SECONDS_STD = 0.91, 0.71
SECONDS_RANGE = (1.0, 12.0)


def meld_like_frames(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` log-mel frame counts [count] drawn like MELD's clip lengths, clipped to 1-12 s."""
    seconds = torch.exp(LOG_SECONDS_MEAN + LOG_SECONDS_STD * torch.randn(count, generator=generator))
    seconds = seconds.clamp(*SECONDS_RANGE)
    return 1 + (seconds * FRAMES_PER_SECOND).floor().long()


def frames_range() -> tuple[int, int]:
    low, high = SECONDS_RANGE
    return 1 + math.floor(low * FRAMES_PER_SECOND), 1 + math.floor(high * FRAMES_PER_SECOND)
