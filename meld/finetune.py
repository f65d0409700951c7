"""Fine-tuning CLARA on MELD: ``python -m meld.finetune [--data ROOT] [--checkpoint CKPT] [options] [key=value ...]``.

With no arguments it runs end to end on the built-in demo (built and prepared first when needed):
a tiny CLARA from scratch, audio and text, fine-tuned in under a minute on 2 CPU cores, then the test table.
``--config`` takes a YAML or a preset name from ``configs/finetune/`` (``linear_probe``, ``full``,
``text_only``); ``key=value`` overrides apply on top, and the flags below on top of those.

The run directory (``--out``, default ``runs/finetune-<timestamp>``) holds ``config.yaml`` (resolved),
``metrics.json`` (``{"dev": {...}, "test": {...}}``, the epoch with the best dev macro-F1, and ``"rows"``: each
split's CSV rows used and those left out for lack of audio), ``report.md``
with ``confusion_test.png``, ``predictions.csv``, ``model/`` (the selected classifier, for
``python -m meld.predict --run``), ``checkpoint.pt`` (the training state: an interrupted run resumes
when the same command is run again), ``best.safetensors`` + ``best.json`` (the selection so far),
``status.json`` (running, complete, stopped or interrupted), ``metrics.jsonl`` and ``tensorboard/``. With ``--seeds N`` each
seed gets ``seed-<s>/`` and the top level reports mean ± std, keeps the seed with the best dev macro-F1 and
has a ``status.json`` of its own (the seed running, those done).
An existing ``--out`` must hold a fine-tune run with the same settings (MAY_DIFFER_ON_RESUME lists what may
change), or be empty; anything else is refused before a file is written.

For sweeps: ``load_config(path, overrides)`` and ``run_finetune(config, out_dir=..., epoch_callback=...)``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from clara import config as config_lib
from clara import distributed
from clara.audio_io import AudioDecodeError
from clara.checkpoint import CheckpointError, load_checkpoint
from clara.cli import describe
from clara.engine import CHECKPOINT_FILE, Trainer, check_fits, init_env, seed_everything
from clara.io_utils import atomic_directory, atomic_path, atomic_write_text
from clara.masking import round_up
from clara.model import Clara
from clara.model_config import CONFIG_ROOT, ClaraConfig, load_model_config, result_overrides
from clara.precision import resolve_precision
from clara.run_dir import (
    CONFIG_FILE, OutDirError, check_folder_path, check_resumable, claim, exclusive_run, same_path, saved_config,
)
from clara.tokenizer import Tokenizer
from meld.classifier import HeadOnly, MeldClassifier, input_dims, input_names, set_trainable, zero_shot_init
from meld.classifier_io import classifier_spec, is_classifier_dir, save_classifier
from meld.dataset import MeldDataset, build_datasets, check_not_empty
from meld.demo import ensure_demo
from meld.embedding_cache import EmbeddingDataset, cache_key, load_or_encode, path_for
from meld.errors import MeldDataError
from meld.feature_cache import audio_key, check_model_mels, default_cache_root
from meld.finetune_config import FinetuneConfig
from meld.finetune_data import BalancedView, Collate, HFTextView
from meld.finetune_report import write_run_outputs, write_seed_summary
from meld.finetune_task import BEST_STATE, BEST_WEIGHTS, ClassificationTask, labels_of
from meld.fusion import FusionHead
from meld.hf_text import HFTextEncoder, load_hf_tokenizer
from meld.inference import forward_all
from meld.labels import TARGETS
from meld.layer_decay import decayed_groups
from meld.losses import build_loss
from meld.metrics import classification_metrics, mean_std
from meld.report import coverage_summary, row_coverage

PRESET_DIR = CONFIG_ROOT / "finetune"
DEMO_CONFIG = PRESET_DIR / "demo.yaml"
STATUS_FILE = "status.json"
USER_ERRORS = (config_lib.ConfigError, MeldDataError, CheckpointError, AudioDecodeError)
KIND = "meld.finetune"
# Settings a run may be resumed (or a finished one redone) with when they differ from its config.yaml:
# they change how it runs, what is logged or drawn, or where caches live (the feature and embedding
# caches are keyed by content), not what it computes. train.steps and train.epochs are here too: a run
# given more continues from its checkpoint to the new length (given fewer, it is refused:
# _check_not_shorter). The seeds (seeds, train.seed) are not: they decide which trainings the folder's
# results and mean ± std are over, and seeds 1 vs N lay the folder out differently.
MAY_DIFFER_ON_RESUME = frozenset({
    "threads", "tensorboard_extras", "outputs", "prepare", "cache_root", "data.batch_size", "data.num_workers",
    "model.allow_pickle",
    "strategy.embed_batch_size", "train.steps", "train.epochs", "train.progress", "train.print_logs", "train.log_every",
    "train.num_workers", "train.device", "train.resume", "train.checkpoint_every", "train.out_dir",
    "train.compile", "train.compile_mode", "train.compile_recompute", "train.compile_tuning",
    "train.find_unused_parameters",
    # run_finetune sets these itself (an evaluation per epoch), whatever the config says
    "train.eval_every", "train.eval_every_epoch", "train.eval_at_start",
})


# Settings that name files or folders: a resume compares them as paths (clara.run_dir.same_path).
PATH_KEYS = ("data_root", "model.clara", "model.checkpoint", "model.hf_text")


def load_config(path: str | None, overrides: Sequence[str]) -> FinetuneConfig:
    """The demo config (``path`` None), a YAML file or a preset name of configs/finetune/, plus overrides."""
    if path is None:
        resolved = DEMO_CONFIG
    elif not Path(path).exists() and (PRESET_DIR / f"{path}.yaml").is_file():
        resolved = PRESET_DIR / f"{path}.yaml"
    else:
        resolved = Path(path)
        if not resolved.exists():
            presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise config_lib.ConfigError(f"{path}: no such config file, nor a preset ({presets})")
    with audio_key("data.audio"):  # its audio settings are data.audio.* here, not prepare's audio.*
        return config_lib.load(FinetuneConfig, resolved, list(overrides))


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a fine-tune run (a config.yaml that reads as fine-tune settings)."""
    return saved_config(path, FinetuneConfig) is not None


