"""Numeric precision of a run: which autocast, if any, a device runs the model under.

On CUDA, ``"auto"`` means the GPU's fast type (bf16, or fp16 where bf16 is missing) and ``"fp32"``,
``"bf16"``, ``"fp16"`` are taken as given.  Anywhere else every run is fp32: a CPU gains little from
autocast, and a laptop run should give the reference numbers.  Norms, softmax and losses stay fp32
inside autocast, as PyTorch's autocast op lists say.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """What ``requested`` means on ``device``: one of fp32, bf16, fp16."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return "fp32"
    if requested == "auto":
        # Natively only (compute capability 8.0+): by default torch also counts a GPU that merely
        # emulates bf16 (Volta, Turing), where bf16 matmuls skip the tensor cores fp16 runs on.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return requested


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of a resolved ``precision`` on ``device`` (no context for fp32; bf16 on a
    CPU is honoured, which lets tests run the low-precision path without a GPU)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])
