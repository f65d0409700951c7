"""``python -m meld.zeroshot``: CLARA's zero-shot emotion (or sentiment) baseline on MELD, with prompts.

    python -m meld.zeroshot                                   # the demo, with the demo-pretrained tiny CLARA
    python -m meld.zeroshot --data ROOT --checkpoint CKPT [--cache CACHE] [--prompts YAML] [--split dev|test|both]
                            [--calibration none|prior|content_free] [--clara-override KEY=VALUE ...] [--out DIR]

Each class is described by prompts (``configs/prompts/emotion.yaml``: templates × names); an audio clip
is given the class whose prompt embedding is nearest to its audio embedding. Every template is scored
alone and all of them together (the ensemble), each raw and with both label-free calibrations
(``meld.calibration``). The headline (metrics.json's splits, predictions.csv, the confusion matrix) is the
ensemble with ``--calibration``. Beside it: audio-text retrieval R@1/5/10 on each split, the captions
built from utterance, emotion and speaker (``configs/captions/meld.yaml``).

Audio comes from ``python -m meld.prepare``'s feature cache (``--cache`` and the audio settings
``--max-seconds``/``--config``/``--set``, as given to prepare; the demo is prepared automatically); audio and prompt embeddings are kept in that cache's embedding cache, caption
embeddings are computed once per run; inference runs in batches, on the GPU when there is one.
Outputs in ``--out`` (default ``runs/zeroshot-<timestamp>``): metrics.json, report.md, predictions.csv, confusion_<split>.png, tensorboard/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clara import config as config_lib
from clara import distributed
from clara.checkpoint import CheckpointError, load_checkpoint
from clara.cli import describe
from clara.config import ConfigError
from clara.engine import check_device
from clara.model import Clara
from clara.precision import PRECISIONS, autocast_for, resolve_precision
from clara.pretrain_data import DataError
from clara.retrieval import chance_levels, retrieval_metrics
from clara.run_dir import check_folder_path, claim, exclusive_run
from clara.tokenizer import Tokenizer
from meld.calibration import CALIBRATIONS, calibrate, mean_probabilities, silence
from meld.captions import DEFAULT_CAPTIONS, CaptionConfig, caption_for, load_captions
from meld.classifier_io import is_classifier_dir
from meld.dataset import DataConfig, MeldDataset, build_datasets, check_not_empty, make_dataloader
from meld.demo import ensure_demo
from meld.demo_clara import ensure_demo_clara
from meld.embedding_cache import cache_key, load_or_encode, path_for
from meld.errors import MeldDataError
from meld.feature_cache import audio_cache_dir, check_model_mels, default_cache_root
from meld.metrics import classification_metrics
from meld.prepare import add_audio_arguments, audio_config, prepare
from meld.prompts import PROMPT_ROOT, PromptSet, class_embeddings, encode_prompts, encode_texts, load_prompts, zero_shot_logits
from meld.zeroshot_report import ENSEMBLE, write_outputs

# The files loaded when --prompts / --captions are not given, as the run records them: absolute, so
# the record names a file that exists whatever folder the command ran from.
DEFAULT_PROMPTS = PROMPT_ROOT / "emotion.yaml"

SILENCE_SECONDS = (0.5, 1.0, 2.0, 4.0)  # content-free inputs; MELD's clips are mostly 1-5 s
KIND = "meld.zeroshot"


@dataclass
class SplitAudio:
    """One split's clips in dataset order: keys, gold labels [N], unit-norm audio embeddings [N, D]; and
    the CSV rows left out for lack of audio (key -> why), which the report must name: the split scored
    is then not the whole official one."""

    keys: list[str]
    gold: np.ndarray
    embeds: torch.Tensor
    captions: list[str]
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)


@torch.no_grad()
def encode_split(model: Clara, dataset: MeldDataset, batch_size: int) -> torch.Tensor:
    """Cached log-mels -> [N, D] audio embeddings in dataset order (batched by length: less padding)."""
    device = next(model.parameters()).device
    position = {utt.key: i for i, utt in enumerate(dataset.utterances)}
    embeds = torch.empty(len(dataset), model.config.output_dim, device=device)
    for batch in make_dataloader(dataset, batch_size, shuffle=False, bucket_by_length=True):
        rows = torch.tensor([position[key] for key in batch["keys"]], device=device)
        embeds[rows] = model.encode_audio(batch["mel"].to(device), batch["mel_lengths"].to(device)).float()
    return embeds


@torch.no_grad()
def content_free_embeds(model: Clara, data: DataConfig) -> torch.Tensor:
    """Silence through the same front-end as the cache -> [K, D] audio embeddings."""
    device = next(model.parameters()).device
    wave, lengths = silence(SILENCE_SECONDS, data.audio.sample_rate)
    mel, frames = data.audio.log_mel().to(device)(wave.to(device), lengths.to(device))  # [K, n_mels, T], [K]
    return model.encode_audio(mel, frames).float()


def classifiers(prompts: PromptSet, prompt_embeds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each template alone ("T1", "T2", ...) and every template together ("ensemble"): name -> [C, D]."""
    weights = {f"T{i + 1}": class_embeddings(prompt_embeds, templates=[i]) for i in range(len(prompts.templates))}
    weights[ENSEMBLE] = class_embeddings(prompt_embeds)
    return weights