def check_out_dir(out_dir: Path, config: FinetuneConfig) -> None:
    """Refuse, before anything is written, an ``out_dir`` that is a file, holds another command's run,
    or holds a fine-tune run with other settings than ``config`` (see MAY_DIFFER_ON_RESUME)."""
    check_resumable(out_dir, config, KIND, MAY_DIFFER_ON_RESUME, "--out",
                    {"model.clara_overrides": result_overrides,  # speed and memory switches may change
                     **{key: same_path for key in PATH_KEYS}})


def _write_status(out_dir: Path, status: str, **details) -> None:
    if not distributed.is_main():  # under torchrun the main process keeps the run's files
        return
    atomic_write_text(out_dir / STATUS_FILE, json.dumps({"status": status, **details}) + "\n")


class _Data:
    """The datasets of one run, shared by its seeds, and what the classifier needs to read them."""

    def __init__(self, config: FinetuneConfig, clara_config: ClaraConfig | None) -> None:
        data = config.data
        if clara_config is not None and data.uses_text:
            positions, multiple = clara_config.text.max_positions, data.tokens_multiple
            if data.max_tokens > positions:
                raise config_lib.ConfigError(
                    f"data.max_tokens ({data.max_tokens}) exceeds the CLARA text tower's {positions} "
                    f"positions; set data.max_tokens={positions}")
            widest = round_up(data.max_tokens, multiple)  # a batch's token width at most
            if widest > positions:
                raise config_lib.ConfigError(
                    f"data.max_tokens ({data.max_tokens}) padded up to a multiple of data.tokens_multiple ({multiple}) "
                    f"is {widest} tokens, more than the CLARA text tower's {positions} positions; "
                    f"set data.max_tokens={positions // multiple * multiple}")
        if clara_config is not None and data.uses_audio:
            check_model_mels(data.audio, clara_config.audio.n_mels, key="data.audio")
        self.root = Path(config.data_root) if config.data_root else ensure_demo(log=distributed.main_print)
        self.cache_root = Path(config.cache_root) if config.cache_root else default_cache_root(self.root)
        if data.uses_audio and config.prepare:
            from meld.prepare import prepare

            report = prepare(self.root, self.cache_root, data.audio)
            distributed.main_print(f"audio features: {report['run']['decoded']} clips decoded, {report['run']['reused']} reused")
        self.datasets: dict[str, MeldDataset] = build_datasets(self.root, data, cache_root=self.cache_root)
        self.hf_tokenizer = load_hf_tokenizer(config.model.hf_text) if config.model.hf_text else None
        self.views: dict = dict(self.datasets)
        if self.hf_tokenizer is not None:
            self.views = {split: HFTextView(ds, self.hf_tokenizer,
                                            max_tokens=config.model.hf_max_tokens) for split, ds in self.datasets.items()}
        pad = self.hf_tokenizer.pad_token_id if self.hf_tokenizer is not None else 0
        self.collate = Collate(pad or 0, frames_multiple=data.frames_multiple, tokens_multiple=data.tokens_multiple)
        check_not_empty(self.datasets, self.root)

    def coverage(self) -> dict[str, dict]:
        """``meld.report.row_coverage`` of every split: the rows trained on or scored, and those left out."""
        return row_coverage({split: (len(dataset), dict(dataset.dropped)) for split, dataset in self.datasets.items()})

    def fingerprint(self, config: FinetuneConfig) -> dict:
        fingerprint = {"root": str(self.root.resolve()), "data": config_lib.to_dict(config.data),
                       "features": config.model.features, "hf_max_tokens": config.model.hf_max_tokens,
                       "splits": {split: ds.content_digest() for split, ds in self.datasets.items()}}
        if self.hf_tokenizer is not None:
            # The ids the transformers encoder reads: its tokenizer's files (vocabulary, lower-casing) are
            # not among the weights the cache key hashes, and an edited one changes every embedding.
            fingerprint["hf_ids"] = {split: hashlib.sha256(json.dumps([ids.tolist() for ids in view.ids]).encode()).hexdigest()
                                     for split, view in self.views.items()}
        return fingerprint


