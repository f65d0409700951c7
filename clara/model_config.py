"""CLARA's architecture settings, and the named presets in ``configs/model/``.

Field defaults are the reference "medium" (100M) model.  ``from_reference_hparams`` maps the
``hyper_parameters`` of a reference Lightning checkpoint onto these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from clara import config as config_lib


def _config_root() -> Path:
    """The YAML presets: ``clara/configs/`` in an installed wheel (package data, see pyproject.toml),
    else the ``configs/`` folder of the source checkout (a clone, an editable install)."""
    package = Path(__file__).resolve().parent
    shipped = package / "configs"
    return shipped if shipped.is_dir() else package.parent / "configs"


CONFIG_ROOT = _config_root()
PRESET_DIR = CONFIG_ROOT / "model"
PRESETS = ("tiny", "small", "medium", "large")

Attention = Literal["eager", "sdpa", "sdpa_cudnn", "flash_attn"]


def _size_problems(config: object, may_be_zero: tuple[str, ...] = ()) -> list[str]:
    """Each integer field of ``config`` below 1 (below 0 for ``may_be_zero``), worded for its error.
    Such a size passes the type check but fails later, deep in torch (a zero-division, an empty
    reshape) or silently (a negative layer count builds no layers)."""
    problems = []
    for item in fields(config):
        value = getattr(config, item.name)
        if type(value) is not int:
            continue
        floor = 0 if item.name in may_be_zero else 1
        if value < floor:
            problems.append(f"{item.name} must be at least {floor}, got {value}")
    return problems


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 50373
    width: int = 512  # token embedding width = transformer d_model
    layers: int = 10
    heads: int = 8
    ff_dim: int = 1024
    out_channels: int = 512  # width after the encoder's ``project`` Linear
    fc_dim: int = 512  # width of ``text_fc1`` after pooling
    max_positions: int = 4096
    dropout: float = 0.5  # post-LN layers' dropout (the reference's ``text_encoder_seq_dropout_prob``)
    positions: Literal["learned", "sinusoidal"] = "learned"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = _size_problems(self, may_be_zero=("layers",))
        if self.heads >= 1 and self.width % self.heads:
            problems.append(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            problems.append(f"layer_norm_eps must be above 0, got {self.layer_norm_eps}")
        if problems:
            raise config_lib.ConfigError("text: " + "; ".join(problems))


@dataclass(frozen=True)
class AudioConfig:
    n_mels: int = 80
    width: int = 512  # conv head channels = Perceiver input (context) width
    max_positions: int = 4096  # position table after the stride-2 conv
    num_latents: int = 512
    latent_dim: int = 512
    layers: int = 10  # latent self-attention blocks after the one cross-attention
    cross_heads: int = 2
    latent_heads: int = 16
    cross_dim_head: int = 64
    latent_dim_head: int = 64
    ff_mult: int = 4
    fc_dim: int = 512  # width of ``audio_fc1`` after pooling over the latent feature axis
    token_keep: float = 0.5  # training only: fraction of audio tokens kept before cross-attention
    cross_attention: Literal["softmax", "gelu"] = "softmax"
    # Under autocast, "autocast" runs the latents' residual stream in the autocast dtype (bf16/fp16):
    # fewer bytes saved for backward and moved by the fused norm/residual kernels of a compiled
    # model, but in eager mode autocast then casts it back to fp32 before every norm (measured 6%
    # slower on an H200).  "fp32" keeps the stream in fp32, as the reference does.  No effect in fp32.
    latent_stream: Literal["fp32", "autocast"] = "fp32"
    # How the latent blocks compute Q, K and V from their one fused weight [3·H·d, D]: "fused" as one
    # product whose output [B, N, 3, H, d] is viewed as three strided heads tensors; "split" as three
    # products over the weight's thirds, each [B, N, H·d] and so a dense transpose of [B, H, N, d].
    # Same numbers and checkpoint.  Why split: cuDNN's attention (attention=sdpa_cudnn) allocates
    # gradients (and outputs) like its inputs, so dense heads tensors give dQ, dK, dV and the output
    # in [B, N, H, d] memory, which the projections' matmuls read as they are, where the fused form's
    # strided views make the backward stack and transpose dQ, dK, dV (0.9 ms of a 36.8 ms step on an
    # H200).  Measured on an H200 with cuDNN's attention it changed little: training +0.5%,
    # inference -1.3%, both about the size of run-to-run noise.
    latent_qkv: Literal["fused", "split"] = "fused"
    # The GEGLU feed-forwards' a·GELU(g) and its backward: "pytorch" as PyTorch ops (fused by
    # torch.compile), "triton" by clara.geglu_kernel's hand-written kernels on CUDA tensors (the
    # same formulas elsewhere).  Same parameters and numbers up to rounding; speed not yet measured.
    geglu_kernel: Literal["pytorch", "triton"] = "pytorch"

    def __post_init__(self) -> None:
        problems = _size_problems(self, may_be_zero=("layers",))
        # Perceiver.forward drops tokens only below 1, and keep_random_tokens keeps at least one token,
        # so a keep above 1 or at or below 0 would quietly mean 1 or "one token".
        if not 0.0 < self.token_keep <= 1.0:
            problems.append(f"token_keep must be in (0, 1], got {self.token_keep}")
        if problems:
            raise config_lib.ConfigError("audio: " + "; ".join(problems))


@dataclass(frozen=True)
class ClaraConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    output_dim: int = 512
    mask_padding: bool = True  # False reproduces the reference exactly (padding is attended and pooled)
    # The attention kernels (clara.attention): "sdpa" leaves out cuDNN's, which plan per new shape;
    # "sdpa_cudnn" lets PyTorch pick them (first on H100/H200), for fixed-shape batches.
    attention: Attention = "sdpa"
    # Training only: recompute each transformer/latent block in the backward pass instead of keeping
    # its activations (less memory for big batches, about a third more compute).
    activation_checkpointing: bool = False
    # Training only: the latent blocks keep just their matmul and attention outputs for backward and
    # recompute norms and activations (clara.recompute): about a quarter less activation memory, for
    # speed: CLARA medium at batch 256 on an H200, compiled, peaked at 28.1 GiB instead of 35.6 and ran
    # 16% slower (1,599 samples/s instead of 1,911).  Ignored when activation_checkpointing is on.
    selective_recompute: bool = False
    init_temperature: float = 0.07  # both learnable temperatures start at ln(1 / init_temperature)

    def __post_init__(self) -> None:
        # Every bad field in one error, as TextConfig and AudioConfig do (output_dim is the only size).
        problems = _size_problems(self)
        # Its log is taken: 0 and below fail there, and inf (which only Python code can pass; the YAML
        # loader refuses it) gave a bare "math domain error" when the model was built.
        if not 0 < self.init_temperature < math.inf:
            problems.append(f"init_temperature must be above 0 and finite, got {self.init_temperature}")
        if problems:
            raise config_lib.ConfigError("; ".join(problems))


# ClaraConfig keys that change how the model runs (kernels, what backward keeps, the latents'
# residual dtype, how Q/K/V are multiplied), not its tensors or what it computes beyond rounding: a
# run may be resumed with them changed, as with the engine's compile settings (clara.run_dir).
EXECUTION_KEYS = frozenset({"attention", "activation_checkpointing", "selective_recompute",
                            "audio.latent_stream", "audio.latent_qkv", "audio.geglu_kernel"})


def result_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """The ``key=value`` model overrides that bear on results (those not in EXECUTION_KEYS), parsed
    and sorted, so two override lists can be compared for a resume.  Of a key given twice the last
    value counts, as where the overrides are applied; keeping both compared their values in the sort
    (a TypeError for 2 and 'x', or for two mappings)."""
    parsed = {".".join(path): value for path, value in map(config_lib.parse_override, overrides)}
    return sorted((key, value) for key, value in parsed.items() if key not in EXECUTION_KEYS)


def preset_path(name: str) -> Path:
    return PRESET_DIR / f"{name}.yaml"


def load_model_config(name_or_path: str | Path = "medium", overrides: Sequence[str] = ()) -> ClaraConfig:
    """A preset name (``tiny``/``small``/``medium``/``large``) or a YAML path, plus overrides."""
    path = Path(name_or_path)
    if str(name_or_path) in PRESETS:
        path = preset_path(str(name_or_path))
    elif not path.exists():
        raise config_lib.ConfigError(
            f"{name_or_path}: not a model preset ({', '.join(PRESETS)}) and no such YAML file"
        )
    return config_lib.load(ClaraConfig, path, overrides)


# The reference LightningModule's constructor defaults: what a checkpoint means when its
# ``hyper_parameters`` leave a field out.
_REFERENCE_DEFAULTS = {
    "output_dim": 512,
    "text_encoder_embedding": 1024,
    "text_encoder_pos_embedding_size": 1024,
    "text_encoder_layers": 1,
    "text_encoder_heads": 4,
    "text_encoder_out_channels": 512,
    "text_encoder_project": 512,
    "text_encoder_seq_dropout_prob": 0.5,
    "vocab_size": 50373,
    "n_mels": 80,
    "audio_encoder_layers": 5,
    "audio_encoder_embedding": 512,
    "audio_encoder_pos_embedding_size": 4096,
    "audio_encoder_num_latents": 512,
    "audio_encoder_latent_dim": 512,
    "audio_encoder_project": 512,
    "audio_encoder_cross_heads": 1,
    "audio_encoder_latent_heads": 8,
    "audio_encoder_cross_dim_head": 64,
    "audio_encoder_latent_dim_head": 64,
    "audio_encoder_seq_dropout_prob": 0.5,
}

_REFERENCE_FIELDS = {
    "output_dim": ("output_dim",),
    "text_encoder_embedding": ("text", "width"),
    "text_encoder_pos_embedding_size": ("text", "max_positions"),
    "text_encoder_layers": ("text", "layers"),
    "text_encoder_heads": ("text", "heads"),
    "text_encoder_out_channels": ("text", "out_channels"),
    "text_encoder_project": ("text", "fc_dim"),
    "text_encoder_seq_dropout_prob": ("text", "dropout"),
    "vocab_size": ("text", "vocab_size"),
    "n_mels": ("audio", "n_mels"),
    "audio_encoder_layers": ("audio", "layers"),
    "audio_encoder_embedding": ("audio", "width"),
    "audio_encoder_pos_embedding_size": ("audio", "max_positions"),
    "audio_encoder_num_latents": ("audio", "num_latents"),
    "audio_encoder_latent_dim": ("audio", "latent_dim"),
    "audio_encoder_project": ("audio", "fc_dim"),
    "audio_encoder_cross_heads": ("audio", "cross_heads"),
    "audio_encoder_latent_heads": ("audio", "latent_heads"),
    "audio_encoder_cross_dim_head": ("audio", "cross_dim_head"),
    "audio_encoder_latent_dim_head": ("audio", "latent_dim_head"),
}
# Reference hyper-parameters that do not change the architecture (optimiser, scheduler, dropouts
# that the reference builds but never applies).
_REFERENCE_IGNORED = {
    "text_encoder_width",
    "text_encoder_project_dropout_prob",
    "audio_encoder_project_dropout_prob",
    "learning_rate",
    "learning_rate_patience",
    "LR_sheduler_T_max",
    "LR_sheduler_warmup_steps",
    "LR_sheduler_min_lr",
    "LR_sheduler_decay",
    "lr_interval",
}


def _probability(value: Any, where: str) -> float:
    """A dropout probability as a float; anything else (None, a word, a bool) is a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise config_lib.ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise config_lib.ConfigError(f"{where}: expected a number, got {value!r}") from None


