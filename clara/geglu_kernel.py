"""GEGLU's elementwise part as hand-written Triton kernels (``audio.geglu_kernel=triton``).

The feed-forward's first layer gives two bias-free products a = x·W_aᵀ and g = x·W_gᵀ, each [M, F]
(M rows: batch x latents).  ``geglu(a, g, b_a, b_g)`` returns h = (a + b_a) · GELU(g + b_g) (exact,
erf GELU), and its backward returns da = dh · GELU(g') and dg = dh · a' · GELU'(g') (a', g' with
their biases) with the bias gradients, the column sums of da and dg.

Why by hand: compiled by PyTorch, that backward is one reduction kernel that took 242 us per block
of CLARA medium at batch 64 on an H200 (2.7 ms of a 34.7 ms step), where moving its 670 MB takes
140 us at the datasheet bandwidth.  Here each program takes a tile of rows and columns, writes its
da and dg, and writes its column sums as one row of partial sums; a second, small sum adds the
partials (M / 64 rows of F).  Whether it beats the compiled kernel is not measured on a GPU yet.

Tensors not on a CUDA device (or in fp64, or where Triton is not installed) take the same formulas as
PyTorch ops, so a model configured with this kernel runs anywhere (a laptop loading a GPU run's
model).  Under ``torch.compile`` the kernels stay whole inside the compiled graph (``triton_op``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import wrap_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: every tensor then takes the PyTorch formulas
    triton = None

BLOCK_M, BLOCK_F = 64, 128  # rows x columns per program
# 8 warps (256 threads) for a tile of 8,192 elements: 32 values of each tensor per thread.  At
# Triton's default of 4, the backward would hold 64 each of dh, a and g per thread, near the register
# limit; inductor's own heuristic also gives 8 warps to pointwise tiles this size.  Not tuned on a GPU.
NUM_WARPS = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp64 and others take the PyTorch formulas


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (the kernels compute in fp32; fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def reference(a: Tensor, g: Tensor, bias_a: Tensor, bias_g: Tensor) -> Tensor:
    """h = (a + b_a) · GELU(g + b_g), computed in at least fp32 and returned in ``a``'s dtype."""
    return (_wide(a) + _wide(bias_a)).mul(F.gelu(_wide(g) + _wide(bias_g))).to(a.dtype)


