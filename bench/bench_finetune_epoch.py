"""Is a fine-tune epoch GPU-bound?  Loader wait against step time over MELD-size cached data.

Writes a feature store of ``--clips`` synthetic clips (default 10,000, about MELD's train split) with
MELD-like lengths (bench/workloads.py) through the kit's own ``meld.feature_cache.write_store``,
reads it back through ``meld.dataset.MeldDataset`` (memory-mapped store, float16 -> float32 mels,
pre-tokenised text) and fine-tuning's ``Collate``, and trains the kit's ``MeldClassifier`` (CLARA,
audio + text, full fine-tuning, weighted cross-entropy) for one epoch with the shared engine, once
per setting.  The engine logs, per step, the seconds spent waiting for the next batch
(``data_wait_s``) and the whole step's wall time (``step_s``); the table gives their means over the
epoch after the first logging window (warm-up, compilation).

A setting is ``WORKERS/COMPILE[/FRAMES_MULTIPLE[/bucket][/cudnn]]``: loader worker processes,
``train.compile`` (off, model or blocks), the multiple the batch's mel frames are padded up to
(DataConfig's ``frames_multiple``; default 1, the batch's longest), ``bucket`` for
length-bucketed batches (the engine's sampler given the clips' lengths, as ``meld.finetune`` does
with ``data.bucket_by_length``; without it batches are plainly shuffled, so a batch's longest clip
varies from step to step), and ``cudnn`` for CLARA's ``attention=sdpa_cudnn`` (PyTorch's own
attention kernel choice, cuDNN first on H100/H200) instead of the default ``sdpa`` (cuDNN left out).
With a frames multiple above 1 the token ids are padded to a multiple of 8 as well. The ``shapes``
column counts the distinct (frames, tokens) batch shapes the epoch trained on, read off the batches
themselves: each new one can mean new GPU kernel plans (cuDNN attention builds one per shape) or a
torch.compile recompilation. ``TFLOP/s`` is the model's work per step (FlopCounterMode, counted once
on one batch: it hardly depends on the clip length, as the Perceiver's latents do most of the work)
over the step time; far below the fixed-shape benchmark's means time spent on something other than
arithmetic. ``loader alone ms`` is the same loader iterated over an epoch with no model: how fast the
CPU side can deliver batches at all (milliseconds per batch with that many workers). A step that
takes longer than that never has to wait once the prefetch queue is full.

    python bench/bench_finetune_epoch.py                               # CPU: tiny CLARA, 512 clips
    python bench/bench_finetune_epoch.py --device cuda --config medium # the 10,000-clip GPU check
    python bench/bench_finetune_epoch.py --settings 4/off/1/cudnn,4/off,4/off/64/bucket,4/model/64/bucket
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.arguments import at_least, device_arg, model_config  # noqa: E402
from bench.workloads import meld_like_frames  # noqa: E402
from clara.compilation import SCOPES  # noqa: E402
from clara.engine import TrainConfig, Trainer, move_to  # noqa: E402
from clara.model import Clara  # noqa: E402
from clara.model_config import load_model_config  # noqa: E402
from meld.dataset import MeldDataset  # noqa: E402
from meld.feature_cache import OK, AudioSettings, ClipRecord, SplitStore, write_store  # noqa: E402
from meld.finetune import build_classifier  # noqa: E402
from meld.finetune_config import FinetuneConfig  # noqa: E402
from meld.finetune_data import Collate  # noqa: E402
from meld.labels import EMOTIONS, SENTIMENTS  # noqa: E402
from meld.losses import build_loss  # noqa: E402
from meld.records import Utterance  # noqa: E402


TOKENS_MULTIPLE = 8  # token ids' multiple in every setting that pads frames to one
# The GPU default asks what cuDNN's per-shape attention plans cost a real epoch (one new shape per
# batch unpadded, a bounded set padded and bucketed), against the default kernels.
GPU_SETTINGS = "4/off/1/cudnn,4/off,4/off/64/bucket/cudnn,4/off/64/bucket"
CPU_SETTINGS = "0/off,0/off/64,0/off/64/bucket"


@dataclass(frozen=True)
class Setting:
    """One ``WORKERS/COMPILE[/FRAMES_MULTIPLE[/bucket][/cudnn]]`` setting of ``--settings``."""

    name: str
    workers: int
    compile: str
    frames_multiple: int = 1
    bucket: bool = False
    cudnn: bool = False

    @property
    def tokens_multiple(self) -> int:
        return TOKENS_MULTIPLE if self.frames_multiple > 1 else 1

    @classmethod
    def parse(cls, name: str) -> Setting:
        parts = name.split("/")
        numbers, flags = [parts[0], *parts[2:3]], parts[3:]
        if (len(parts) < 2 or not all(n.isdigit() for n in numbers) or parts[1] not in SCOPES
                or (len(parts) >= 3 and int(parts[2]) < 1) or flags not in ([], ["bucket"], ["cudnn"], ["bucket", "cudnn"])):
            raise SystemExit(f"setting {name!r}: expected WORKERS/COMPILE[/FRAMES_MULTIPLE[/bucket][/cudnn]], COMPILE one "
                             f"of {', '.join(SCOPES)} and FRAMES_MULTIPLE at least 1, e.g. 4/off/64/bucket")
        return cls(name, int(parts[0]), parts[1], *(int(n) for n in parts[2:3]), bucket="bucket" in flags,
                   cudnn="cudnn" in flags)  # fmt: skip

    @property
    def attention(self) -> str:
        return "sdpa_cudnn" if self.cudnn else "sdpa"


@dataclass
class SyntheticClip:
    """What ``write_store`` reads of a clip: its record and its float16 mel [T, n_mels]."""

    record: ClipRecord
    values: np.ndarray

    def mel(self) -> np.ndarray:
        return self.values


class WordTokenizer:
    """Stands in for the BPE tokenizer (the text is pre-tokenised once, so its cost is not timed):
    one id per word, with CLARA's two leading special tokens."""

    def encode(self, text: str) -> list[int]:
        return [50259, 50372] + [1 + zlib.crc32(word.encode()) % 50000 for word in text.split()]


