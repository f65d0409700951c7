"""Command-line argument checks shared by the benchmarks: a wrong value is one error line, not a
traceback from deep inside torch or a table of nonsense."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from clara.config import ConfigError
from clara.model_config import load_model_config


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``.  A batch or step count of 0 was taken
    for "not given" (its default, silently), and a negative one timed nothing or divided by it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a peak of 0 was taken for "not given")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers of at least 1."""
    return [at_least(1)(part) for part in text.split(",")]


def model_config(name: str) -> str:
    """An argparse type: a model preset name or YAML path that loads.  A wrong one failed every row
    of bench_step's table (after timing the ceilings) and, elsewhere, with a traceback after minutes
    of set-up (bench_finetune_epoch writes its feature store first)."""
    try:
        load_model_config(name)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def device_arg(name: str) -> torch.device:
    """``--device`` as a device this machine has; otherwise one line saying so (torch fails only at
    the first CUDA call, with a traceback).  A CUDA device with an index becomes the current one:
    the benchmarks' CUDA calls that name no device (synchronize, memory statistics, the device's
    name, CUDA-graph streams) otherwise address device 0 while the model runs on ``cuda:N``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device name (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: this machine has no such CUDA device ({torch.cuda.device_count()} "
                         "found); the GPU benchmarks need one, --device cpu runs the CPU ones")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    return device
