"""CLARA contrastive pretraining: ``python -m clara.pretrain [--config YAML] [key=value ...]``.

Without ``--config`` the settings come from ``configs/pretrain/demo.yaml``: a synthetic
audio-caption set is built in the cache (``$MELD_CLARA_CACHE`` or ``~/.cache/meld-clara``) and the
tiny model pretrains on it in about a minute on 2 CPU cores, printing progress and a summary of held-out
retrieval before and after.  ``configs/pretrain/reference.yaml`` documents the reference recipe.
Several processes: ``torchrun --nproc_per_node N -m clara.pretrain ...`` (negatives are gathered
from every process).

Outputs in ``train.out_dir``: ``checkpoint.pt`` (the training state, for resuming), ``model/``
(the weights, for ``clara.checkpoint.load_checkpoint``), ``config.yaml``, ``metrics.jsonl`` and
``tensorboard/``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from clara import config as config_lib
from clara import distributed
from clara.audio_frontend import N_MELS, SAMPLE_RATE, LogMel, num_frames
from clara.audio_io import AudioDecodeError
from clara.augment import AugmentConfig, MelAugment, WaveAugment, check_config
from clara.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clara.cli import describe
from clara.demo_pairs import build_demo
from clara.engine import TrainConfig, Trainer, init_env, seed_everything
from clara.loss import ContrastiveLoss
from clara.model import Clara
from clara.model_config import CONFIG_ROOT, ClaraConfig, load_model_config, result_overrides
from clara.pretrain_data import (DataConfig, DataError, EnvMixDataset, PairDataset, PretrainCollate, pad_tokens,
                                 padded_samples)
from clara.retrieval import chance_levels, in_batch_top1, retrieval_metrics
from clara.run_dir import CONFIG_FILE, check_resumable, claim, exclusive_run, same_path, saved_config
from clara.tokenizer import Tokenizer

DEMO_CONFIG = CONFIG_ROOT / "pretrain" / "demo.yaml"
KIND = "clara.pretrain"
# Settings a run may be resumed with when they differ from its config.yaml: how it runs, how often it
# logs, evaluates or saves (evaluation restores the RNG, so it never changes training), and where the
# folder is; not what it computes. train.steps and train.epochs are here too: a run given more steps
# continues from its checkpoint (how the tests interrupt a run and resume it).
MAY_DIFFER_ON_RESUME = frozenset({
    "train.steps", "train.epochs", "train.progress", "train.print_logs", "train.log_every", "train.num_workers", "train.device",
    "train.resume", "train.checkpoint_every", "train.out_dir", "train.eval_every", "train.eval_every_epoch",
    "train.eval_at_start", "train.compile", "train.compile_mode", "train.compile_recompute",
    "train.compile_tuning", "train.find_unused_parameters", "data.eval_batch_size", "data.cache_audio", "init_allow_pickle",
})


# Settings that name files or folders: a resume compares them as paths (clara.run_dir.same_path).
PATH_KEYS = ("model", "init", "data.train", "data.eval", "data.env", "data.demo_dir")


@dataclass(frozen=True)
class PretrainConfig:
    model: str = "tiny"  # a preset name (tiny, small, medium, large) or a model YAML
    init: str = ""  # start from these weights (our checkpoint folder or the reference .ckpt); replaces `model`
    # key=value settings applied to `model` and to `init` alike, for switches that change how the model
    # runs, not its tensors (attention=sdpa_cudnn, selective_recompute=true, activation_checkpointing=true,
    # audio.latent_stream=autocast, audio.latent_qkv=split, audio.geglu_kernel=triton, mask_padding=false);
    # `init` refuses one that changes tensor shapes with its usual error.
    model_overrides: tuple[str, ...] = ()
    init_allow_pickle: bool = False  # `init` is a reference .ckpt holding pickled objects, from a source you trust
    tokenizer_merges: Literal["reference", "corrected"] = "reference"
    gather: bool = True  # negatives from every process under torchrun
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        config_lib.check_overrides(self.model_overrides, "model_overrides")  # what they set: on the model


class ContrastiveTask:
    """Augment -> log-mel -> mask -> both towers -> symmetric contrastive loss; held-out retrieval."""

    def __init__(
        self,
        augment: AugmentConfig,
        device: torch.device,
        *,
        gather: bool,
        eval_data: PairDataset | None = None,
        tokenizer: Tokenizer | None = None,
        eval_batch_size: int = 64,
        frames_multiple: int = 1,
        tokens_multiple: int = 1,
    ) -> None:
        self.device = device
        self.frontend = LogMel().to(device)
        self.wave_augment = WaveAugment(augment)
        self.mel_augment = MelAugment(augment.masking)
        self.loss = ContrastiveLoss(gather=gather)
        self.eval_data = eval_data
        self.tokenizer = tokenizer
        self.eval_batch_size = eval_batch_size
        self.frames_multiple, self.tokens_multiple = frames_multiple, tokens_multiple  # data.*, for evaluation's batches
        if eval_data is not None:
            # Held-out texts can repeat: embed each (caption, language) once, in its row's language as
            # training encodes it (`<|de|><|speech|> ...`); text_of_audio[i] is audio i's text.
            texts = [(record.caption, record.language or eval_data.language) for record in eval_data.records]
            self.eval_texts = sorted(set(texts))
            position = {text: i for i, text in enumerate(self.eval_texts)}
            self.text_of_audio = torch.tensor([position[text] for text in texts])
            self.chance = chance_levels(self.text_of_audio, len(self.eval_texts))

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        wave = self.wave_augment(batch["wave"], batch["wave_lengths"])  # [B, N]
        mel, frames = self.frontend(wave, batch["wave_lengths"])  # [B, 80, T], [B]
        mel = self.mel_augment(mel, frames)
        out = model(mel, batch["tokens"], frames, batch["token_lengths"])
        # [N, N]: N = B, or every process's W·B pairs when negatives are gathered; the in-batch accuracy
        # is taken over the same candidates as the loss, so one process of W·B logs what W of B do.
        similarity = self.loss.similarity(out.audio_embeds, out.text_embeds)
        loss = self.loss.from_similarity(similarity, out.audio_scale, out.text_scale)
        a2t, t2a = in_batch_top1(similarity.detach())
        logs = {"audio_scale": out.audio_scale.detach(), "text_scale": out.text_scale.detach(), "a2t_top1": a2t, "t2a_top1": t2a}
        return loss, logs

    def evaluate(self, model: Clara) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        collate = PretrainCollate(self.tokenizer, frames_multiple=self.frames_multiple, tokens_multiple=self.tokens_multiple)
        audio = []
        for batch in DataLoader(self.eval_data, batch_size=self.eval_batch_size, collate_fn=collate):
            mel, frames = self.frontend(batch["wave"].to(self.device), batch["wave_lengths"].to(self.device))
            audio.append(model.encode_audio(mel, frames).float())
        texts = []
        for start in range(0, len(self.eval_texts), self.eval_batch_size):
            captions, languages = zip(*self.eval_texts[start : start + self.eval_batch_size])
            tokens, lengths = self.tokenizer.encode_batch(captions, languages)
            tokens = pad_tokens(tokens, self.tokens_multiple, self.tokenizer)
            texts.append(model.encode_text(tokens.to(self.device), lengths.to(self.device)).float())
        return retrieval_metrics(torch.cat(audio), torch.cat(texts), self.text_of_audio.to(self.device))


def load_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    config = config_lib.load(PretrainConfig, path if path is not None else DEMO_CONFIG, overrides)
    check_config(config.augment)
    if not config.data.train:
        raise config_lib.ConfigError("data.train: set a manifest (.jsonl/.csv), tar shards, or 'demo'")
    return config


def resolve_demo(config: PretrainConfig, env: distributed.DistEnv) -> PretrainConfig:
    """``data.train=demo``: build the synthetic set (main process first) and point the data at it."""
    if config.data.train != "demo":
        return config
    if env.is_main:
        build_demo(config.data.demo_dir or None)
    distributed.barrier()
    paths = build_demo(config.data.demo_dir or None)  # finds the finished build
    data = config.data
    data = replace(data, train=str(paths.train), eval=data.eval or str(paths.eval), env=data.env or str(paths.env))
    return replace(config, data=data)


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a pretraining run (a config.yaml that reads as pretraining settings)."""
    return saved_config(path, PretrainConfig) is not None