def _load_clara(config: FinetuneConfig) -> Clara | None:
    """The CLARA checkpoint (loaded once, copied per seed), or None for a from-scratch model."""
    path = config.model.checkpoint
    if not path:
        return None
    if is_classifier_dir(Path(path)):
        raise CheckpointError(f"{path}: a fine-tuned MELD classifier, not a CLARA checkpoint; "
                              "classify with `python -m meld.predict --run`, or give a CLARA checkpoint")
    overrides = config.model.clara_overrides
    with config_lib.noting(f"loaded with model.clara_overrides {list(overrides)}" if overrides else "", CheckpointError):
        return load_checkpoint(path, allow_pickle=config.model.allow_pickle, overrides=overrides)


def scratch_clara_config(config: FinetuneConfig) -> ClaraConfig:
    """The architecture of a from-scratch CLARA: ``model.clara`` with ``model.clara_overrides``."""
    try:
        return load_model_config(config.model.clara, config.model.clara_overrides)
    except config_lib.ConfigError as err:
        if not config.model.clara_overrides:
            raise
        raise config_lib.ConfigError(f"model.clara_overrides: {err}") from None


def unimodal_losses(config: FinetuneConfig, inputs: tuple[str, ...]) -> bool:
    """Whether training adds each input's own loss (several inputs and a positive loss.unimodal_weight)."""
    return len(inputs) > 1 and config.loss.unimodal_weight > 0


def build_classifier(config: FinetuneConfig, clara: Clara | None, class_names: tuple[str, ...],
                     hf_tokenizer=None) -> tuple[MeldClassifier, dict]:  # fmt: skip
    """The classifier (weights from ``clara`` or, without it, from scratch with the current seed) and its head shape."""
    model = config.model
    inputs = input_names(config.data.modality, bool(model.hf_text), model.hf_text_mode)
    needs_clara = "audio" in inputs or "text" in inputs
    clara = (copy.deepcopy(clara) if clara is not None else Clara(scratch_clara_config(config))) if needs_clara else None
    hf_text = HFTextEncoder.from_folder(model.hf_text) if model.hf_text else None
    dims = input_dims(clara, hf_text, inputs, model.features)
    options = {"fusion": model.fusion, "fusion_dim": model.fusion_dim, "hidden_dim": model.hidden_dim,
               "dropout": model.dropout, "modality_dropout": model.modality_dropout,
               "unimodal_heads": unimodal_losses(config, inputs)}
    head = FusionHead(dims, len(class_names), **options)
    classifier = MeldClassifier(clara, head, inputs=inputs, features=model.features, hf_text=hf_text)
    if model.zero_shot_init:
        zero_shot_init(classifier, class_names, model.prompt, Tokenizer(config.data.language))
    return classifier, {"dims": dims, "options": options}


