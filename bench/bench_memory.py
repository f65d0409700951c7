"""Activation memory of "the medium step", measured on any device (a CPU included), and the peak it predicts.

For each variant (``bench_step.py``'s names), one training forward (train mode, the step's inputs,
bf16 autocast for bf16 variants) runs under ``torch.autograd.graph.saved_tensors_hooks``; the hook
adds up every distinct storage autograd keeps for the backward pass, parameters excluded.  Two
batch sizes give the per-sample cost (their difference) and the fixed cost (the rest: the bf16
copies of the weights that autocast keeps).  Compiled variants are compiled with the backend
``aot_eager_decomp_partition``: the decompositions and the partitioner (what the backward keeps and
what it recomputes) of inductor, without generating kernels, so a CPU answers for the GPU.  What
the hooks cannot see: activation checkpointing's recomputed regions (``ckpt``, and ``sac`` when not
compiled), which keep their tensors outside autograd's saved-tensor path.

The predicted peak for a batch is ``16 B x parameters`` (fp32 weights, gradients and AdamW's two
moments) + fixed + batch x per-sample.  Against the H200's measured peaks of ``bench_step.py``
(``torch.cuda.max_memory_allocated``) it came within 1% (bench/NOTES.md).

    python bench/bench_memory.py                         # CLARA medium, the default variants, ~2 min on 2 cores
    python bench/bench_memory.py --variants sdpa-bf16-compile-bf16res-pointwise --top 10
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.arguments import at_least, batch_sizes, model_config  # noqa: E402
from bench.bench_step import Variant, build, make_batches  # noqa: E402
from clara.compilation import set_recompute  # noqa: E402
from clara.loss import ContrastiveLoss  # noqa: E402

DEFAULT_VARIANTS = (
    "sdpa-bf16,sdpa-bf16-compile,sdpa-bf16-compile-bf16res,sdpa-bf16-compile-bf16res-sac,"
    "sdpa-bf16-compile-bf16res-pointwise,sdpa-bf16-compile-bf16res-aggressive"
)
PARTITION_BACKEND = "aot_eager_decomp_partition"
MiB = 2**20


def kept_for_backward(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Counter]:
    """Bytes of the distinct storages autograd keeps for backward while ``run()`` runs (storages of
    ``exclude``, the parameters, left out), and the same bytes by (dtype, shape) of the tensor that
    first kept each storage."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}
    by_shape: Counter = Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded and key not in kept:
            kept[key] = storage.nbytes()
            by_shape[(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values()), by_shape


def saved_bytes(variant: Variant, config: str, batch: int) -> tuple[int, Counter, int]:
    """``kept_for_backward`` of one training forward (and loss) of ``variant`` on ``batch`` samples,
    and the model's parameter count."""
    torch._dynamo.reset()
    model, _ = build(variant, config, torch.device("cpu"), backend=PARTITION_BACKEND)
    mel, tokens, mel_lengths, token_lengths = make_batches(batch, "fixed", torch.device("cpu"), count=1)[0]

    def forward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.precision == "bf16"):
            out = model(mel, tokens, mel_lengths, token_lengths)
            ContrastiveLoss()(out.audio_embeds, out.text_embeds, out.audio_scale, out.text_scale)

    total, by_shape = kept_for_backward(forward, model.parameters())
    return total, by_shape, sum(p.numel() for p in model.parameters())


def measure(variant: Variant, config: str, batch: int) -> dict:
    started = time.perf_counter()
    small, _, _ = saved_bytes(variant, config, batch)
    large, by_shape, parameters = saved_bytes(variant, config, 2 * batch)
    per_sample = (large - small) / batch
    return {"name": variant.name, "per_sample": per_sample, "fixed": small - batch * per_sample,
            "states": 16 * parameters, "by_shape": by_shape, "batch": 2 * batch,
            "seconds": time.perf_counter() - started}  # fmt: skip


def predicted_gib(row: dict, batch: int) -> float:
    return (row["states"] + row["fixed"] + batch * row["per_sample"]) / 2**30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=model_config, default="medium", help="model preset or YAML (default: medium)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated bench_step.py variant names")
    parser.add_argument("--batch", type=at_least(1), default=2, help="the smaller probe batch (the larger is twice it)")
    parser.add_argument("--predict", type=batch_sizes, default="64,256", help="batch sizes to predict the peak for")
    parser.add_argument("--top", type=at_least(0), default=0, help="also list each variant's largest kept tensors")
    args = parser.parse_args(argv)
    variants = [Variant.parse(name) for name in args.variants.split(",")]
    for variant in variants:
        if variant.infer or variant.lengths != "fixed":
            raise SystemExit(f"variant {variant.name!r}: this benchmark measures the fixed-length training step")
        if variant.stepgraph:  # refused here, not after measuring the variants before it
            raise SystemExit(f"variant {variant.name!r}: stepgraph needs a CUDA device; this benchmark runs on the CPU")
    predict = args.predict
    print(f"activation memory kept for backward | model {args.config} | mel [B, 80, 282], tokens [B, 32], masks on | "
          f"measured on CPU ({torch.get_num_threads()} threads), compiled variants through {PARTITION_BACKEND}",
          flush=True)  # fmt: skip
    header = (f"{'variant':<46} {'MiB/sample':>10} {'fixed MiB':>9} "
              + " ".join(f"{'peak GiB b' + str(b):>14}" for b in predict) + f" {'s':>5}")  # fmt: skip
    rows = []
    try:
        for variant in variants:
            row = measure(variant, args.config, args.batch)
            rows.append(row)
            print(format_row(row, predict), flush=True)
            if args.top:
                for (dtype, shape), size in row["by_shape"].most_common(args.top):
                    print(f"    {size / MiB:9.2f} MiB at batch {row['batch']}: {dtype} {list(shape)}")
    finally:
        set_recompute("default")  # leave the process's partitioner as PyTorch ships it
    print(f"\n{header}\n{'-' * len(header)}")
    for row in rows:
        print(format_row(row, predict))
    print("peak = 16 B x parameters (weights, gradients, AdamW moments) + fixed + batch x MiB/sample")


def format_row(row: dict, predict: list[int]) -> str:
    return (f"{row['name']:<46} {row['per_sample'] / MiB:>10.2f} {row['fixed'] / MiB:>9.1f} "
            + " ".join(f"{predicted_gib(row, b):>14.2f}" for b in predict) + f" {row['seconds']:>5.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