def synthetic_split(root: Path, clips: int, seed: int = 0) -> tuple[list[Utterance], Path]:
    rng = np.random.default_rng(seed)
    frames = meld_like_frames(clips, torch.Generator().manual_seed(seed)).tolist()
    settings = AudioSettings()
    utterances, stored = [], []
    for i, count in enumerate(frames):
        words = " ".join(f"w{w}" for w in rng.integers(0, 5000, int(rng.integers(3, 30))))
        utt = Utterance("train", i // 10, i % 10, "Speaker", words, EMOTIONS[i % len(EMOTIONS)],
                        SENTIMENTS[i % len(SENTIMENTS)], 1, 1, 0.0, count / 93.75, i)  # fmt: skip
        utterances.append(utt)
        record = ClipRecord(utt.key, f"train/{utt.clip_name}", 0, 0, OK, samples=(count - 1) * 512, frames=count)
        stored.append(SyntheticClip(record, rng.standard_normal((count, settings.n_mels), dtype=np.float32).astype(np.float16)))
    path = root / "train.safetensors"
    write_store(path, settings, stored)
    return utterances, path


class Task:
    def __init__(self, criterion):
        self.criterion = criterion
        # (frames, tokens) of each batch trained on, seen here in the main process also when loader
        # workers collate: mel [B, 80, frames], tokens [B, tokens].
        self.shapes: set[tuple[int, int]] = set()

    def training_step(self, model, batch):
        self.shapes.add((batch["mel"].shape[-1], batch["tokens"].shape[-1]))
        logits = model(batch)  # [B, 7]
        return self.criterion(logits, batch["emotion"]), {}


def build(attention: str, args) -> torch.nn.Module:
    """Fine-tuning's classifier (CLARA ``args.config`` from scratch, audio + text) with ``attention``."""
    config = FinetuneConfig(model=replace(FinetuneConfig().model, clara=args.config))
    torch.manual_seed(0)
    clara = Clara(load_model_config(args.config, [f"attention={attention}"]))
    return build_classifier(config, clara, EMOTIONS)[0]


def run(setting: Setting, args, dataset: MeldDataset, device: str, out_dir: Path) -> dict:
    classifier = build(setting.attention, args)
    criterion = build_loss("weighted_ce", dataset.class_counts()["emotion"], power=0.5).to(device)
    run_dir = out_dir / setting.name.replace("/", "-")
    train = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-5, warmup_steps=0, cycle_steps=0, device=device,
                        log_every=args.log_every, eval_at_start=False, out_dir=str(run_dir), num_workers=setting.workers,
                        progress=False, resume=False, compile=setting.compile)  # fmt: skip
    task = Task(criterion)
    collate = Collate(frames_multiple=setting.frames_multiple, tokens_multiple=setting.tokens_multiple)
    trainer = Trainer(train, classifier, task, dataset, collate_fn=collate,
                      lengths=dataset.lengths if setting.bucket else None)
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    trainer.sampler.set_epoch(0)  # a whole epoch again, for the loader alone
    alone_ms = loader_alone_ms(trainer.loader)
    windows = result.history[1:] or result.history  # the first window holds warm-up and compilation
    step_s = float(np.mean([w["train/step_s"] for w in windows]))
    wait_s = float(np.mean([w["train/data_wait_s"] for w in windows]))
    return {"setting": setting.name, "steps": result.step, "epoch_s": seconds, "step_ms": step_s * 1e3,
            "wait_ms": wait_s * 1e3, "wait_share": wait_s / step_s, "samples_s": args.batch / step_s,
            "tflops": args.flops_per_sample * args.batch / step_s / 1e12, "shapes": len(task.shapes),
            "alone_ms": alone_ms}  # fmt: skip


