"""Benchmark "the medium step" (shared/reference/performance.md) and print one table.

Workload: CLARA medium in train mode (50% audio-token keep active), mel [B, 80, 282] (3.0 s at
48 kHz), tokens [B, 32], the symmetric contrastive loss, an AdamW step.  Synthetic inputs, warm-up
steps, then the mean over timed steps, synchronised.  FLOPs per sample are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one training step (forward + backward).

Each variant is a ``-``-joined name: an attention backend (``eager``, ``sdpa``, ``flash_attn``), a
precision (``fp32`` = full fp32 matmuls, ``tf32`` = matmul precision 'medium', ``bf16`` = bf16
autocast), and optional flags: ``compile`` (torch.compile), ``autotune`` (compile with
max-autotune, no CUDA graphs), ``cudagraphs`` (compile with reduce-overhead), ``fa2`` (restrict
SDPA to its FlashAttention-2 kernel, or memory-efficient where a mask rules flash out, instead of
letting PyTorch pick cuDNN), ``ckpt`` (activation checkpointing), ``varlen`` (clip lengths drawn from
1-12 s, MELD-like, padded and masked), ``infer`` (eval forward of both towers, no grad).
MFU is TFLOP/s over the ceiling measured on this device (a large bf16 matmul on GPU, fp32 on CPU).

    python bench/bench_step.py                                   # CPU, small batch, a few variants
    python bench/bench_step.py --device cuda --batch 64          # the H100 table
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clara.loss import ContrastiveLoss  # noqa: E402
from clara.model import Clara  # noqa: E402
from clara.model_config import load_model_config  # noqa: E402

DEFAULT_CPU_VARIANTS = "eager-fp32,sdpa-fp32,sdpa-bf16,sdpa-fp32-infer"
DEFAULT_GPU_VARIANTS = (
    "eager-fp32,eager-tf32,eager-bf16,sdpa-fp32,sdpa-tf32,sdpa-bf16,flash_attn-bf16,"
    "sdpa-bf16-compile,sdpa-bf16-compile-varlen,sdpa-bf16-infer,sdpa-bf16-compile-infer"
)


_COMPILE_MODES = {"compile": "default", "autotune": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead"}


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str
    precision: str
    compile: str  # "" (eager), or a torch.compile mode
    varlen: bool
    infer: bool
    fa2: bool = False
    ckpt: bool = False

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = name.split("-")
        flags = set(parts[2:])
        unknown = flags - {"compile", "autotune", "cudagraphs", "varlen", "infer", "fa2", "ckpt"}
        if len(parts) < 2 or parts[0] not in ("eager", "sdpa", "flash_attn") or parts[1] not in ("fp32", "tf32", "bf16") or unknown:
            raise SystemExit(f"variant {name!r}: expected ATTENTION-PRECISION[-compile|-autotune|-cudagraphs][-varlen][-infer]")
        mode = next((m for flag, m in _COMPILE_MODES.items() if flag in flags), "")
        return cls(name, parts[0], parts[1], mode, "varlen" in flags, "infer" in flags, "fa2" in flags, "ckpt" in flags)


def make_batch(batch: int, frames: int, text_len: int, varlen: bool, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if varlen:
        # MELD-like clip lengths, 1-12 s at 48 kHz / hop 512 -> 94..1126 frames.
        lengths = torch.randint(94, 1126, (batch,), generator=g)
        frames = int(lengths.max())
    else:
        lengths = torch.full((batch,), frames)
    mel = torch.randn(batch, 80, frames, generator=g) * (torch.arange(frames)[None, None] < lengths[:, None, None])
    tokens = torch.randint(1, 50257, (batch, text_len), generator=g)
    token_lengths = torch.full((batch,), text_len)
    return [t.to(device) for t in (mel, tokens, lengths, token_lengths)]


def autocast_for(variant: Variant, device: torch.device):
    """The step's numeric context: bf16 autocast for bf16 variants, and the SDPA kernel choice."""
    stack = contextlib.ExitStack()
    if variant.precision == "bf16":
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if variant.fa2:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]))
    return stack