def _train_view(config: FinetuneConfig, train: torch.utils.data.Dataset, seed: int) -> torch.utils.data.Dataset:
    if config.loss.sampler != "balanced":
        return train
    return BalancedView(train, labels_of(train, config.target).tolist(), seed)


def _steps_per_epoch(config: FinetuneConfig, train_size: int, world_size: int) -> int:
    """The optimiser steps of one epoch over ``train_size`` training examples (the Trainer's count)."""
    return max(1, train_size // (config.train.batch_size * config.train.accumulation * world_size))


def _seed_dirs(config: FinetuneConfig, out_dir: Path) -> dict[int, Path]:
    """Each seed's folder: ``out_dir`` itself for one seed, ``out_dir/seed-<s>`` for several."""
    seeds = [config.train.seed + offset for offset in range(config.seeds)]
    return {seeds[0]: out_dir} if len(seeds) == 1 else {seed: out_dir / f"seed-{seed}" for seed in seeds}


def _checkpoint_step(folder: Path) -> int | None:
    """The step ``folder``'s training checkpoint holds; None without one, or for one the Trainer will
    refuse with its own message (damaged, another format)."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        # mmap: only the step is read, not a large model's tensors.
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return None


def _check_not_shorter(config: FinetuneConfig, out_dir: Path, per_epoch: int) -> None:
    """Refuse a run folder given again with fewer steps than a seed's checkpoint holds.

    train.epochs and train.steps may differ on resume so that a run continues to a longer one; a shorter
    one cannot be resumed: nothing trained, the rerun reported the longer run's selection (a later
    epoch, under another schedule) beside a config.yaml rewritten to the shorter length.
    """
    if config.train.resume is False:  # the run starts over
        return
    total = config.train.steps or config.train.epochs * per_epoch
    for folder in _seed_dirs(config, out_dir).values():
        step = _checkpoint_step(folder)
        if step is not None and step > total:
            longer = f"train.steps={step}" if config.train.steps else f"train.epochs={-(-step // per_epoch)}"
            raise OutDirError(f"{folder / CHECKPOINT_FILE} holds {step} training steps, more than this run's {total} "
                              f"({per_epoch} per epoch): give {longer} or more to continue it, train.resume=false "
                              "to train it again from the start, or a new --out")


def _start_selection_over(out_dir: Path, resume: bool | None) -> None:
    """Delete the best dev epoch so far (best.json, best.safetensors) when training starts over
    (train.resume=false, or checkpoint.pt deleted): it belongs to the training that checkpoint held.
    Kept, the new training was compared against the old run's best, and one that beat it at no epoch
    reported the old run's epoch and weights as its own."""
    starts_over = resume is False or not (out_dir / CHECKPOINT_FILE).is_file()
    if starts_over and distributed.is_main():
        for name in (BEST_STATE, BEST_WEIGHTS):
            (out_dir / name).unlink(missing_ok=True)
    distributed.barrier()  # no process reads the old selection while it is removed