def training_flops_per_sample(args, dataset: MeldDataset, device: str) -> float:
    """FLOPs of one training forward and backward of the classifier (no optimiser), per sample, on
    the first ``args.batch`` clips: FlopCounterMode, in fp32 (the count is the same in bf16), with
    the eager attention math, as FlopCounterMode does not count every fused attention kernel (on the
    CPU it leaves SDPA out, about 15% of CLARA medium's work)."""
    from torch.utils.flop_counter import FlopCounterMode

    classifier = build("eager", args).to(device).train()
    batch = move_to(Collate()([dataset[i] for i in range(min(args.batch, len(dataset)))]), torch.device(device))
    with FlopCounterMode(display=False) as counter:
        classifier(batch).sum().backward()
    return counter.get_total_flops() / batch["mel"].shape[0]


def loader_alone_ms(loader: DataLoader) -> float:
    """Milliseconds per batch of ``loader`` (the engine's own: its sampler, collate, workers and
    pinning) iterated over one more epoch with no model: the rate at which the CPU side can feed
    batches at all (worker start-up excluded)."""
    batches = iter(loader)
    next(batches)
    started = time.perf_counter()
    count = sum(1 for _ in batches)
    return (time.perf_counter() - started) / max(count, 1) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=model_config, default=None, help="CLARA preset (default: medium on GPU, tiny on CPU)")
    parser.add_argument("--clips", type=at_least(1), default=None, help="default: 10,000 on GPU, 512 on CPU")
    parser.add_argument("--batch", type=at_least(1), default=32)
    parser.add_argument("--log-every", type=at_least(1), default=20)
    parser.add_argument("--settings", default=None,
                        help="comma-separated WORKERS/COMPILE[/FRAMES_MULTIPLE[/bucket][/cudnn]] settings, e.g. "
                        f"4/off/64/bucket (frames padded to a multiple of 64, tokens to one of {TOKENS_MULTIPLE}, "
                        "length-bucketed batches; cudnn: attention=sdpa_cudnn); default GPU: "
                        f"{GPU_SETTINGS}; CPU: {CPU_SETTINGS}")
    args = parser.parse_args(argv)
    gpu = device_arg(args.device).type == "cuda"
    args.config = args.config or ("medium" if gpu else "tiny")
    args.clips = args.clips or (10_000 if gpu else 512)
    names = args.settings or (GPU_SETTINGS if gpu else CPU_SETTINGS)
    settings = [Setting.parse(name) for name in names.split(",")]
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        utterances, path = synthetic_split(tmp, args.clips)
        dataset = MeldDataset(utterances, store=SplitStore(path), tokenizer=WordTokenizer())
        frames = np.asarray(dataset.lengths)
        args.flops_per_sample = training_flops_per_sample(args, dataset, args.device)
        print(f"device: {name} | CLARA {args.config}, audio + text, full fine-tuning, batch {args.batch} | "
              f"{len(dataset)} clips, median {np.median(frames) / 93.75:.2f} s, store {path.stat().st_size / 2**20:.0f} MiB, "
              f"written in {time.perf_counter() - started:.1f} s | {args.flops_per_sample / 1e9:.4g} GFLOP per "
              "training sample", flush=True)
        rows = [run(setting, args, dataset, args.device, tmp) for setting in settings]
    header = (f"{'setting':<18} {'steps':>6} {'epoch s':>8} {'step ms':>8} {'loader wait ms':>15} {'wait share':>10} "
              f"{'samples/s':>10} {'TFLOP/s':>8} {'shapes':>6} {'loader alone ms':>16}")
    print(f"\n{header}\n{'-' * len(header)}")
    for r in rows:
        print(f"{r['setting']:<18} {r['steps']:>6} {r['epoch_s']:>8.1f} {r['step_ms']:>8.1f} {r['wait_ms']:>15.2f} "
              f"{r['wait_share']:>10.1%} {r['samples_s']:>10.1f} {r['tflops']:>8.2f} {r['shapes']:>6} {r['alone_ms']:>16.2f}")
    print(f"device: {name}")


if __name__ == "__main__":
    main()
