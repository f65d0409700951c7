"""Settings of ``python -m meld.finetune``: one frozen dataclass tree, loaded from YAML plus overrides.

    data:     meld.dataset.DataConfig (modality, dialogue context, audio cache key, eval batch size)
    model:    the classifier on CLARA (checkpoint, features, fusion, head, optional transformers text)
    strategy: linear_probe | partial | full, with top-k unfreezing and layer-wise LR decay
    loss:     ce | weighted_ce | focal, class-weight power, balanced sampling
    train:    clara.engine.TrainConfig (the one training engine's settings; out_dir is set per run)

``configs/finetune/demo.yaml`` holds the defaults of the no-argument demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clara.config import ConfigError, check_overrides, format_fields
from clara.engine import TrainConfig
from meld.dataset import DataConfig

Fusion = Literal["concat", "gated", "attention"]
Strategy = Literal["linear_probe", "partial", "full"]
DEFAULT_PROMPT = "a person talking in a {label} voice"


def _at_least(key: str, value: float, low: float) -> None:
    """One ConfigError naming the setting, its bound and the value given."""
    if value < low:
        raise ConfigError(f"{key} must be >= {low:g}, got {value}")


def _fraction(key: str, value: float) -> None:
    """One ConfigError naming a dropout-like setting outside [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class ModelConfig:
    clara: str = "tiny"  # architecture when no checkpoint is given: a preset name or a model YAML (from scratch)
    checkpoint: str = ""  # a CLARA checkpoint: our folder or the reference .ckpt; "" = `clara` from scratch
    allow_pickle: bool = False  # only for reference checkpoints you trust (see clara.checkpoint)
    # key=value CLARA settings applied to `clara` (from scratch) and to a loaded `checkpoint` alike, for the
    # switches that change how the model runs, not its tensors: attention=sdpa_cudnn, selective_recompute=true,
    # activation_checkpointing=true, audio.latent_stream=autocast, audio.latent_qkv=split,
    # audio.geglu_kernel=triton, mask_padding=false.
    # A checkpoint refuses one that changes tensor shapes (e.g. audio.layers) with its usual error.
    clara_overrides: tuple[str, ...] = ()
    features: Literal["projected", "pooled"] = "projected"  # CLARA's joint-space embedding, or the tower's pooled features
    hf_text: str = ""  # a LOCAL transformers model folder (e.g. RoBERTa); mean-pooled text features
    hf_text_mode: Literal["replace", "beside"] = "replace"  # in place of CLARA's text tower, or as a third input
    hf_max_tokens: int = 256
    fusion: Fusion = "concat"
    fusion_dim: int = 128  # width of the gated / attention fusion space
    hidden_dim: int = 0  # 0: a linear head on the fused features; > 0: one hidden layer of this width
    dropout: float = 0.1
    modality_dropout: float = 0.0  # training: chance that an example loses one of its inputs (see meld.fusion)
    zero_shot_init: bool = False  # audio block of a linear concat head = class prompt embeddings
    prompt: str = DEFAULT_PROMPT  # {label} is replaced by each class name

    def __post_init__(self) -> None:
        check_overrides(self.clara_overrides, "model.clara_overrides")  # what they set: on the model
        _at_least("model.fusion_dim", self.fusion_dim, 1)
        _at_least("model.hidden_dim", self.hidden_dim, 0)
        _at_least("model.hf_max_tokens", self.hf_max_tokens, 3)
        _fraction("model.dropout", self.dropout)
        _fraction("model.modality_dropout", self.modality_dropout)
        # zero_shot_init fills it in with str.format, mid-run: another field ("a {tone} voice") failed there
        # with a KeyError, and "{{label}}" (a literal brace pair) gave every class the same prompt.
        if set(format_fields(self.prompt, "model.prompt")) != {"label"}:
            raise ConfigError(f"model.prompt must contain {{label}} and no other field in braces, got {self.prompt!r}")
        try:
            self.prompt.format(label="label")  # a conversion or format spec may still fail ("!z")
        except ValueError as err:
            raise ConfigError(f"model.prompt: {self.prompt!r} is not a valid format string ({err})") from None


@dataclass(frozen=True)
class StrategyConfig:
    name: Strategy = "full"
    unfreeze_layers: int = 1  # partial: the top k transformer / latent layers of each tower (and all above them)
    layer_decay: float = 1.0  # LR multiplier per layer going down from the head; 1 = one rate for all
    embed_batch_size: int = 64  # linear_probe: batch size of the one-off encoding pass

    def __post_init__(self) -> None:
        if self.unfreeze_layers < 0:
            raise ConfigError(f"strategy.unfreeze_layers must be >= 0, got {self.unfreeze_layers}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"strategy.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.embed_batch_size < 1:
            raise ConfigError(f"strategy.embed_batch_size must be >= 1, got {self.embed_batch_size}")


@dataclass(frozen=True)
class LossConfig:
    name: Literal["ce", "weighted_ce", "focal"] = "weighted_ce"
    class_weight_power: float = 0.5  # weight of class c = (mean count / count_c) ** power; 0 = unweighted
    focal_gamma: float = 2.0
    focal_weighted: bool = True  # focal loss with the class weights as its alpha
    label_smoothing: float = 0.0
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: every class equally likely per draw
    unimodal_weight: float = 0.0  # with several inputs: each one's own head adds this times its loss

    def __post_init__(self) -> None:
        _at_least("loss.class_weight_power", self.class_weight_power, 0)
        _at_least("loss.focal_gamma", self.focal_gamma, 0)
        _at_least("loss.unimodal_weight", self.unimodal_weight, 0)
        _fraction("loss.label_smoothing", self.label_smoothing)
        # FocalLoss takes hard targets only; a smoothing it never applied would still be recorded as the run's.
        if self.name == "focal" and self.label_smoothing:
            raise ConfigError(f"loss.label_smoothing is {self.label_smoothing}, but loss.name focal has no label "
                              "smoothing; set loss.label_smoothing=0, or loss.name ce or weighted_ce")


@dataclass(frozen=True)
class FinetuneConfig:
    data_root: str = ""  # a MELD folder (MELD.Raw, or CSVs only for modality text); "" = the built-in demo
    cache_root: str = ""  # meld.prepare's --cache; "" = its default for the data root
    target: Literal["emotion", "sentiment"] = "emotion"
    seeds: int = 1  # runs with seeds train.seed, train.seed + 1, ...; the report gives mean ± std
    prepare: bool = True  # for audio: bring the feature cache up to date first (a no-op when it is)
    # TensorBoard beyond its scalars: the dev confusion figure at each new best, and at the end hparams,
    # the test confusion figure, PR curves and the test-set projector. false: scalars only.
    tensorboard_extras: bool = True
    # What is drawn, in files and in TensorBoard. light (sweep trials): no confusion PNG or figures, PR
    # curves or projector, which cost a linear-probe run several times its training; metrics,
    # predictions, report.md tables and TensorBoard scalars (and hparams, with tensorboard_extras) are
    # still written
    outputs: Literal["full", "light"] = "full"
    threads: int = 0  # torch intra-op CPU threads; 0 = torch's default. Tiny models run best on 1, and
    #                   on a shared CPU more threads spin-wait for each other (10x slower was measured)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {self.seeds}")
        # In either hf_text_mode: beside an audio-only run it was loaded, then never read (no text input).
        if self.model.hf_text and self.data.modality == "audio":
            raise ConfigError("model.hf_text is a text encoder; use data.modality text or both with it")
        if self.model.zero_shot_init:
            if not self.data.uses_audio or self.model.fusion != "concat" or self.model.hidden_dim:
                raise ConfigError("model.zero_shot_init needs audio in data.modality, fusion concat and hidden_dim 0")
            if self.model.features != "projected":
                raise ConfigError("model.zero_shot_init needs model.features projected (the joint audio-text space)")
