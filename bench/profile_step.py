"""Profile "the medium step" on a GPU: where the time goes, kernel by kernel.

    python bench/profile_step.py --variant sdpa-bf16-compile --batch 64

Prints the top CUDA kernels by total time over a few profiled steps (after warm-up), grouped the way
``torch.profiler`` reports them, and writes a Chrome trace if ``--trace FILE`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_step import Variant, build, make_batch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sdpa-bf16-compile")
    parser.add_argument("--config", default="medium")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")
    device = torch.device("cuda")
    variant = Variant.parse(args.variant)
    _, step = build(variant, args.config, device)
    inputs = make_batch(args.batch, 282, 32, variant.varlen, device)
    for _ in range(5):
        step(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step(*inputs)
        torch.cuda.synchronize()
    print(f"{args.variant}, batch {args.batch}, {args.steps} steps on {torch.cuda.get_device_name()}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