def from_reference_hparams(hparams: Mapping[str, Any], *, source: str = "hyper_parameters") -> ClaraConfig:
    """Map a reference checkpoint's ``hyper_parameters`` onto a ``ClaraConfig``.

    Fields the checkpoint leaves out take the reference constructor's defaults; unknown
    architecture fields are an error (training-only settings and ``_``-prefixed bookkeeping are
    skipped).
    """
    data: dict[str, Any] = {"audio": {}, "text": {}}
    unknown = []
    for key, value in {**_REFERENCE_DEFAULTS, **dict(hparams)}.items():
        if key in _REFERENCE_FIELDS:
            target = data
            *parents, leaf = _REFERENCE_FIELDS[key]
            for parent in parents:
                target = target[parent]
            target[leaf] = value
        elif key == "audio_encoder_seq_dropout_prob":
            data["audio"]["token_keep"] = 1.0 - _probability(value, f"{source}: {key}")
        elif key == "audio_encoder_weight_tie_layers":
            if value:
                raise config_lib.ConfigError(f"{source}: tied Perceiver layers are not supported")
        elif key not in _REFERENCE_IGNORED and not key.startswith("_"):
            # Leading-underscore keys are the trainer's bookkeeping, not architecture: Lightning's
            # CLI (2.1 and later) stores ``_instantiator`` and ``_class_path`` beside the arguments.
            unknown.append(key)
    if unknown:
        raise config_lib.ConfigError(f"{source}: unknown reference hyper-parameter(s) {', '.join(sorted(unknown))}")
    return config_lib.from_dict(ClaraConfig, data, source=source)