def check_out_dir(config: PretrainConfig) -> None:
    """Refuse, before anything is written, a ``train.out_dir`` that is a file, holds another command's
    run, or holds a pretraining run with other settings than ``config`` (see MAY_DIFFER_ON_RESUME)."""
    check_resumable(config.train.out_dir, config, KIND, MAY_DIFFER_ON_RESUME, "train.out_dir",
                    {"model_overrides": result_overrides,  # speed and memory switches may change
                     **{key: same_path for key in PATH_KEYS}})


def build_model(config: PretrainConfig) -> Clara:
    overrides = config.model_overrides
    with config_lib.noting(f"with model_overrides {list(overrides)}" if overrides else "", CheckpointError,
                           config_lib.ConfigError):  # fmt: skip
        if config.init:
            return load_checkpoint(config.init, allow_pickle=config.init_allow_pickle, overrides=overrides).train()
        return Clara(load_model_config(config.model, overrides))


def check_clip_fits(data: DataConfig, max_positions: int) -> None:
    """Refuse, before any data is read, a ``data.max_seconds`` clip that (padded to
    ``data.frames_multiple``) would overflow the audio encoder's position table: its stride-2
    convolution gives ceil(frames / 2) positions.  Otherwise the first long batch fails mid-training."""
    frames = num_frames(padded_samples(math.ceil(data.max_seconds * SAMPLE_RATE), data.frames_multiple))
    if -(-frames // 2) > max_positions:
        raise config_lib.ConfigError(
            f"data.max_seconds ({data.max_seconds}) with data.frames_multiple ({data.frames_multiple}) makes clips of "
            f"up to {frames} mel frames, more than the model's {max_positions}-position audio table holds "
            f"({2 * max_positions} frames); use a shorter data.max_seconds or a multiple that divides {2 * max_positions}")


def check_model_inputs(model: ClaraConfig) -> None:
    """Refuse, before any data is read, a model (``model``, ``init`` or ``model_overrides``) that cannot
    take pretraining's inputs: the task's log-mels have N_MELS bins and the tokenizer's ids run up to
    its vocabulary.  Otherwise the first batch fails inside the model, with a traceback."""
    problems = []
    if model.audio.n_mels != N_MELS:
        problems.append(f"audio.n_mels is {model.audio.n_mels}, but pretraining's log-mels have {N_MELS} bins")
    if model.text.vocab_size < Tokenizer.vocab_size:
        problems.append(f"text.vocab_size is {model.text.vocab_size}, below the tokenizer's {Tokenizer.vocab_size} ids")
    if problems:
        raise config_lib.ConfigError("model: " + "; ".join(problems))


def mixing_warning(config: PretrainConfig) -> str | None:
    """A warning when ``augment.mix`` asks for mixing that cannot happen: with no ``data.env`` there
    are no environmental sounds, and the run would otherwise train unmixed without a word."""
    if config.augment.mix.p > 0 and not config.data.env:
        return (f"augment.mix.p is {config.augment.mix.p} but data.env is empty, so no environmental sounds are mixed "
                "in; set data.env to a manifest or shards of them, or augment.mix.p=0 to silence this")
    return None


def run(config: PretrainConfig) -> dict[str, Any]:
    """Pretrain as ``config`` says; returns the summary (also printed on the main process).

    A ``train.out_dir`` holding a pretraining run resumes it; one with other settings, or another
    command's run, is refused (OutDirError) before anything is written. Other files in it are the
    caller's to keep apart (the command line refuses a non-empty folder that holds no run).
    """
    env = init_env(config.train)
    config = resolve_demo(config, env)
    check_out_dir(config)  # after resolve_demo: a run's config.yaml holds the demo's resolved paths
    seed_everything(config.train.seed)  # the same initial weights in every process
    model = build_model(config)
    data = config.data
    check_clip_fits(data, model.config.audio.max_positions)
    check_model_inputs(model.config)
    tokenizer = Tokenizer(language=data.language, merges=config.tokenizer_merges, max_length=model.config.text.max_positions)
    train_data = PairDataset(data.train, max_seconds=data.max_seconds, language=data.language, cache_audio=data.cache_audio)
    warning = mixing_warning(config)  # once the data is known to load: a mistake there is the one message
    if warning:
        distributed.main_print(f"warning: {warning}", file=sys.stderr)
    if data.env and config.augment.mix.p > 0:
        env_data = PairDataset(data.env, max_seconds=data.max_seconds, language=data.language, cache_audio=data.cache_audio)
        train_data = EnvMixDataset(train_data, env_data, config.augment.mix, seed=config.train.seed)
    # Only the main process evaluates.
    eval_data = None
    if data.eval and env.is_main:
        eval_data = PairDataset(data.eval, max_seconds=data.max_seconds, language=data.language, cache_audio=True)
    task = ContrastiveTask(
        config.augment, env.device, gather=config.gather, eval_data=eval_data, tokenizer=tokenizer,
        eval_batch_size=data.eval_batch_size, frames_multiple=data.frames_multiple, tokens_multiple=data.tokens_multiple,
    )  # fmt: skip
    collate = PretrainCollate(tokenizer, frames_multiple=data.frames_multiple, tokens_multiple=data.tokens_multiple)
    trainer = Trainer(config.train, model, task, train_data, collate_fn=collate, env=env)
    out_dir = Path(config.train.out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_run(out_dir):  # one command at a time in a run folder
        if env.is_main:
            config_lib.save_yaml(config, out_dir / CONFIG_FILE)
        result = trainer.fit()
        summary: dict[str, Any] = {"steps": result.step, "seconds": round(result.seconds, 1), "out_dir": str(out_dir)}
        if env.is_main:
            save_checkpoint(model, out_dir / "model")
            if result.history:
                summary["final_loss"] = result.history[-1]["train/loss"]
            if result.evaluations:
                summary["eval_first"], summary["eval_last"] = result.evaluations[0], result.evaluations[-1]
            if eval_data is not None:
                summary["chance"] = task.chance
            _print_summary(summary, len(train_data), eval_data)
        distributed.barrier()
    return summary


def _print_summary(summary: dict[str, Any], train_size: int, eval_data: PairDataset | None) -> None:
    print(f"\npretrained {summary['steps']} steps on {train_size} pairs in {summary['seconds']} s")
    if "final_loss" in summary:
        print(f"final training loss {summary['final_loss']:.4f}")
    if eval_data is not None and "eval_last" in summary:
        first, last, chance = summary["eval_first"], summary["eval_last"], summary["chance"]
        steps = f"step {last['step']}" if first is last else f"step {first['step']} -> step {last['step']}"
        print(f"held-out retrieval on {len(eval_data)} clips ({steps}; chance):")
        for key in chance:
            before = "" if first is last else f"{first['eval/' + key]:.3f} -> "
            print(f"  {key:<10} {before}{last['eval/' + key]:.3f}   (chance {chance[key]:.3f})")
    print(f"weights: {summary['out_dir']}/model   training state: {summary['out_dir']}/checkpoint.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clara.pretrain", description=describe(__doc__))
    parser.add_argument("--config", help=f"a pretraining YAML (default: {DEMO_CONFIG.relative_to(CONFIG_ROOT.parent)})")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.steps=100 augment.reverb.p=0.5")
    args = parser.parse_intermixed_args(argv)
    config = None
    try:
        config = load_config(args.config, args.overrides)
        claim(config.train.out_dir, KIND, holds_run)  # a folder with the user's files in it is not ours to write into
        run(config)
    except config_lib.ConfigError as err:
        distributed.print_error(err, same_everywhere=True)
        return 2
    except (DataError, CheckpointError, AudioDecodeError, OSError) as err:  # OSError: an out_dir it cannot make, a full disk
        distributed.print_error(err, same_everywhere=False)
        return 2
    except KeyboardInterrupt:
        # The engine saved the last finished step to out_dir/checkpoint.pt, if training had started.
        where = f" (train.out_dir={config.train.out_dir})" if config is not None else ""
        distributed.main_print(f"interrupted: run the same command{where} to resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
