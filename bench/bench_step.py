"""Benchmark "the medium step" (the workload the project measured knoriy/CLARA on) and print one table.

Workload: CLARA medium in train mode (50% audio-token keep active), mel [B, 80, 282] (3.0 s at
48 kHz) with padding masks on, tokens [B, 32], the symmetric contrastive loss, a fused AdamW step.
Synthetic inputs made on the device before timing, warm-up steps (their time, compilation included,
is the "warm-up s" column), then the mean over timed steps, synchronised.  FLOPs per sample are
counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eager training step.

Each variant is a ``-``-joined name: an attention backend (``eager``, ``sdpa``, ``sdpa_cudnn``,
``flash_attn``: ``clara.attention``; ``sdpa`` leaves cuDNN's kernels out, ``sdpa_cudnn`` lets PyTorch
pick them, as it does first on H100/H200), a precision (``fp32`` = full fp32 matmuls, ``tf32`` = matmul precision 'medium', ``bf16`` = bf16
autocast), then optional flags:

* ``compile``: ``torch.compile`` of the whole model; ``blocks``: of each repeated block
  (``clara.compilation``); ``cudagraphs``: the whole model with mode reduce-overhead (CUDA graphs);
  ``autotune``: the whole model with max-autotune-no-cudagraphs; ``maxautotune``: with max-autotune
  (autotuning and CUDA graphs); ``stepgraph``: the whole model compiled (default mode) and the whole
  training step (forward, loss, backward, a capturable fused AdamW) captured as one CUDA graph by
  hand, replayed with each batch copied into its static inputs (CUDA only, fixed lengths, training);
* ``cdt``: inductor's coordinate-descent tuning of its generated kernels' launch settings
  (``clara.compilation``'s ``tune``; with a compile flag);
* ``bf16res``: run the latents' residual stream in the autocast dtype (``audio.latent_stream``);
* ``ckpt``: activation checkpointing; ``sac``: selective recomputation (the latent
  blocks keep only matmul and attention outputs for backward, ``selective_recompute``);
  ``pointwise`` / ``aggressive``: the compiled backward recomputes elementwise results instead of
  keeping them (``clara.compilation``'s ``recompute``; with a compile flag);
* ``qkvsplit``: the latent blocks' Q, K, V as three products over the fused weight's thirds
  (``audio.latent_qkv=split``); ``tritongeglu``: the GEGLU's elementwise part and its backward by
  ``clara.geglu_kernel``'s Triton kernels (``audio.geglu_kernel=triton``);
* ``varlen``: MELD-like clip lengths (MELD's distribution, 1-12 s), padded to the batch's longest rounded up to 64 frames,
  masked; ``bucket``: the same lengths, batched by length (a pool of batches sorted, then cut);
* ``infer``: eval forward of both towers, no grad; ``bN``: batch N instead of ``--batch``.

Two utilisation columns.  "MFU" is TFLOP/s over the GPU's datasheet dense bf16 peak (989.4 TFLOP/s
on H100 SXM and H200; ``--peak-tflops`` for other GPUs; "n/a" on CPU), for every row.  "ceiling" is
TFLOP/s over the ceiling measured in the same run: a bf16 8192³ matmul on GPU (767-798 TFLOP/s on
the H100/H200 measured so far, so it reads about 1.25x the MFU), on CPU a 1024³ matmul in the row's
own precision.  Issue 9's targets (and the reference's ceiling of 3,840 samples/s on an H100) are
fractions of the measured ceiling.  The FLOPs are the model's: the recomputation of ``ckpt``,
``sac``, ``pointwise``/``aggressive`` and of fused attention backwards is not counted (208.4 GFLOP
per training sample of CLARA medium: 3 x its training forward's 69.49, less the input gradient of
conv1, which the mel does not need).
Variable-length rows count the FLOPs of the 3 s workload (the latent stack, most of the work, does
not depend on the clip length).  Their batches, padded, average more than its 282 frames, so their
TFLOP/s is a lower bound; at batch 64 the padded work is about 1.3% (``varlen``) and 0.2%
(``bucket``) above the 3 s count, and the clips' real lengths about 0.04%.  Their timed steps cover
every pre-made batch equally often.

``--prewarm N`` first compiles every compiled variant once in N parallel processes (``--compile-only``:
one untimed step per input shape), so the timed run, one variant at a time as always, finds inductor's
on-disk caches warm: compilation is mostly CPU work, and a lent GPU's time is short.  The "warm-up s"
column is then the warm-cache time.  A variant whose prewarm fails (out of memory next to the
others, say) just compiles cold in the timed run.

    python bench/bench_step.py                                   # CPU, small batch, a few variants
    python bench/bench_step.py --device cuda                     # the GPU table
    python bench/bench_step.py --device cuda --prewarm 4 --variants ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.arguments import at_least, device_arg, model_config, positive_float  # noqa: E402
from clara.attention import BACKENDS  # noqa: E402
from clara.compilation import compile_model  # noqa: E402
from clara.loss import ContrastiveLoss  # noqa: E402
from clara.masking import length_mask, round_up  # noqa: E402
from clara.model import Clara  # noqa: E402
from clara.model_config import load_model_config  # noqa: E402
from bench.workloads import meld_like_frames  # noqa: E402

DEFAULT_CPU_VARIANTS = "eager-fp32,sdpa-fp32,sdpa-bf16,sdpa-fp32-infer"
# The GPU ladder.  Rows measured before the kit's ``sdpa`` left cuDNN out ran PyTorch's own choice,
# so they continue as ``sdpa_cudnn`` rows; ``sdpa`` rows beside them show what the default costs.
DEFAULT_GPU_VARIANTS = (
    "eager-fp32,eager-bf16,sdpa_cudnn-bf16,sdpa-bf16,sdpa_cudnn-bf16-bf16res,sdpa_cudnn-bf16-compile,"
    "sdpa_cudnn-bf16-compile-bf16res,sdpa_cudnn-bf16-cudagraphs,sdpa_cudnn-bf16-cudagraphs-bf16res,"
    "sdpa-bf16-cudagraphs-bf16res,sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit,"
    "sdpa_cudnn-bf16-cudagraphs-bf16res-pointwise,sdpa_cudnn-bf16-cudagraphs-bf16res-sac-b256,"
    "sdpa_cudnn-bf16-compile-bf16res-b256,sdpa_cudnn-bf16-compile-bf16res-pointwise-b256,"
    "sdpa_cudnn-bf16-compile-bf16res-aggressive-b256,sdpa_cudnn-bf16-blocks-bf16res-varlen,"
    "sdpa_cudnn-bf16-blocks-bf16res-bucket,sdpa-bf16-blocks-bf16res-varlen,sdpa-bf16-blocks-bf16res-bucket,"
    "sdpa-bf16-cudagraphs-bf16res-bucket,"
    "sdpa_cudnn-bf16-cudagraphs-bf16res-infer,sdpa-bf16-cudagraphs-bf16res-infer,"
    "sdpa_cudnn-bf16-cudagraphs-bf16res-infer-b256,sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-cdt,"
    "sdpa_cudnn-bf16-stepgraph-bf16res-qkvsplit-cdt,sdpa_cudnn-bf16-cudagraphs-bf16res-infer-b512-cdt,"
    "sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-cdt-tritongeglu"
)
FRAMES, TEXT_LEN = 282, 32
PAD_MULTIPLE = 64  # frames; keeps the number of distinct shapes (recompiles, CUDA graphs) small
INPUT_SETS = 8  # distinct pre-made batches the timed steps cycle through

# Datasheet dense (not sparse) bf16 tensor-core peaks, TFLOP/s, by a substring of
# torch.cuda.get_device_name; the first match wins, so the PCIe name precedes the SXM one.  The NVL
# parts ("NVIDIA H100 NVL", "NVIDIA H200 NVL") run at lower power and peak than the SXM ones, yet
# "H200" would match the latter: they are left unknown (--peak-tflops) rather than given the SXM peak.
DENSE_BF16_PEAKS: tuple[tuple[str, float | None], ...] = (
    ("NVL", None), ("H100 PCIe", 756.0), ("H100 80GB HBM3", 989.4), ("H100 SXM", 989.4), ("H200", 989.4))
_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs

_SCOPES = {"compile": ("model", "default"), "blocks": ("blocks", "default"),
           "cudagraphs": ("model", "reduce-overhead"), "autotune": ("model", "max-autotune-no-cudagraphs"),
           "maxautotune": ("model", "max-autotune"), "stepgraph": ("model", "default")}  # fmt: skip
_RECOMPUTES = ("pointwise", "aggressive")
_FLAGS = set(_SCOPES) | set(_RECOMPUTES) | {"bf16res", "ckpt", "sac", "qkvsplit", "varlen", "bucket", "infer", "cdt", "tritongeglu"}


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str
    precision: str
    scope: str = "off"  # clara.compilation scope
    mode: str = "default"  # torch.compile mode
    lengths: str = "fixed"  # fixed, varlen or bucket
    infer: bool = False
    bf16res: bool = False
    ckpt: bool = False
    sac: bool = False
    batch: int | None = None
    recompute: str = "default"  # clara.compilation recompute level
    qkvsplit: bool = False
    cdt: bool = False  # inductor's coordinate-descent tuning
    stepgraph: bool = False  # the whole training step as one hand-captured CUDA graph
    tritongeglu: bool = False  # audio.geglu_kernel=triton

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = name.split("-")
        flags = set(parts[2:])
        sizes = {f for f in flags if f[:1] == "b" and f[1:].isdigit()}
        unknown = flags - _FLAGS - sizes
        compiled = [f for f in flags if f in _SCOPES]
        recompute = [f for f in flags if f in _RECOMPUTES]
        if (len(parts) < 2 or parts[0] not in BACKENDS or parts[1] not in ("fp32", "tf32", "bf16")
                or unknown or len(compiled) > 1 or len(sizes) > 1 or {"varlen", "bucket"} <= flags
                or len(recompute) > 1 or (recompute and not compiled)
                or ("bf16res" in flags and parts[1] != "bf16") or {"ckpt", "sac"} <= flags
                or ("cdt" in flags and not compiled)
                or ("stepgraph" in flags and flags & {"varlen", "bucket", "infer"})):
            # bf16res only changes anything under bf16 autocast, and ckpt re-runs whole blocks, which
            # leaves sac nothing to choose: such a name would claim a setting that did not apply.
            # A hand-captured step graph replays fixed shapes, and an inference forward is already one
            # graph under cudagraphs.
            raise SystemExit(f"variant {name!r}: expected ATTENTION-PRECISION[-FLAG...], flags from "
                             f"{', '.join(sorted(_FLAGS))}, bN (one compile flag, one of varlen/bucket, "
                             f"pointwise, aggressive or cdt only with a compile flag, bf16res only with bf16, "
                             f"not ckpt with sac, stepgraph only for fixed-length training)")
        scope, mode = _SCOPES[compiled[0]] if compiled else ("off", "default")
        lengths = "varlen" if "varlen" in flags else "bucket" if "bucket" in flags else "fixed"
        batch = int(next(iter(sizes))[1:]) if sizes else None
        return cls(name, parts[0], parts[1], scope, mode, lengths, "infer" in flags, "bf16res" in flags,
                   "ckpt" in flags, "sac" in flags, batch, recompute[0] if recompute else "default",
                   "qkvsplit" in flags, "cdt" in flags, "stepgraph" in flags, "tritongeglu" in flags)  # fmt: skip


def padded_frames(lengths: torch.Tensor) -> int:
    return round_up(int(lengths.max()), PAD_MULTIPLE)


def make_batches(batch: int, lengths_kind: str, device: torch.device, count: int = INPUT_SETS, seed: int = 0) -> list[list[torch.Tensor]]:
    """``count`` batches (mel, tokens, mel_lengths, token_lengths), made on ``device`` up front.

    ``varlen``: each batch draws its own lengths (padding to the longest); ``bucket``: the
    ``count x batch`` lengths are sorted and cut into batches, as a length-bucketing sampler does
    with a pool of batches.
    """
    g = torch.Generator().manual_seed(seed)
    if lengths_kind == "fixed":
        length_sets = [torch.full((batch,), FRAMES)] * count
    else:
        pool = meld_like_frames(count * batch, g)
        if lengths_kind == "bucket":
            pool = pool.sort().values
        length_sets = list(pool.view(count, batch))
    batches = []
    for lengths in length_sets:
        frames = FRAMES if lengths_kind == "fixed" else padded_frames(lengths)
        lengths = lengths.to(device)
        valid = length_mask(lengths, frames)[:, None, :]  # [B, 1, T]
        mel = torch.randn(batch, 80, frames, device=device) * valid  # zero padding, as LogMel pads
        tokens = torch.randint(1, 50257, (batch, TEXT_LEN), device=device)
        batches.append([mel, tokens, lengths, torch.full((batch,), TEXT_LEN, device=device)])
    return batches


def numeric_context(variant: Variant, device: torch.device):
    """The step's numeric context: bf16 autocast for bf16 variants."""
    if variant.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(variant: Variant, config_name: str, device: torch.device, backend: str = "inductor"):
    """The model and one step function (a training step, or an inference forward) for ``variant``."""
    torch.set_float32_matmul_precision("medium" if variant.precision == "tf32" else "highest")
    torch.manual_seed(0)
    overrides = [f"attention={variant.attention}", f"activation_checkpointing={str(variant.ckpt).lower()}",
                 f"selective_recompute={str(variant.sac).lower()}",
                 f"audio.latent_stream={'autocast' if variant.bf16res else 'fp32'}",
                 f"audio.latent_qkv={'split' if variant.qkvsplit else 'fused'}",
                 f"audio.geglu_kernel={'triton' if variant.tritongeglu else 'pytorch'}"]  # fmt: skip
    model = Clara(load_model_config(config_name, overrides)).to(device)
    model.train(not variant.infer)
    loss_fn = ContrastiveLoss()
    if variant.scope != "off":
        compile_model(model, variant.scope, variant.mode, dynamic=True if variant.lengths != "fixed" else None,
                      recompute=variant.recompute, tune=variant.cdt, backend=backend)  # fmt: skip
    if variant.stepgraph and device.type != "cuda":
        raise SystemExit(f"variant {variant.name!r}: stepgraph captures a CUDA graph and needs a CUDA device")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda",
                                  capturable=variant.stepgraph)  # fmt: skip

    def update(mel, tokens, mel_lengths, token_lengths):
        with numeric_context(variant, device):
            out = model(mel, tokens, mel_lengths, token_lengths)
            loss = loss_fn(out.audio_embeds, out.text_embeds, out.audio_scale, out.text_scale)
        loss.backward()
        optimizer.step()
        return loss

    def train_step(mel, tokens, mel_lengths, token_lengths):
        loss = update(mel, tokens, mel_lengths, token_lengths)
        optimizer.zero_grad(set_to_none=True)
        return loss

    def infer_step(mel, tokens, mel_lengths, token_lengths):
        with torch.no_grad(), numeric_context(variant, device):
            out = model(mel, tokens, mel_lengths, token_lengths)
            return out.audio_embeds, out.text_embeds

    if variant.stepgraph:
        return model, step_graph(train_step, update, optimizer)
    return model, (infer_step if variant.infer else train_step)