def _recorded_train_seconds(out_dir: Path, default: float) -> float:
    """The training time ``out_dir``'s metrics.json records; ``default`` when it has none to read."""
    try:
        return float(json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))["selection"]["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _run_seed(config: FinetuneConfig, data: _Data, clara: Clara | None, env: distributed.DistEnv, out_dir: Path,
              seed: int, epoch_callback: Callable[[int, dict], None] | None) -> dict:  # fmt: skip
    """Train one seed into ``out_dir`` on ``env`` (run_finetune's); write its outputs; return its metrics document."""
    class_names = TARGETS[config.target]
    seed_everything(seed)  # a from-scratch CLARA and the head start from this seed
    classifier, head_shape = build_classifier(config, clara, class_names, data.hf_tokenizer)
    counts = set_trainable(classifier, config.strategy.name, config.strategy.unfreeze_layers)
    distributed.main_print(f"seed {seed}: {config.strategy.name} on {'+'.join(classifier.inputs)}; trainable parameters "
                           + ", ".join(f"{part} {count:,}" for part, count in counts.items()))
    train_counts = data.datasets["train"].class_counts()[config.target]
    loss = config.loss
    criterion = build_loss(loss.name, train_counts, power=loss.class_weight_power, gamma=loss.focal_gamma,
                           focal_weighted=loss.focal_weighted, label_smoothing=loss.label_smoothing).to(env.device)
    eval_batch = config.data.batch_size
    if config.strategy.name == "linear_probe":
        classifier.to(env.device).eval()
        precision = resolve_precision(config.train.precision, env.device)  # the embeddings' autocast, as training's
        # The CLARA config joins the key: settings such as mask_padding change the embeddings, not the weights.
        clara_settings = config_lib.to_dict(classifier.clara.config) if classifier.clara is not None else None
        fingerprint = {**data.fingerprint(config), "inputs": classifier.inputs, "precision": precision,
                       "clara": clara_settings}
        path = path_for(data.cache_root, cache_key(classifier.encoders(), fingerprint))

        def encode() -> dict:
            return {split: forward_all(classifier, view, data.collate, config.strategy.embed_batch_size, env.device,
                                       head=False, precision=precision)["embeddings"] for split, view in data.views.items()}

        started = time.perf_counter()
        embeddings, cached = load_or_encode(path, encode, log=distributed.main_print)
        distributed.main_print(f"embeddings {'read from' if cached else 'computed in ' + format(time.perf_counter() - started, '.1f') + ' s, cached in'} {path}")
        views = {split: EmbeddingDataset(embeddings[split], data.datasets[split]) for split in data.datasets}
        model, collate_fn = HeadOnly(classifier.head), None
    else:
        views, model, collate_fn = data.views, classifier, data.collate
    train_view = _train_view(config, views["train"], seed)
    per_epoch = _steps_per_epoch(config, len(train_view), env.world_size)
    train_config = replace(config.train, out_dir=str(out_dir), seed=seed, eval_every=0, eval_every_epoch=True,
                           eval_at_start=False, checkpoint_every=config.train.checkpoint_every or per_epoch)
    total_steps = train_config.steps or train_config.epochs * per_epoch
    if not train_config.cycle_steps and train_config.warmup_steps >= total_steps:
        # Small data (a demo, a sweep's subset): a warmup meant for a longer run would never end.
        distributed.main_print(f"train.warmup_steps {train_config.warmup_steps} >= the run's {total_steps} steps: using {total_steps // 10}")
        train_config = replace(train_config, warmup_steps=total_steps // 10)
    unimodal_weight = config.loss.unimodal_weight if unimodal_losses(config, classifier.inputs) else 0.0
    dev_figures = config.outputs == "full" and config.tensorboard_extras
    _start_selection_over(out_dir, config.train.resume)
    task = ClassificationTask(criterion, config.target, class_names, views["dev"], collate_fn or default_collate,
                              eval_batch, out_dir, epoch_callback, dev_figures=dev_figures,
                              unimodal_weight=unimodal_weight)
    groups = None
    if config.strategy.name != "linear_probe" and config.strategy.layer_decay < 1.0:
        groups = decayed_groups(classifier, config.strategy.layer_decay, config.train.weight_decay,
                                decay_1d=config.train.decay_1d)
    # data.bucket_by_length: batches of clips (or texts) of similar length, so less padding; cached
    # embeddings (linear probe) have no length.
    bucket = config.data.bucket_by_length and config.strategy.name != "linear_probe"
    lengths = getattr(train_view, "lengths", None) if bucket else None
    trainer = Trainer(train_config, model, task, train_view, collate_fn=collate_fn, env=env, groups=groups,
                      lengths=lengths)
    task.trainer = trainer
    _write_status(out_dir, "running", seed=seed)
    # Until "complete": a Ctrl-C or error while test is scored and the outputs written (figures, a
    # full disk) is recorded too, not left as a run still "running".
    try:
        result = trainer.fit()
        model.load_state_dict(load_file(str(out_dir / BEST_WEIGHTS)))
        model.eval()
        outputs = {split: forward_all(model, views[split], collate_fn or default_collate, eval_batch, trainer.device,
                                      precision=trainer.precision)
                   for split in ("dev", "test")}
        gold = {split: labels_of(views[split], config.target) for split in outputs}
        doc = {split: classification_metrics(gold[split].tolist(), outputs[split]["logits"].argmax(-1).tolist(), class_names)
               for split in outputs}
        doc["rows"] = data.coverage()
        seconds = result.seconds
        if result.resumed_from == result.step and env.is_main:
            # A finished run given again trains nothing: it keeps the time its training took.
            seconds = _recorded_train_seconds(out_dir, seconds)
        # Only the main process evaluates, so only it holds the selection; every process returns the same doc.
        best, seconds = distributed.all_gather_object((task.best, seconds))[0]
        doc["selection"] = {**best, "seed": seed, "train_seconds": round(seconds, 1)}
        if env.is_main:
            spec = classifier_spec(classifier, target=config.target, class_names=class_names, head=head_shape,
                                   data=config.data, hf_max_tokens=config.model.hf_max_tokens)
            save_classifier(out_dir / "model", classifier.cpu(), spec, data.hf_tokenizer)
            write_run_outputs(out_dir, config, doc, outputs["test"], gold["test"], [u.key for u in views["test"].utterances],
                              class_names, step=trainer.step)
            _write_status(out_dir, "complete", seed=seed)
    except BaseException as err:
        if trainer.writer is not None:
            trainer.writer.close()
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "stopped"
        _write_status(out_dir, status, seed=seed, step=trainer.step, error=f"{type(err).__name__}: {err}")
        raise
    distributed.barrier()  # the outputs are complete before any process returns (and torchrun ends the run)
    return doc


def run_finetune(config: FinetuneConfig, *, out_dir: Path, epoch_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tune as ``config`` says into ``out_dir``; return the metrics.json document.

    ``epoch_callback(epoch, dev_metrics)`` runs after each epoch's dev evaluation (epochs count from
    1); an exception it raises propagates, after ``status.json`` records the stop and every file in
    ``out_dir`` is complete (all are written atomically).

    An ``out_dir`` holding a fine-tune run resumes it; one with other settings, or another command's
    run, is refused (OutDirError) before anything is written. Other files in it are the caller's to
    keep apart (the command line refuses a non-empty folder that holds no run).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, config)
    # The device is checked here (init_env), before anything is read: a machine without it writes no run folder.
    env = init_env(config.train)
    # Under torchrun every process names the folder; the default --out is a timestamp, which two
    # processes can read a second apart: all use the main process's.
    out_dir = Path(distributed.all_gather_object(str(out_dir))[0])
    if config.cache_root:
        check_folder_path(config.cache_root)
    if config.threads:
        torch.set_num_threads(config.threads)
    # The inputs are read and checked before out_dir is made, so a mistake in them leaves no run folder.
    clara = _load_clara(config)
    clara_config = clara.config if clara is not None else scratch_clara_config(config)
    data = _Data(config, clara_config)
    check_fits(config.train, len(data.datasets["train"]), env.world_size)  # the Trainer's check, before the folder
    _check_not_shorter(config, out_dir, _steps_per_epoch(config, len(data.datasets["train"]), env.world_size))
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_run(out_dir):
        return _run_seeds(config, data, clara, env, out_dir, epoch_callback)


