"""Selective recomputation: keep what the matmuls and attention produce, recompute the cheap rest.

``keep_matmul_outputs(fn, *args)`` runs ``fn`` so that autograd keeps, for the backward pass, only
the outputs of matrix products and attention kernels (and ``fn``'s inputs); norms, activations,
casts and residual adds are recomputed from them in the backward pass.  That is memory-bound
elementwise work which, under ``torch.compile``, is fused into the backward kernels that read those
tensors anyway, so it costs little time; what it saves is every normalised copy and every
activation output (in a GEGLU block: the a·GELU(g) product, half the width of the first linear's
output).  Full activation checkpointing (``activation_checkpointing``) recomputes the matmuls too.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_KEPT_NAMES = (
    "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
)  # fmt: skip
KEPT_OPS = frozenset(getattr(_aten, name).default for name in _KEPT_NAMES if hasattr(_aten, name))


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def keep_matmul_outputs(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, keeping only matmul / attention outputs (and the inputs) for backward."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, _policy))
