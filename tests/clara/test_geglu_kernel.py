"""clara.geglu_kernel: the closed-form backward, the Triton kernels (in Triton's CPU interpreter), and
the feed-forward with audio.geglu_kernel=triton against the PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clara import geglu_kernel
from clara.model import Clara
from clara.model_config import EXECUTION_KEYS, load_model_config
from clara.perceiver import GEGLUFeedForward

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_op_and_its_closed_form_backward_pass_gradcheck():
    """fp64 on the CPU: the op's registered backward (reference_backward's closed forms, the same
    formulas the backward kernel computes) against finite differences."""
    torch.manual_seed(0)
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((3, 4, 6), (3, 4, 6), (6,), (6,))]
    assert torch.autograd.gradcheck(geglu_kernel.geglu, inputs)


@pytest.mark.parametrize("compiled", [False, True])
def test_feedforward_with_the_kernel_setting_matches_pytorch_on_cpu(compiled):
    """Same parameters, same outputs and gradients (input, weights, both bias halves) as the PyTorch
    path: exactly in fp64 eager, to fp32 rounding compiled."""
    torch.manual_seed(0)
    dtype = torch.float32 if compiled else torch.float64
    plain = GEGLUFeedForward(16, 2).to(dtype)
    kernel = GEGLUFeedForward(16, 2, "triton").to(dtype)
    kernel.load_state_dict(plain.state_dict())
    run = torch.compile(kernel) if compiled else kernel
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    want, got = plain(x), run(x)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *plain.parameters()], grad)
    got_grads = torch.autograd.grad(got, [x, *kernel.parameters()], grad)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if compiled else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, want, **tolerance)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **tolerance)


INTERPRETED = """
import torch
from clara import geglu_kernel as gk

torch.manual_seed(0)
# No size a multiple of the 64 x 128 tiles, so the masked edges are exercised: several row and column
# tiles with partial last ones, and (fp16) a single partial tile in both directions.  Every dtype the
# kernels take (KERNEL_DTYPES), with fp32 biases, as under autocast.
CASES = ((torch.float32, (3, 50, 200)), (torch.bfloat16, (130, 257)), (torch.float16, (2, 5, 70)))
assert {dtype for dtype, _ in CASES} == set(gk.KERNEL_DTYPES)
for dtype, shape in CASES:
    a, g, dh = (torch.randn(shape, dtype=dtype) for _ in range(3))
    bias_a, bias_g = torch.randn(shape[-1]), torch.randn(shape[-1])
    blocks = {"BLOCK_M": gk.BLOCK_M, "BLOCK_F": gk.BLOCK_F, "num_warps": gk.NUM_WARPS}
    grid, args, out = gk.forward_launch(a, g, bias_a, bias_g)
    gk._forward_kernel[grid](*args, **blocks)  # as the op launches it on a GPU, less wrap_triton
    grid, args, (da, dg, partial) = gk.backward_launch(dh, a, g, bias_a, bias_g)
    gk._backward_kernel[grid](*args, **blocks)
    pairs = [(out, gk.reference(a, g, bias_a, bias_g))]
    pairs += zip(gk.sum_partials(da, dg, partial, bias_a, bias_g), gk.reference_backward(dh, a, g, bias_a, bias_g))
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
        error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        # fp32: erf implementations differ in the last bits; bf16, fp16: one or two roundings of the output.
        assert error < (1e-6 if got.dtype == torch.float32 else 1e-2), (dtype, shape, error)
print("ok")
"""


def test_the_triton_kernels_match_the_closed_forms_in_the_cpu_interpreter():
    """The forward and backward kernels themselves (with the op's own grids and arguments), run by
    Triton's interpreter on CPU tensors, give the reference formulas' values, bias-gradient
    partial sums included.  A subprocess: the interpreter is chosen when the kernels are made."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_cuda_path_gives_the_reference_shapes_and_dtypes_under_fake_tensors():
    """What torch.compile sees of the CUDA path (fake tensors, no GPU needed): bf16 activations in,
    bf16 out; the bias gradients in the biases' fp32."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(4, 64, 256, device="cuda", dtype=torch.bfloat16)
        bias = torch.empty(256, device="cuda")
        out = geglu_kernel.geglu(a, a, bias, bias)
        grads = geglu_kernel.geglu_backward(a, a, a, bias, bias)
    assert (out.shape, out.dtype, out.device.type) == ((4, 64, 256), torch.bfloat16, "cuda")
    assert [(t.shape, t.dtype) for t in grads] == [((4, 64, 256), torch.bfloat16)] * 2 + [((256,), torch.float32)] * 2


def test_torch_compile_sees_both_kernels_for_its_cache_key():
    """torch.compile keys its cache on the Triton source of a triton_op's kernels, found through
    ``wrap_triton(<module-level kernel>)`` in the op; a kernel it cannot find would be served stale
    from the cache after an edit."""
    pytest.importorskip("triton")
    from torch._library.triton import get_triton_kernels_for_op

    assert [k.fn.__name__ for k in get_triton_kernels_for_op("clara::geglu")] == ["_forward_kernel"]
    assert [k.fn.__name__ for k in get_triton_kernels_for_op("clara::geglu_backward")] == ["_backward_kernel"]


def test_only_cuda_tensors_of_the_kernels_dtypes_take_the_kernels():
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        takes = {dtype: geglu_kernel._uses_kernels(torch.empty(2, 8, device="cuda", dtype=dtype))
                 for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}  # fmt: skip
    assert takes == {torch.float32: True, torch.bfloat16: True, torch.float16: True, torch.float64: False}
    assert not geglu_kernel._uses_kernels(torch.empty(2, 8))


def test_the_setting_keeps_the_checkpoint_and_may_change_on_resume():
    plain = Clara(load_model_config("tiny"))
    kernel = Clara(load_model_config("tiny", ["audio.geglu_kernel=triton"]))
    assert kernel.state_dict().keys() == plain.state_dict().keys()
    assert {ff.kernel for ff in (kernel.audio.perceiver.cross_ff, *(b.ff for b in kernel.audio.perceiver.layers))} == {"triton"}
    assert "audio.geglu_kernel" in EXECUTION_KEYS
