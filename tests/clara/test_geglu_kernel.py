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
# Neither size a multiple of the 64 x 128 tiles: the masked edges are exercised.
for dtype, shape in ((torch.float32, (3, 50, 200)), (torch.bfloat16, (130, 257))):
    a, g, dh = (torch.randn(shape, dtype=dtype) for _ in range(3))
    bias_a, bias_g = torch.randn(shape[-1]), torch.randn(shape[-1])
    pairs = [(gk.launch_forward(a, g, bias_a, bias_g, wrap=False), gk.reference(a, g, bias_a, bias_g))]
    pairs += zip(gk.launch_backward(dh, a, g, bias_a, bias_g, wrap=False), gk.reference_backward(dh, a, g, bias_a, bias_g))
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
        error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        # fp32: erf implementations differ in the last bits; bf16: one or two roundings of the output.
        assert error < (1e-6 if got.dtype == torch.float32 else 1e-2), (dtype, shape, error)
print("ok")
"""


def test_the_triton_kernels_match_the_closed_forms_in_the_cpu_interpreter():
    """The forward and backward kernels themselves (launched plainly, as triton_op launches them on a
    GPU), run by Triton's interpreter on CPU tensors, give the reference formulas' values, bias-gradient
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


def test_the_setting_keeps_the_checkpoint_and_may_change_on_resume():
    plain = Clara(load_model_config("tiny"))
    kernel = Clara(load_model_config("tiny", ["audio.geglu_kernel=triton"]))
    assert kernel.state_dict().keys() == plain.state_dict().keys()
    assert {ff.kernel for ff in (kernel.audio.perceiver.cross_ff, *(b.ff for b in kernel.audio.perceiver.layers))} == {"triton"}
    assert "audio.geglu_kernel" in EXECUTION_KEYS