def step_graph(train_step, update, optimizer):
    """``train_step`` as one hand-captured CUDA graph: the first call warms up on a side stream
    (compiling the model, making the optimizer's state), then captures ``update`` (forward, loss,
    backward, optimizer step) over static copies of its inputs; every call copies its batch into
    them and replays.  Gradients are None when capture starts, so the captured backward writes
    them afresh on every replay instead of adding to the last step's."""
    graph, static, loss = None, [], None

    def step(*inputs):
        nonlocal graph, static, loss
        if graph is None:
            static = [t.clone() for t in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    train_step(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                loss = update(*static)
        for target, source in zip(static, inputs):
            target.copy_(source)
        graph.replay()
        return loss

    return step


def count_flops_per_sample(infer: bool, config_name: str, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # The workload's FLOPs do not depend on the kernels, so they are counted once on the eager math
    # (the counter does not see inside every fused kernel), uncompiled, and for inference on a plain
    # forward: the counter's module tracker needs autograd, and a forward costs the same without it.
    probe = Variant("probe", "eager", "fp32", infer=infer)
    model, step = build(probe, config_name, device)
    batch = 4
    inputs = make_batches(batch, "fixed", device, count=1)[0]
    with FlopCounterMode(display=False) as counter:
        if infer:
            model(*inputs)
        else:
            step(*inputs)
    return counter.get_total_flops() / batch


def matmul_ceiling(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """TFLOP/s of a large square matmul on random data: 8192³ on GPU, 1024³ on CPU, in ``dtype``."""
    n = 8192 if device.type == "cuda" else 1024
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


def dense_bf16_peak(device_name: str) -> float | None:
    """The datasheet dense bf16 peak (TFLOP/s) of a GPU named ``device_name``; None when not known."""
    return next((peak for key, peak in DENSE_BF16_PEAKS if key in device_name), None)


def ceilings(device: torch.device) -> dict[str, float]:
    """The MFU denominator per variant precision: the bf16 peak on GPU, each precision's own on CPU."""
    bf16 = matmul_ceiling(device, torch.bfloat16)
    fp32 = bf16 if device.type == "cuda" else matmul_ceiling(device, torch.float32)
    return {"fp32": fp32, "tf32": fp32, "bf16": bf16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


_FLOPS: dict[tuple[str, bool], float] = {}


# Kernel families of a GPU profile, by the first pattern that matches the kernel's name.
KERNEL_CATEGORIES = (
    # cuDNN's attention comes with helper kernels: dO·O row sums and dQ's conversion to 16 bits.
    ("attention", re.compile(r"sdpa|fmha|flash|attention|attn|dot_do_o|convert_dq", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|splitk", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
    ("fused (inductor)", re.compile(r"^triton_")),
    ("convolution", re.compile(r"conv(?!ert)|winograd|implicit", re.I)),
)


def kernel_category(name: str) -> str:
    return next((label for label, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def category_table(kernel_us: dict[str, float], steps: int, wall_ms: float | None = None) -> str:
    """Per-step GPU milliseconds by kernel family, from total microseconds per kernel name over
    ``steps`` steps; with ``wall_ms`` (the timed step), the share of the step no kernel ran in."""
    totals: dict[str, float] = {}
    for name, micros in kernel_us.items():
        totals[kernel_category(name)] = totals.get(kernel_category(name), 0.0) + micros / steps / 1e3
    busy = sum(totals.values())
    lines = [f"{label:<18} {ms:8.2f} ms/step" for label, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines.append(f"{'all kernels':<18} {busy:8.2f} ms/step")
    if wall_ms is not None:
        lines.append(f"{'timed step':<18} {wall_ms:8.2f} ms/step (GPU idle {max(0.0, wall_ms - busy):.2f} ms)")
    return "\n".join(lines)


def profile_table(step, batches, device: torch.device, rows: int, wall_ms: float | None = None) -> str:
    """The top CUDA kernels (or CPU ops) of a few more steps, by total time; on a GPU, also the
    per-step time of each kernel family (``category_table``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 4
    with profile(activities=activities) as prof:
        for inputs in batches[:steps]:
            step(*inputs)
        sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    if device.type != "cuda":
        return table
    kernel_us: dict[str, float] = {}
    for event in prof.events():
        # Annotations (optimizer steps, compiled graphs' calls) also show as GPU ranges: not kernels.
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation:
            kernel_us[event.name] = kernel_us.get(event.name, 0.0) + event.time_range.elapsed_us()
    if not kernel_us:
        return f"{table}\n(the profiler recorded no GPU kernels)"
    return f"{table}\n{category_table(kernel_us, steps, wall_ms)}"


def run_variant(variant: Variant, args, device: torch.device) -> dict:
    batch = variant.batch or args.batch
    row = {"name": variant.name, "batch": batch}
    if variant.attention == "flash_attn" and not (device.type == "cuda" and _has_flash()):
        return {**row, "note": "flash-attn not installed"}
    key = (args.config, variant.infer)
    if key not in _FLOPS:
        _FLOPS[key] = count_flops_per_sample(variant.infer, args.config, device)
    flops = _FLOPS[key]
    model, step = build(variant, args.config, device)
    batches = make_batches(batch, variant.lengths, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = timed_steps(variant, args.steps, len(batches))
    try:
        start = time.perf_counter()
        for inputs in priming_batches(variant, batches) + batches[: args.warmup]:
            step(*inputs)
        sync(device)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(steps):
            step(*batches[i % len(batches)])
        sync(device)
        elapsed = (time.perf_counter() - start) / steps
        profile = (profile_table(step, batches, device, args.profile_rows, elapsed * 1e3)
                   if variant.name in args.profile else None)
    except torch.OutOfMemoryError:
        return {**row, "note": f"out of memory at batch {batch}"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    samples = batch / elapsed
    del model
    return {**row, "samples_s": samples, "tflops": samples * flops / 1e12, "gflop_sample": flops / 1e9,
            "peak_gib": peak, "warmup_s": warmup, "profile": profile}  # fmt: skip


def distinct_shapes(variant: Variant, batches: list) -> list:
    """One batch of each input shape: what compilation needs to see."""
    return batches if variant.lengths != "fixed" else batches[:1]


def priming_batches(variant: Variant, batches: list) -> list:
    """The untimed steps before the warm-up ones: each shape once, or twice under CUDA graphs.

    PyTorch's CUDA-graph trees run a new shape's first call without a graph and record on the
    second; only the third replays.  With one shape the warm-up steps cover that, but a variable-
    length variant would otherwise record shapes it first meets late inside the timed steps.
    """
    shapes = distinct_shapes(variant, batches)
    graphs = variant.scope == "model" and variant.mode in _GRAPH_MODES
    return shapes * 2 if graphs and variant.lengths != "fixed" else shapes


def timed_steps(variant: Variant, steps: int, batch_count: int) -> int:
    """``steps``, rounded up to whole cycles of the pre-made batches when their lengths vary, so every
    batch weighs the same (bucketed batches are sorted by length: a partial cycle favours short ones)."""
    return steps if variant.lengths == "fixed" else -(-steps // batch_count) * batch_count


def compile_only(variant: Variant, args, device: torch.device) -> None:
    """Build ``variant`` and run one step per input shape, untimed: compiles it into inductor's on-disk caches."""
    _, step = build(variant, args.config, device)
    for inputs in distinct_shapes(variant, make_batches(variant.batch or args.batch, variant.lengths, device)):
        step(*inputs)
    sync(device)


def run_parallel(commands: list[list[str]], jobs: int) -> list[tuple[int, str]]:
    """Run ``commands``, at most ``jobs`` at a time; (index, last line of stderr) of each that failed."""
    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(run, commands))
    return [(i, (p.stderr.strip().splitlines() or ["(no message)"])[-1]) for i, p in enumerate(done) if p.returncode]


def prewarm(variants: list[Variant], args) -> None:
    """Compile the compiled variants in ``args.prewarm`` parallel processes (see the module docstring)."""
    compiled = [v for v in variants if v.scope != "off"]
    if not compiled:
        return
    commands = [[sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--config", args.config,
                 "--batch", str(args.batch), "--variants", v.name, "--compile-only"] for v in compiled]  # fmt: skip
    start = time.perf_counter()
    failed = run_parallel(commands, args.prewarm)
    print(f"prewarm: {len(compiled)} compiled variants in {min(args.prewarm, len(compiled))} processes, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    for index, message in failed:
        print(f"prewarm of {compiled[index].name} failed, it compiles in the timed run: {message[:200]}", flush=True)


def check_run(variants: list[Variant], profile: set[str], gpu: bool) -> None:
    """Refuse, before anything is timed, a run that would lose what was asked for: a ``--profile``
    name not among the variants (it was silently never profiled), or a ``stepgraph`` variant without
    CUDA (it stopped the run at that row, the rows before it and the table unprinted)."""
    names = {variant.name for variant in variants}
    if profile - names:
        raise SystemExit(f"--profile {','.join(sorted(profile - names))}: not among the variants run "
                         "(a profiled variant must also be in --variants)")
    if not gpu and any(variant.stepgraph for variant in variants):
        name = next(variant.name for variant in variants if variant.stepgraph)
        raise SystemExit(f"variant {name!r}: stepgraph captures a CUDA graph and needs a CUDA device")


def _has_flash() -> bool:
    from clara.attention import flash_attn_available

    return flash_attn_available()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=model_config, default="medium", help="model preset or YAML (default: medium)")
    parser.add_argument("--batch", type=at_least(1), default=None, help="default: 64 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=at_least(1), default=None, help="timed steps (default: 20 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--variants", default=None, help="comma-separated variant names")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile after timing")
    parser.add_argument("--profile-rows", type=at_least(1), default=25)
    parser.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    parser.add_argument("--prewarm", type=at_least(0), default=0, metavar="N",
                        help="compile the compiled variants in N parallel processes before timing any")
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="the GPU's dense bf16 peak for the MFU column (known: H100 SXM/PCIe, H200; not NVL parts)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile each variant (one untimed step per input shape) and exit: what --prewarm runs; "
                             "with --prewarm, just the parallel compiles")
    args = parser.parse_args(argv)
    device = device_arg(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (64 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 2)
    args.profile = set(filter(None, args.profile.split(",")))
    if not gpu:
        args.warmup = min(args.warmup, 1)
    variants = [Variant.parse(v) for v in (args.variants or (DEFAULT_GPU_VARIANTS if gpu else DEFAULT_CPU_VARIANTS)).split(",")]
    check_run(variants, args.profile, gpu)
    if args.prewarm > 0:
        prewarm(variants, args)
    if args.compile_only:
        if args.prewarm <= 0:  # with --prewarm, the parallel compiles were the whole job
            for variant in variants:
                compile_only(variant, args, device)
        return
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    ceiling = ceilings(device)
    peak = args.peak_tflops or (dense_bf16_peak(name) if gpu else None)
    shown = f"{ceiling['bf16']:.1f}" if gpu else f"bf16 {ceiling['bf16']:.2f}, fp32 {ceiling['fp32']:.2f}"
    print(f"device: {name} | torch {torch.__version__} | model {args.config} | batch {args.batch} unless named | "
          f"mel [B, 80, {FRAMES}], tokens [B, {TEXT_LEN}], masks on | MFU against the dense bf16 peak "
          f"{f'{peak:.1f} TFLOP/s' if peak else 'n/a (not known for this device: --peak-tflops)'} | "
          f"ceiling: a measured matmul, {shown} TFLOP/s", flush=True)
    header = (f"{'variant':<34} {'batch':>5} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'ceiling':>7} "
              f"{'GFLOP/sample':>12} {'peak GiB':>8} {'warm-up s':>9}")  # fmt: skip
    rows = []
    for variant in variants:
        try:
            row = run_variant(variant, args, device)
        except Exception as err:  # one broken variant (a compiler error, say) must not lose the others
            row = {"name": variant.name, "batch": variant.batch or args.batch,
                   "note": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        rows.append(row)
        print(format_row(row, ceiling, peak), flush=True)  # as it comes, in case a long run is cut short
        if args.json:
            with open(args.json, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**{k: v for k, v in row.items() if k != "profile"}, "device": name,
                                         "ceiling_tflops": ceiling[Variant.parse(row["name"]).precision],
                                         "peak_tflops": peak}) + "\n")  # fmt: skip
        if row.get("profile"):
            print(f"\nprofile of {row['name']}:\n{row['profile']}", flush=True)
        # The reset first: it drops the compiled graphs and with them their CUDA-graph memory pools,
        # which empty_cache can then hand back before the next variant.
        torch._dynamo.reset()
        if gpu:
            torch.cuda.empty_cache()
    print(f"\n{header}\n{'-' * len(header)}")
    for row in rows:
        print(format_row(row, ceiling, peak))
    print(f"device: {name}" + (f" | MFU against {peak:.1f} TFLOP/s dense bf16" if peak else ""), flush=True)
    if gpu and args.config == "medium":
        print(f"\nissue 9's targets (set for an H100; measured on {name}):")
        for line in target_lines(rows, ceiling, peak):
            print(f"  {line}", flush=True)


# Issue 9's targets for the medium step on an H100 (the issue's numbers; 32 GB is decimal gigabytes).
# Its "(>= 50% MFU)" beside 1,900 samples/s is against the reference's ceiling (3,840 samples/s, a
# measured bf16 matmul: the "ceiling" column), where 1,900 is 49.5%: the verdict is on samples/s, and
# both utilisations are shown.
TARGET_TRAIN_B64 = 1900.0  # samples/s at batch 64, masks on
TARGET_B256_BYTES = 32e9  # batch 256 trains within this, without activation checkpointing
TARGET_INFER = 6000.0  # samples/s, both towers, eval


def target_lines(rows: Sequence[dict], ceiling: dict[str, float], peak: float | None) -> list[str]:
    """Issue 9's targets against the best rows of this run that qualify (medium only; the caller
    checks): fixed 3 s lengths, and for memory no ``ckpt``/``sac``.  Rows that failed are skipped."""
    done = [(Variant.parse(row["name"]), row) for row in rows if "note" not in row]

    def best(pick, key):
        candidates = [row for variant, row in done if pick(variant, row)]
        return max(candidates, key=key) if candidates else None

    def verdict(met: bool) -> str:
        return "met" if met else "not met"

    lines = []
    train = best(lambda v, r: not v.infer and v.lengths == "fixed" and r["batch"] == 64, lambda r: r["samples_s"])
    if train is None:
        lines.append("training, batch 64: no row ran")
    else:
        share = train["tflops"] / ceiling[Variant.parse(train["name"]).precision]
        mfu = f"{train['tflops'] / peak:.1%}" if peak else "n/a"
        lines.append(f"training, batch 64: {train['samples_s']:,.1f} samples/s, {share:.1%} of the ceiling, MFU {mfu} "
                     f"({train['name']}) against >= {TARGET_TRAIN_B64:,.0f}: "
                     f"{verdict(train['samples_s'] >= TARGET_TRAIN_B64)}")
    big = best(lambda v, r: not v.infer and not (v.ckpt or v.sac) and r["batch"] == 256, lambda r: -r["peak_gib"])
    if big is None:
        lines.append("training, batch 256 without checkpointing: no row ran")
    else:
        used = big["peak_gib"] * 2**30
        lines.append(f"training, batch 256 without checkpointing: peak {big['peak_gib']:.2f} GiB ({used / 1e9:.1f} GB, "
                     f"{big['name']}) against <= {TARGET_B256_BYTES / 1e9:.0f} GB: {verdict(used <= TARGET_B256_BYTES)}")
    infer = best(lambda v, r: v.infer and v.lengths == "fixed", lambda r: r["samples_s"])
    if infer is None:
        lines.append("inference: no row ran")
    else:
        lines.append(f"inference: {infer['samples_s']:,.1f} samples/s ({infer['name']}) against "
                     f">= {TARGET_INFER:,.0f}: {verdict(infer['samples_s'] >= TARGET_INFER)}")
    return lines


def format_row(row: dict, ceiling: dict[str, float], peak: float | None) -> str:
    if "note" in row:
        return f"{row['name']:<34} {row['batch']:>5} {row['note']}"
    mfu = f"{row['tflops'] / peak:>6.1%}" if peak else f"{'n/a':>6}"
    return (f"{row['name']:<34} {row['batch']:>5} {row['samples_s']:>10.1f} {row['tflops']:>8.1f} {mfu} "
            f"{row['tflops'] / ceiling[Variant.parse(row['name']).precision]:>7.1%} {row['gflop_sample']:>12.4g} "
            f"{row['peak_gib']:>8.2f} {row['warmup_s']:>9.1f}")


if __name__ == "__main__":
    main()
