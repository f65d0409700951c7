"""The one attention function of the kit, with selectable kernels.

``attention(q, k, v, key_mask=..., backend=...)`` computes softmax(q·kᵀ/√d)·v per head.  The
``eager`` backend is the plain reference math (it materialises the score matrix); ``sdpa`` calls
PyTorch's fused ``scaled_dot_product_attention`` with cuDNN's kernels taken out of those enabled
(flash, memory-efficient and math by default; a caller's ``sdpa_kernel`` choice is narrowed, never
widened); ``sdpa_cudnn`` calls it with PyTorch's own kernel choice, cuDNN's included; and
``flash_attn`` calls the flash-attn package, using its variable-length kernel when keys are padded.
The fast backends are tested against ``eager``.

Why ``sdpa`` leaves cuDNN out: on H100/H200 (sm90, cuDNN 9.15 or later) PyTorch 2.11 tries cuDNN's
attention first, and cuDNN builds an execution plan for every new combination of batch size and
sequence lengths (hundreds of milliseconds each for the forward and the backward, cached only for
that exact shape).  Real batches here change shape all the time (clip lengths, caption lengths, the
last batch), so every new shape would stall the step.  ``sdpa_cudnn`` is for fixed shapes, where the
plans are built once (the fixed-shape benchmark).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Backend = Literal["eager", "sdpa", "sdpa_cudnn", "flash_attn"]
BACKENDS: tuple[str, ...] = ("eager", "sdpa", "sdpa_cudnn", "flash_attn")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if key_mask is None:
        probs = scores.softmax(dim=-1)
    else:
        padded = ~key_mask[:, None, None, :]  # [B, 1, 1, Lk]
        # Zeroing the padded keys' probabilities again changes nothing where an item has a real key
        # (they are exactly 0 already), but gives an item without one zeros, as SDPA does (PyTorch's
        # CPU kernels, checked), instead of equal weights on its padding.
        probs = scores.masked_fill(padded, torch.finfo(scores.dtype).min).softmax(dim=-1).masked_fill(padded, 0.0)
    probs = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(probs, v)  # [B, H, Lq, D]


def _sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    # A boolean mask broadcast over heads and queries: [B, 1, 1, Lk], True = attend.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@torch.compiler.assume_constant_result
def _enabled_without_cudnn() -> tuple[SDPBackend, ...]:
    """The SDPA kernels enabled now (PyTorch's defaults, or what a caller's ``sdpa_kernel`` left on),
    less cuDNN's; the math kernel if that leaves none.  Under torch.compile it is read once, when
    the code is traced (dynamo cannot trace the flag reads themselves)."""
    flags = torch.backends.cuda
    enabled = ((SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
               (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
               (SDPBackend.MATH, flags.math_sdp_enabled()))  # fmt: skip
    return tuple(kernel for kernel, on in enabled if on) or (SDPBackend.MATH,)


def without_cudnn_attention():
    """A context in which PyTorch's ``scaled_dot_product_attention`` keeps the kernels it has enabled
    but cuDNN's (see the module docstring).  For code that calls SDPA itself on batches of changing
    shapes (a transformers text encoder); torch.compile traces it away, and in eager mode it costs
    about 13 us per use on CPU."""
    return sdpa_kernel(list(_enabled_without_cudnn()))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    with without_cudnn_attention():
        return _sdpa_cudnn(q, k, v, key_mask, dropout_p)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        # flash-attn has only half-precision kernels; fp32 inputs run in bf16 and come back as fp32.
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    # flash-attn wants [B, L, H, D].
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if key_mask is None:
        out = flash_attn_func(q, k, v, dropout_p=dropout_p)
    else:
        batch, lq, heads, dim = q.shape
        lengths = key_mask.sum(dim=1, dtype=torch.int32)  # [B]
        cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
        cu_q = torch.arange(0, (batch + 1) * lq, lq, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(
            q.reshape(batch * lq, heads, dim),
            k[key_mask],  # [total valid keys, H, D]
            v[key_mask],
            cu_q,
            cu_k,
            lq,
            int(lengths.max()),
            dropout_p=dropout_p,
        ).reshape(batch, lq, heads, dim)
    return out.transpose(1, 2).to(dtype)


_KERNELS = {"eager": _eager, "sdpa": _sdpa, "sdpa_cudnn": _sdpa_cudnn, "flash_attn": _flash}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    backend: Backend = "sdpa",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head softmax attention with scale ``d ** -0.5``.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; key_mask: [B, Lk] bool, True = a real key (None = all
    real).  Returns [B, H, Lq, D].  An item with no real key gets zeros and passes no gradient back
    (eager and SDPA on the CPU; not checked on a GPU).
    ``dropout_p`` drops attention probabilities (pass 0 outside training).
    ``flash_attn`` falls back to ``sdpa`` where flash-attn is missing or the tensors are on CPU.
    """
    if backend not in _KERNELS:
        raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if key_mask is not None and key_mask.dtype != torch.bool:
        # SDPA would take a float mask as a bias added to the scores (0 = attend), not as 1 = a real key.
        raise TypeError(f"key_mask must be bool (True = a real key), got {key_mask.dtype}")
    if backend == "flash_attn" and not (q.is_cuda and flash_attn_available()):
        backend = "sdpa"
    return _KERNELS[backend](q, k, v, key_mask, dropout_p)


def gelu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The seed article's variant: GELU instead of softmax on the attention scores.

    Computes ``out = (GELU(q·kᵀ · d**-0.5) ⊙ m) · v / n`` where ``m`` zeroes padded keys and ``n`` is
    each item's number of real keys, so the weights are not normalised to sum to one (they may be
    negative) and the 1/n keeps the output's scale independent of the clip length.
    q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; key_mask: [B, Lk] bool.  Returns [B, H, Lq, D].
    """
    scale = q.shape[-1] ** -0.5
    weights = F.gelu(torch.matmul(q, k.transpose(-1, -2)) * scale)  # [B, H, Lq, Lk]
    if key_mask is None:
        return torch.matmul(weights, v) / k.shape[-2]
    weights = weights * key_mask[:, None, None, :]
    count = key_mask.sum(dim=1).clamp(min=1).to(weights.dtype)[:, None, None, None]  # [B, 1, 1, 1]
    return torch.matmul(weights, v) / count
