"""CUDA checks (``pytest -m gpu``): fused kernels against the eager reference on the GPU."""

from __future__ import annotations

import pytest
import torch

from clara.attention import attention, flash_attn_available
from clara.model import Clara
from clara.model_config import load_model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_cudnn", "flash_attn"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_matches_eager_on_cuda(backend, dtype, tolerance, masked):
    if backend == "flash_attn" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    if backend == "flash_attn" and dtype == torch.float32:
        tolerance = 2e-2  # flash-attn computes fp32 inputs in bf16
    torch.manual_seed(0)
    q = torch.randn(4, 8, 64, 64, device="cuda", dtype=dtype)
    k = torch.randn(4, 8, 300, 64, device="cuda", dtype=dtype)
    v = torch.randn(4, 8, 300, 64, device="cuda", dtype=dtype)
    mask = (torch.arange(300, device="cuda")[None] < torch.tensor([300, 17, 150, 1], device="cuda")[:, None]) if masked else None
    reference = attention(q.float(), k.float(), v.float(), key_mask=mask, backend="eager")
    fused = attention(q, k, v, key_mask=mask, backend=backend).float()
    assert (fused - reference).abs().max().item() <= tolerance


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_cudnn", "flash_attn"])
def test_an_item_without_real_keys_gets_zeros_and_no_gradient_on_cuda(backend):
    """On the CPU every backend gives such an item zeros, as the eager reference does; the GPU kernels
    (memory-efficient, cuDNN, flash-attn varlen with an empty segment) are checked here, gradients too."""
    if backend == "flash_attn" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (8, 40, 40))
    mask = torch.arange(40, device="cuda")[None] < torch.tensor([40, 0, 9], device="cuda")[:, None]  # [B, Lk]
    out = attention(q, k, v, key_mask=mask, backend=backend)  # [B, H, Lq, D]
    reference = attention(*(t.detach().float().requires_grad_() for t in (q, k, v)), key_mask=mask, backend="eager")
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert (out.float() - reference).abs().max().item() <= 2e-2
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def _attention_ops(fn) -> list[str]:
    """The aten attention ops ``fn()`` dispatches to (which kernel PyTorch picked)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        fn()
    return [op for op in recorder.ops if "scaled_dot_product" in op]


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_never_runs_cudnn_attention_on_cuda(masked):
    q = torch.randn(4, 8, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = (torch.arange(64, device="cuda")[None] < torch.tensor([64, 17, 50, 1], device="cuda")[:, None]) if masked else None
    ops = _attention_ops(lambda: attention(q, q, q, key_mask=mask, backend="sdpa").sum().backward())
    assert ops and not any("cudnn" in op for op in ops), ops


def test_masked_batching_on_cuda_bf16():
    torch.manual_seed(0)
    model = Clara(load_model_config("small")).cuda().eval()
    frames = [141, 282, 60]
    mels = [torch.randn(80, n, device="cuda") for n in frames]
    batch = torch.zeros(3, 80, 282, device="cuda")
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        batched = model.encode_audio(batch, torch.tensor(frames, device="cuda")).float()
        for i, m in enumerate(mels):
            alone = model.encode_audio(m[None]).float()
            # bf16 kernels pick different tilings for different shapes: agreement to bf16 precision.
            assert (batched[i] - alone[0]).abs().max().item() <= 2e-2


def _gradients(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Input and parameter gradients of a fixed projection of ``model(x)`` under bf16 autocast."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


def _assert_close_relative(got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float) -> None:
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item() < tolerance


def test_split_qkv_and_pointwise_recompute_match_the_plain_block_on_cuda():
    """audio.latent_qkv=split (dense heads tensors, with either kernel family) and a block compiled
    with recompute="pointwise" give the plain eager block's gradients to within bf16 rounding."""
    import copy

    from clara.compilation import compile_model, set_recompute
    from clara.perceiver import LatentBlock

    config = load_model_config("small").audio
    torch.manual_seed(0)
    plain = LatentBlock(config, "sdpa").cuda()
    x = torch.randn(8, config.num_latents, config.latent_dim, device="cuda")
    want = _gradients(plain, x)
    for backend in ("sdpa", "sdpa_cudnn"):
        split = copy.deepcopy(plain)
        split.attn.split, split.attn.backend = True, backend
        _assert_close_relative(_gradients(split, x), want, 2e-2)
    try:
        torch._dynamo.reset()
        compiled = compile_model(copy.deepcopy(plain), "model", recompute="pointwise")
        _assert_close_relative(_gradients(compiled, x), want, 2e-2)
    finally:
        set_recompute("default")


def test_triton_geglu_kernel_matches_the_plain_block_on_cuda():
    """audio.geglu_kernel=triton (clara.geglu_kernel's kernels on CUDA), eager and compiled, gives
    the plain eager block's gradients to within bf16 rounding."""
    import copy

    from clara.compilation import compile_model
    from clara.perceiver import LatentBlock

    pytest.importorskip("triton")
    config = load_model_config("small").audio
    torch.manual_seed(0)
    plain = LatentBlock(config, "sdpa").cuda()
    x = torch.randn(8, config.num_latents, config.latent_dim, device="cuda")
    want = _gradients(plain, x)
    kernel = copy.deepcopy(plain)
    kernel.ff.kernel = "triton"
    _assert_close_relative(_gradients(kernel, x), want, 2e-2)
    torch._dynamo.reset()
    _assert_close_relative(_gradients(compile_model(copy.deepcopy(kernel), "model"), x), want, 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_geglu_op_matches_its_closed_forms_on_cuda_at_odd_sizes(dtype):
    """The kernels on the GPU at sizes that are no multiple of their 64 x 128 tiles, a non-contiguous
    output gradient, bias gradients included, against the PyTorch formulas."""
    from clara import geglu_kernel

    pytest.importorskip("triton")
    torch.manual_seed(0)
    a, g = (torch.randn(3, 67, 300, device="cuda", dtype=dtype) for _ in range(2))
    bias_a, bias_g = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    grad = torch.randn(3, 300, 67, device="cuda", dtype=dtype).transpose(1, 2)  # [3, 67, 300], strided
    pairs = [(geglu_kernel.geglu(a, g, bias_a, bias_g), geglu_kernel.reference(a, g, bias_a, bias_g))]
    pairs += zip(geglu_kernel.geglu_backward(grad, a, g, bias_a, bias_g),
                 geglu_kernel.reference_backward(grad, a, g, bias_a, bias_g))  # fmt: skip
    for got, want in pairs:
        assert got.dtype == want.dtype
        _assert_close_relative([got], [want], 1e-5 if dtype == torch.float32 else 1e-2)