def score(
    splits: dict[str, SplitAudio],
    unlabelled: torch.Tensor,
    content_free: torch.Tensor,
    weights: dict[str, torch.Tensor],
    scale: torch.Tensor,
    labels: tuple[str, ...],
) -> tuple[dict, dict]:
    """Metrics and probabilities of every classifier × calibration × split.

    Returns ``results[classifier][calibration][split]`` (classification_metrics) and
    ``probabilities[classifier][calibration][split]`` ([N, C] numpy), plus ``results[..]["priors"]``.
    """
    results, probabilities = {}, {}
    for name, w in weights.items():
        priors = {"none": None,
                  "prior": mean_probabilities(zero_shot_logits(unlabelled, w, scale)),
                  "content_free": mean_probabilities(zero_shot_logits(content_free, w, scale))}
        results[name] = {"priors": {k: dict(zip(labels, v.tolist())) for k, v in priors.items() if v is not None}}
        probabilities[name] = {}
        for calibration, prior in priors.items():
            results[name][calibration], probabilities[name][calibration] = {}, {}
            for split, audio in splits.items():
                logits = zero_shot_logits(audio.embeds, w, scale)  # [N, C]
                if prior is not None:
                    logits = calibrate(logits, prior)
                probs = logits.softmax(dim=-1).cpu().numpy()
                results[name][calibration][split] = classification_metrics(audio.gold, probs.argmax(axis=1), labels)
                probabilities[name][calibration][split] = probs
    return results, probabilities