def _run_seeds(config: FinetuneConfig, data: _Data, clara, env, out_dir: Path,
               epoch_callback: Callable[[int, dict], None] | None) -> dict:  # fmt: skip
    """Every seed of the run into ``out_dir``, which this command holds; the metrics.json document."""
    if env.is_main:
        config_lib.save_yaml(config, out_dir / CONFIG_FILE)
    folders = _seed_dirs(config, out_dir)
    seeds = list(folders)
    if len(seeds) == 1:
        return _run_seed(config, data, clara, env, out_dir, seeds[0], epoch_callback)
    # The top folder's status.json follows the seeds (each seed-<s>/ has its own): without it, a
    # multi-seed run showed nothing at the path a single-seed run (and a user's monitor) reads.
    docs: dict[int, dict] = {}
    running: dict[str, int] = {}  # {"seed": s} while seed s trains; empty while the seeds are summarised
    try:
        for seed, folder in folders.items():
            running = {"seed": seed}
            _write_status(out_dir, "running", **running, seeds=seeds, done=list(docs))
            docs[seed] = _run_seed(config, data, clara, env, folder, seed, epoch_callback)
        running = {}
        doc = _summarise_seeds(config, data, env, out_dir, docs)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "stopped"
        _write_status(out_dir, status, **running, seeds=seeds, done=list(docs), error=f"{type(err).__name__}: {err}")
        raise
    _write_status(out_dir, "complete", seeds=seeds)
    return doc


