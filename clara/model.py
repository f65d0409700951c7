"""The CLARA model: two towers, two projection heads, one learnable temperature per modality.

Every driver in the kit (pretraining, zero-shot, linear probe, fine-tuning) goes through the same
two calls, ``encode_audio(mel, lengths)`` and ``encode_text(tokens, lengths)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clara.attention import BACKENDS
from clara.audio_encoder import AudioEncoder
from clara.model_config import ClaraConfig
from clara.text_encoder import TextEncoder


@dataclass
class ClaraOutput:
    audio_embeds: torch.Tensor  # [B, output_dim], unit norm
    text_embeds: torch.Tensor  # [B, output_dim], unit norm
    audio_scale: torch.Tensor  # scalar exp(audio temperature parameter)
    text_scale: torch.Tensor  # scalar exp(text temperature parameter)


class Clara(nn.Module):
    def __init__(self, config: ClaraConfig | None = None):
        super().__init__()
        config = config or ClaraConfig()
        self.config = config
        recompute = config.activation_checkpointing
        self.audio = AudioEncoder(config.audio, backend=config.attention, activation_checkpointing=recompute,
                                  selective_recompute=config.selective_recompute)
        self.text = TextEncoder(config.text, backend=config.attention, activation_checkpointing=recompute)
        self.audio_head = nn.Linear(config.audio.fc_dim, config.output_dim)
        self.text_head = nn.Linear(config.text.fc_dim, config.output_dim)
        # Stored as logs and used as exp(), unclamped, like the reference's temperatures.
        start = math.log(1.0 / config.init_temperature)
        self.audio_log_scale = nn.Parameter(torch.tensor(start))
        self.text_log_scale = nn.Parameter(torch.tensor(start))

    def set_attention(self, backend: str) -> None:
        """Switch every attention module to ``backend`` (one of clara.attention.BACKENDS)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        self.config = dataclasses.replace(self.config, attention=backend)

    def audio_features(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """mel [B, n_mels, T] -> the audio tower's pooled features [B, audio.fc_dim] (before the head)."""
        return self.audio(mel, lengths, mask_padding=self.config.mask_padding)

    def text_features(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] -> the text tower's pooled features [B, text.fc_dim] (before the head)."""
        return self.text(tokens, lengths, mask_padding=self.config.mask_padding)

    def encode_audio(self, mel: torch.Tensor, lengths: torch.Tensor | None = None, *, normalize: bool = True) -> torch.Tensor:
        """mel [B, n_mels, T], lengths [B] valid frames (None = no padding) -> [B, output_dim]."""
        x = self.audio_head(self.audio_features(mel, lengths))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, *, normalize: bool = True) -> torch.Tensor:
        """tokens [B, L], lengths [B] real tokens (None = no padding) -> [B, output_dim]."""
        x = self.text_head(self.text_features(tokens, lengths))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self,
        mel: torch.Tensor,
        tokens: torch.Tensor,
        mel_lengths: torch.Tensor | None = None,
        token_lengths: torch.Tensor | None = None,
    ) -> ClaraOutput:
        return ClaraOutput(
            audio_embeds=self.encode_audio(mel, mel_lengths),
            text_embeds=self.encode_text(tokens, token_lengths),
            audio_scale=self.audio_log_scale.exp(),
            text_scale=self.text_log_scale.exp(),
        )