def reference_backward(grad: Tensor, a: Tensor, g: Tensor, bias_a: Tensor, bias_g: Tensor) -> tuple[Tensor, ...]:
    """(da, dg, db_a, db_g) of ``reference`` for the output gradient ``grad``, by the closed forms."""
    a32, g32, dh = _wide(a) + _wide(bias_a), _wide(g) + _wide(bias_g), _wide(grad)
    cdf = 0.5 * (1.0 + torch.erf(g32 * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * g32 * g32) * (1.0 / math.sqrt(2.0 * math.pi))
    da, dg = dh * g32 * cdf, dh * a32 * (cdf + g32 * pdf)
    rows = tuple(range(da.dim() - 1))
    return (da.to(a.dtype), dg.to(g.dtype), da.sum(rows).to(bias_a.dtype), dg.sum(rows).to(bias_g.dtype))


if triton is not None:

    @triton.jit
    def _forward_kernel(a_ptr, g_ptr, ba_ptr, bg_ptr, out_ptr, rows, cols,
                        BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):  # fmt: skip
        r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]; int64: M·F may pass 2^31
        c = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        at = r[:, None] * cols + c[None, :]  # [BM, BF] offsets in the row-major [M, F] tensors
        a = tl.load(a_ptr + at, mask=mask, other=0.0).to(tl.float32) + tl.load(ba_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
        g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32) + tl.load(bg_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
        h = a * g * 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        tl.store(out_ptr + at, h.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(dh_ptr, a_ptr, g_ptr, ba_ptr, bg_ptr, da_ptr, dg_ptr, partial_ptr, rows, cols,
                         BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):  # fmt: skip
        r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        at = r[:, None] * cols + c[None, :]
        dh = tl.load(dh_ptr + at, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + at, mask=mask, other=0.0).to(tl.float32) + tl.load(ba_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
        g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32) + tl.load(bg_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
        # Masked lanes loaded dh = 0, so they add nothing to the column sums below.
        da = dh * g * cdf
        dg = dh * a * (cdf + g * pdf)
        tl.store(da_ptr + at, da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + at, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        # partial [row blocks, 2, F] fp32: this row block's column sums of da, then of dg.
        row_block = partial_ptr + tl.program_id(0) * 2 * cols
        tl.store(row_block + c, tl.sum(da, axis=0), mask=c < cols)
        tl.store(row_block + cols + c, tl.sum(dg, axis=0), mask=c < cols)


def _uses_kernels(a: Tensor) -> bool:
    """Whether ``a`` goes to the Triton kernels: a CUDA tensor of a dtype they are written for, with
    Triton installed (else the same formulas run as PyTorch ops)."""
    return triton is not None and a.is_cuda and a.dtype in KERNEL_DTYPES


def _grid(a: Tensor) -> tuple[int, int]:
    return triton.cdiv(a.numel() // a.shape[-1], BLOCK_M), triton.cdiv(a.shape[-1], BLOCK_F)


def forward_launch(a: Tensor, g: Tensor, bias_a: Tensor, bias_g: Tensor) -> tuple[tuple, tuple, Tensor]:
    """(grid, arguments, output) of the forward kernel for contiguous ``a``, ``g`` [..., F]."""
    out = torch.empty_like(a)
    return _grid(a), (a, g, bias_a, bias_g, out, a.numel() // a.shape[-1], a.shape[-1]), out


def backward_launch(grad: Tensor, a: Tensor, g: Tensor, bias_a: Tensor, bias_g: Tensor) -> tuple[tuple, tuple, tuple]:
    """(grid, arguments, (da, dg, partial)) of the backward kernel; partial [row blocks, 2, F] fp32."""
    grid = _grid(a)
    da, dg = torch.empty_like(a), torch.empty_like(g)
    partial = torch.empty(grid[0], 2, a.shape[-1], device=a.device, dtype=torch.float32)
    return grid, (grad, a, g, bias_a, bias_g, da, dg, partial, a.numel() // a.shape[-1], a.shape[-1]), (da, dg, partial)


def sum_partials(da: Tensor, dg: Tensor, partial: Tensor, bias_a: Tensor, bias_g: Tensor) -> tuple[Tensor, ...]:
    sums = partial.sum(0)  # [2, F]
    return da, dg, sums[0].to(bias_a.dtype), sums[1].to(bias_g.dtype)


@torch.library.triton_op("clara::geglu", mutates_args=())
def geglu(a: Tensor, g: Tensor, bias_a: Tensor, bias_g: Tensor) -> Tensor:
    """h = (a + b_a) · GELU(g + b_g) for a, g [..., F] and biases [F] (see the module docstring)."""
    if not _uses_kernels(a):
        return reference(a, g, bias_a, bias_g)
    grid, args, out = forward_launch(a.contiguous(), g.contiguous(), bias_a.contiguous(), bias_g.contiguous())
    # wrap_triton of the module-level kernel by name: how torch.compile finds the kernel's source
    # for its cache key (a kernel reached otherwise could be served stale after an edit).
    wrap_triton(_forward_kernel)[grid](*args, BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS)
    return out


@torch.library.triton_op("clara::geglu_backward", mutates_args=())
def geglu_backward(grad: Tensor, a: Tensor, g: Tensor, bias_a: Tensor, bias_g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not _uses_kernels(a):
        return reference_backward(grad, a, g, bias_a, bias_g)
    grid, args, (da, dg, partial) = backward_launch(grad.contiguous(), a.contiguous(), g.contiguous(),
                                                    bias_a.contiguous(), bias_g.contiguous())  # fmt: skip
    wrap_triton(_backward_kernel)[grid](*args, BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS)
    return sum_partials(da, dg, partial, bias_a, bias_g)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor):
    return geglu_backward(grad, *ctx.saved_tensors)


geglu.register_autograd(_backward, setup_context=_save_inputs)