def _summarise_seeds(config: FinetuneConfig, data: _Data, env, out_dir: Path, docs: dict[int, dict]) -> dict:
    """The multi-seed metrics.json document; the best dev seed's classifier, predictions and confusion
    matrix copied up to ``out_dir``, beside the summary report."""
    seeds = list(docs)
    best = max(seeds, key=lambda seed: (docs[seed]["dev"]["macro_f1"], -seed))
    summary = mean_std([{"dev": docs[s]["dev"], "test": docs[s]["test"]} for s in seeds])
    doc = {"dev": docs[best]["dev"], "test": docs[best]["test"], "rows": data.coverage(), "selection": docs[best]["selection"],
           "mean_std": summary, "seeds": {str(s): {split: docs[s][split]["macro_f1"] for split in ("dev", "test")}
                                          for s in seeds}}
    if env.is_main:
        for name in ("model", "predictions.csv", "confusion_test.png"):
            source, target = out_dir / f"seed-{best}" / name, out_dir / name
            if source.is_dir():
                with atomic_directory(target) as staging:
                    shutil.copytree(source, staging, dirs_exist_ok=True)
            elif source.is_file():
                with atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
        write_seed_summary(out_dir, config, doc, TARGETS[config.target])
    distributed.barrier()
    return doc


def _new_run_dir(stamp: Path) -> Path:
    """The new folder ``stamp`` (``runs/finetune-<timestamp>``), or ``stamp-2``, ``stamp-3``, ... when taken, made
    now: runs started in the same second (a script launching several) would otherwise share one folder,
    the later ones refused as another command's or taking the first one's run for theirs."""
    stamp.parent.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        path = stamp if number == 1 else stamp.with_name(f"{stamp.name}-{number}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meld.finetune", description=describe(__doc__))
    parser.add_argument("--config", help="a fine-tune YAML or preset name (linear_probe, full, text_only); default: demo")
    parser.add_argument("--data", help="MELD root (MELD.Raw, or the CSVs alone for --modality text); default: the demo")
    parser.add_argument("--checkpoint", help="a CLARA checkpoint (our folder or the reference .ckpt); default: "
                        "a tiny CLARA from scratch")
    parser.add_argument("--modality", choices=("audio", "text", "both"),
                        help="data.modality: the inputs to classify (default: the config's, both in every preset but text_only)")
    parser.add_argument("--seeds", type=int, help="train N seeds and report mean ± std (default: the config's seeds, 1)")
    parser.add_argument("--out", help="run directory (default runs/finetune-<timestamp>); an existing one resumes")
    parser.add_argument("--cache", help="meld.prepare's --cache for the audio features")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. strategy.name=linear_probe loss.name=focal")
    args = parser.parse_intermixed_args(argv)
    flags = {"data_root": args.data, "model.checkpoint": args.checkpoint, "data.modality": args.modality,
             "seeds": args.seeds, "cache_root": args.cache}
    # JSON is valid YAML: paths with odd characters pass through the override parser unchanged.
    overrides = [*args.overrides, *(f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None)]
    out_dir = Path(args.out) if args.out else Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")
    made = None  # the default folder, which this command made
    try:
        if args.out is None and distributed.is_main():  # under torchrun every process uses the main one's folder
            out_dir = made = _new_run_dir(out_dir)
        config = load_config(args.config, overrides)
        claim(out_dir, KIND, holds_run)  # a folder with the user's files in it is not ours to write into
        doc = run_finetune(config, out_dir=out_dir)
    except config_lib.ConfigError as err:
        distributed.print_error(err, same_everywhere=True)
        return 2
    except (*USER_ERRORS, OSError) as err:  # OSError: e.g. an --out it cannot make, a disk that is full
        distributed.print_error(err, same_everywhere=False)
        return 2
    except KeyboardInterrupt:
        distributed.main_print(f"interrupted: run the same command with --out {out_dir} to resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
        if made is not None and made.is_dir() and not any(made.iterdir()):  # refused before the run began
            made.rmdir()
    if not distributed.is_main():  # the table once, from the main process
        return 0
    from meld.report import format_table, seed_cell, spread_label

    print()
    if "mean_std" in doc:
        print(f"the run selected on dev macro-F1 (seed {doc['selection']['seed']}); the mean over seeds follows")
    print(format_table(doc, TARGETS[config.target]))
    if "mean_std" in doc:
        stats = doc["mean_std"]
        test, runs = stats["test"], stats["runs"]
        print(f"\nover {runs} seeds: test macro-F1 {seed_cell(test['macro_f1'], runs)}, weighted-F1 "
              f"{seed_cell(test['weighted_f1'], runs)} (percent, {spread_label(runs)})")
    print(f"\nCSV rows used: {coverage_summary(doc['rows'])} (report.md names any left out)")
    print(f"\nrun directory: {out_dir}  (report.md, metrics.json, predictions.csv, model/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