def check_finite(checkpoint: Path, precision: str, values: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite embeddings (name -> [..., D]) or scale: a diverged or damaged checkpoint, or fp16
    overflow, gives them. Scored, such a clip would get class 0 (argmax of a NaN row: neutral, the majority
    class) and a NaN prior would turn every clip's calibrated scores to NaN: numbers that look like a result,
    until metrics.json refuses them with a traceback."""
    for name, value in values.items():
        rows = value.detach().reshape(-1, value.shape[-1] if value.ndim else 1)
        bad = int((~torch.isfinite(rows)).any(dim=1).sum())
        if bad:
            hint = "" if precision == "fp32" else f", or {precision} overflow (try --precision fp32)"
            raise CheckpointError(f"{checkpoint}: {name}: {bad} of {rows.shape[0]} are NaN or infinite "
                                  f"(a diverged or damaged checkpoint{hint})")


def retrieval(model: Clara, tokenizer: Tokenizer, audio: SplitAudio, precision: str = "fp32") -> dict[str, dict[str, float]]:
    """R@1/5/10 audio<->text on one split with its captions; repeated captions are embedded once (the
    text encoder under ``precision``'s autocast, the ranking in fp32)."""
    unique = sorted(set(audio.captions))
    position = {caption: i for i, caption in enumerate(unique)}
    text_of_audio = torch.tensor([position[c] for c in audio.captions], device=audio.embeds.device)
    with autocast_for(audio.embeds.device, precision):
        texts = encode_texts(model, tokenizer, unique)
    return {"recall": retrieval_metrics(audio.embeds, texts, text_of_audio),
            "chance": chance_levels(text_of_audio.cpu(), len(unique)),
            "clips": len(audio.keys), "captions": len(unique)}


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(MELD root, checkpoint); no --data and no --checkpoint: the demo and the demo-pretrained CLARA."""
    if args.checkpoint is not None and is_classifier_dir(Path(args.checkpoint)):
        raise CheckpointError(f"{args.checkpoint}: a fine-tuned MELD classifier, not a CLARA checkpoint; classify "
                              "with `python -m meld.predict --run`, or give the CLARA checkpoint it was fine-tuned from")
    if args.data is not None:
        if args.checkpoint is None:
            raise ConfigError("--checkpoint is required with --data (the demo-pretrained CLARA knows only the demo)")
        return Path(args.data), Path(args.checkpoint)
    root = ensure_demo(log=print)
    if args.checkpoint is not None:
        return root, Path(args.checkpoint)
    return root, ensure_demo_clara(data_root=root, cache_root=args.cache or None, log=print)


def resolve_device(name: str) -> torch.device:
    check_device(name, field="--device")
    return distributed.resolve_device(name)


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a zero-shot run (its metrics.json has the zero-shot scores), which a rerun replaces."""
    try:
        return "zeroshot" in json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def load_split(dataset: MeldDataset, embeds: torch.Tensor, prompts: PromptSet, captions: CaptionConfig) -> SplitAudio:
    utterances = dataset.utterances
    return SplitAudio(
        keys=[utt.key for utt in utterances],
        gold=np.array([prompts.labels.index(getattr(utt, prompts.target)) for utt in utterances]),
        embeds=embeds,
        captions=[caption_for(utt, captions) for utt in utterances],
        left_out=dict(dataset.dropped),
    )


def cached_embeddings(model: Clara, tokenizer: Tokenizer, prompts: PromptSet, datasets: dict[str, MeldDataset],
                      root: Path, data: DataConfig, batch_size: int, precision: str = "fp32",
                      cache_root: Path | None = None) -> tuple[dict, list[torch.Tensor], bool]:  # fmt: skip
    """Audio embeddings per split and prompt embeddings per class, computed once per (weights, inputs).

    Reuses the linear probe's embedding cache: the key hashes the model's weights, the audio settings,
    every prompt text, every utterance key and each split's feature-store digest (its clips' source
    files and frames, so a clip replaced and prepared again is encoded again, not served from an
    earlier run), so any change recomputes; the model's config too, as
    settings such as ``mask_padding`` change the embeddings and not the weights. The encoders run under
    ``precision``'s autocast (clara.precision; also part of the key). The file goes in ``cache_root``
    (meld.prepare's ``--cache``; default the data root's folder in the user cache). Returns (audio {split: [N, D]},
    prompts [T, S_c, D] per class, whether it came from the cache).
    """
    fingerprint = {
        "kind": "zeroshot/1", "data": str(root), "audio": config_lib.to_dict(data.audio),
        "prompts": {label: prompts.texts(label) for label in prompts.labels},
        "splits": {split: {"keys": [utt.key for utt in ds.utterances], "store": ds.store.digest}
                   for split, ds in datasets.items()},
        "precision": precision, "clara": config_lib.to_dict(model.config),
    }
    path = path_for(cache_root or default_cache_root(root), cache_key(model, fingerprint))

    def encode() -> dict[str, dict[str, torch.Tensor]]:
        device = next(model.parameters()).device
        with autocast_for(device, precision):
            audio = {split: encode_split(model, ds, batch_size).cpu() for split, ds in datasets.items()}
            per_class = encode_prompts(model, tokenizer, prompts)
        return {"audio": audio, "prompts": {label: e.cpu() for label, e in zip(prompts.labels, per_class)}}

    stored, hit = load_or_encode(path, encode)
    device = next(model.parameters()).device
    audio = {split: stored["audio"][split].to(device) for split in datasets}
    return audio, [stored["prompts"][label].to(device) for label in prompts.labels], hit


@contextmanager
def run_folder(out: Path) -> Iterator[None]:
    """Make ``out`` and hold it for the whole run (clara.run_dir.exclusive_run): a second command given
    the same folder (or the same default timestamp) is refused, instead of writing its outputs over this
    run's half-written ones and deleting its atomic-write temporaries as leftovers. A folder the run made
    and left empty (a mistake found after the claim) is removed; only while held, so a refused command
    never removes the folder of the run that holds it."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_run(out):
        try:
            yield
        finally:
            if made and not any(out.iterdir()):
                out.rmdir()


def run(args: argparse.Namespace) -> dict:
    """Score, write every output to ``args.out`` and return the metrics document."""
    started = time.perf_counter()
    # Only the audio settings are read (before the folder is claimed: a bad one is refused untouched);
    # they name the cache prepare wrote.
    data = dataclasses.replace(audio_config(args), modality="audio")
    out = Path(args.out)
    claim(out, KIND, holds_run)  # before any work: the folder must be new, empty or an earlier zero-shot run
    with run_folder(out):
        return _score_and_write(args, data, out, started)


def _score_and_write(args: argparse.Namespace, data: DataConfig, out: Path, started: float) -> dict:
    prompts = load_prompts(args.prompts)
    captions = load_captions(args.captions)
    device = resolve_device(args.device)
    root, checkpoint = resolve_inputs(args)
    cache_root = Path(args.cache) if args.cache else default_cache_root(root)
    if args.data is None:
        prepare(root, cache_root, data.audio)  # the demo's features (cached after the first run); a user prepares their own data
    overrides = args.clara_override or []
    with config_lib.noting(f"loaded with --clara-override {' '.join(overrides)}" if overrides else "", CheckpointError):
        model = load_checkpoint(checkpoint, allow_pickle=args.allow_pickle, overrides=overrides).to(device).eval()
    tokenizer = Tokenizer(max_length=model.config.text.max_positions)
    eval_splits = ("dev", "test") if args.split == "both" else (args.split,)
    check_model_mels(data.audio, model.config.audio.n_mels)
    datasets = build_datasets(root, data, splits=("train", *eval_splits), cache_root=cache_root)
    check_not_empty(datasets, root)

    precision = resolve_precision(args.precision, device)
    audio, prompt_embeds, hit = cached_embeddings(model, tokenizer, prompts, datasets, root, data, args.batch_size,
                                                  precision, cache_root)  # fmt: skip
    if hit:
        print("audio and prompt embeddings: reused from the cache")
    # Train audio is used unlabelled, for the prior; its labels are never read.
    unlabelled = audio["train"]
    splits = {split: load_split(datasets[split], audio[split], prompts, captions) for split in eval_splits}
    weights = classifiers(prompts, prompt_embeds)
    scale = model.audio_log_scale.exp().detach().float()
    with autocast_for(device, precision):
        content_free = content_free_embeds(model, data)
    check_finite(checkpoint, precision, {
        **{f"{split} audio embeddings": e for split, e in audio.items()}, "silence embeddings": content_free,
        "prompt embeddings": torch.cat([e.reshape(-1, e.shape[-1]) for e in prompt_embeds]), "audio scale": scale})
    results, probabilities = score(splits, unlabelled, content_free, weights, scale, prompts.labels)
    recall = {split: retrieval(model, tokenizer, audio, precision) for split, audio in splits.items()}
    run_info = {
        "data": str(root), "cache": str(cache_root), "checkpoint": str(checkpoint), "clara_overrides": " ".join(overrides),
        "prompts": str(args.prompts or DEFAULT_PROMPTS),
        "captions": str(args.captions or DEFAULT_CAPTIONS), "target": prompts.target,
        "calibration": args.calibration, "device": str(device), "precision": precision, "audio_scale": float(scale),
        "audio_features": str(audio_cache_dir(cache_root, data.audio)),  # names the audio settings used
        "train_clips_unlabelled": len(datasets["train"]), "seconds": round(time.perf_counter() - started, 1),
    }
    return write_outputs(out, prompts, captions, splits, results, probabilities, recall, run_info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meld.zeroshot", description=describe(__doc__))
    parser.add_argument("--data", help="MELD root, prepared with meld.prepare (default: the built-in demo)")
    parser.add_argument("--checkpoint", help="CLARA weights: a meld-clara folder or the reference .ckpt "
                        "(default on the demo: the demo-pretrained tiny CLARA, built on first use)")
    parser.add_argument("--cache", help="meld.prepare's --cache for the audio features (default: the data root's "
                        "folder in $MELD_CLARA_CACHE); the embedding cache goes there too")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a reference .ckpt that holds pickled Python objects (only from a source you trust)")
    parser.add_argument("--clara-override", action="append", metavar="KEY=VALUE",
                        help="a CLARA setting applied to the checkpoint that leaves its tensors alone, e.g. "
                        "mask_padding=false or attention=sdpa_cudnn (repeat for several)")
    add_audio_arguments(parser)  # as given to meld.prepare: they name its cache
    parser.add_argument("--prompts", help="prompt set YAML (default: configs/prompts/emotion.yaml)")
    parser.add_argument("--captions", help="caption YAML for retrieval (default: configs/captions/meld.yaml)")
    parser.add_argument("--split", choices=("dev", "test", "both"), default="both", help="split(s) to score (default both)")
    parser.add_argument("--calibration", choices=CALIBRATIONS, default="prior",
                        help="the headline's calibration (all are reported side by side; default prior)")
    parser.add_argument("--out", help="run folder (default runs/zeroshot-<timestamp>)")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per inference batch (default 64)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the encoders' autocast on a GPU (auto: bf16, or fp16 where bf16 is missing); "
                        "a CPU always runs fp32")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        config_lib.check_overrides(args.clara_override or [], "--clara-override")
        if args.cache:
            check_folder_path(args.cache)
        args.out = args.out or str(Path("runs") / time.strftime("zeroshot-%Y%m%d-%H%M%S"))
        run(args)
    except (MeldDataError, ConfigError, CheckpointError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again (a demo CLARA pretraining resumes from its last saved step)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