def build(variant: Variant, config_name: str, device: torch.device):
    torch.set_float32_matmul_precision("medium" if variant.precision == "tf32" else "highest")
    torch.manual_seed(0)
    overrides = [f"attention={variant.attention}", f"activation_checkpointing={str(variant.ckpt).lower()}"]
    model = Clara(load_model_config(config_name, overrides)).to(device)
    model.train(not variant.infer)
    loss_fn = ContrastiveLoss()
    # Compiling the model's forward (and so its backward); the optimizer step stays the fused kernel.
    runner = torch.compile(model, mode=variant.compile, dynamic=variant.varlen) if variant.compile else model
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)

    def train_step(mel, tokens, mel_lengths, token_lengths):
        with autocast_for(variant, device):
            out = runner(mel, tokens, mel_lengths, token_lengths)
            loss = loss_fn(out.audio_embeds, out.text_embeds, out.audio_scale, out.text_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def infer_step(mel, tokens, mel_lengths, token_lengths):
        with torch.no_grad(), autocast_for(variant, device):
            return runner(mel, tokens, mel_lengths, token_lengths).audio_embeds

    return model, (infer_step if variant.infer else train_step)


def count_flops_per_sample(variant: Variant, config_name: str, device: torch.device, frames: int, text_len: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # The workload's FLOPs do not depend on the kernel, so they are counted once on the eager math
    # (the counter does not see inside every fused kernel), uncompiled, and for inference on a plain
    # forward: the counter's module tracker needs autograd, and a forward costs the same without it.
    probe = Variant(variant.name, "eager", "fp32", "", False, False)
    model, step = build(probe, config_name, device)
    batch = 4
    inputs = make_batch(batch, frames, text_len, False, device)
    with FlopCounterMode(display=False) as counter:
        if variant.infer:
            model.eval()
            model(*inputs)
        else:
            step(*inputs)
    return counter.get_total_flops() / batch


def matmul_ceiling(device: torch.device) -> float:
    """TFLOP/s of a large square matmul: bf16 8192³ on GPU, fp32 1024³ on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


_FLOPS: dict[tuple[str, bool], float] = {}


def run_variant(variant: Variant, args, device: torch.device) -> dict:
    if variant.attention == "flash_attn" and not (device.type == "cuda" and _has_flash()):
        return {"name": variant.name, "note": "flash-attn not installed"}
    frames, text_len = 282, 32
    key = (args.config, variant.infer)
    if key not in _FLOPS:
        _FLOPS[key] = count_flops_per_sample(variant, args.config, device, frames, text_len)
    flops = _FLOPS[key]
    model, step = build(variant, args.config, device)
    inputs = make_batch(args.batch, frames, text_len, variant.varlen, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(args.warmup):
            step(*inputs)
        sync(device)
        start = time.perf_counter()
        for i in range(args.steps):
            if variant.varlen:
                inputs = make_batch(args.batch, frames, text_len, True, device, seed=i % 4)
            step(*inputs)
        sync(device)
    except torch.OutOfMemoryError:
        return {"name": variant.name, "note": f"out of memory at batch {args.batch}"}
    elapsed = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    samples = args.batch / elapsed
    del model
    return {"name": variant.name, "samples_s": samples, "tflops": samples * flops / 1e12, "gflop_sample": flops / 1e9, "peak_gib": peak}


def _has_flash() -> bool:
    from clara.attention import flash_attn_available

    return flash_attn_available()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="medium", help="model preset or YAML (default: medium)")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma-separated variant names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (64 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 2)
    if not gpu:
        args.warmup = min(args.warmup, 1)
    variants = [Variant.parse(v) for v in (args.variants or (DEFAULT_GPU_VARIANTS if gpu else DEFAULT_CPU_VARIANTS)).split(",")]
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    ceiling = matmul_ceiling(device)
    print(f"device: {name} | torch {torch.__version__} | model {args.config} | batch {args.batch} | "
          f"mel [B, 80, 282], tokens [B, 32] | matmul ceiling {ceiling:.1f} TFLOP/s", flush=True)
    header = f"{'variant':<28} {'samples/s':>10} {'TFLOP/s':>9} {'MFU':>6} {'GFLOP/sample':>13} {'peak GiB':>9}"
    print(header)
    print("-" * len(header), flush=True)
    for variant in variants:
        row = run_variant(variant, args, device)
        if "note" in row:
            print(f"{row['name']:<28} {row['note']}", flush=True)
            continue
        print(f"{row['name']:<28} {row['samples_s']:>10.1f} {row['tflops']:>9.2f} {row['tflops'] / ceiling:>6.1%} "
              f"{row['gflop_sample']:>13.1f} {row['peak_gib']:>9.2f}", flush=True)
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
