"""CLARA's audio tower: conv head -> learned positions -> Perceiver -> pooling over latent features.

Input is the log-mel [B, n_mels, T] of :class:`clara.audio_frontend.LogMel`.  Two 1-D convolutions
(the second with stride 2) turn it into T' = ceil(T / 2) tokens of ``width`` channels; the Perceiver
compresses them into ``num_latents`` latents; pooling then takes, for each latent, the mean + max
over its *feature* axis (the reference's choice), giving one value per latent: [B, num_latents].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clara.masking import length_mask
from clara.model_config import AudioConfig
from clara.perceiver import Perceiver


def token_lengths(frame_lengths: torch.Tensor) -> torch.Tensor:
    """Frames -> tokens after the stride-2, kernel-3, padding-1 convolution: ceil(frames / 2)."""
    return torch.div(frame_lengths + 1, 2, rounding_mode="floor")


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioConfig, *, backend: str = "sdpa", activation_checkpointing: bool = False,
                 selective_recompute: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.width, config.width, kernel_size=3, stride=2, padding=1)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)
        self.perceiver = Perceiver(config, backend, activation_checkpointing=activation_checkpointing,
                                   selective_recompute=selective_recompute)
        self.pool_norm = nn.LayerNorm(config.latent_dim)
        self.fc = nn.Linear(config.num_latents, config.fc_dim)

    def tokens(self, mel: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """mel [B, M, T] -> tokens [B, T', C] and their mask [B, T'] (None without lengths).

        With lengths, frames past each item's end are zeroed before each convolution, so the conv
        sees exactly the zero padding it would see on the item alone (including at its last frame).
        """
        if lengths is None:
            x = F.gelu(self.conv1(mel))
            x = F.gelu(self.conv2(x))  # [B, C, T']
            mask = None
        else:
            frames = length_mask(lengths, mel.shape[-1])[:, None, :]  # [B, 1, T]
            x = F.gelu(self.conv1(mel * frames)) * frames
            x = F.gelu(self.conv2(x))  # [B, C, T']
            mask = length_mask(token_lengths(lengths), x.shape[-1])  # [B, T']
        count = x.shape[-1]
        if count > self.config.max_positions:
            raise ValueError(
                f"audio of {mel.shape[-1]} frames gives {count} tokens, more than the "
                f"{self.config.max_positions}-position table; trim clips to at most "
                f"{2 * self.config.max_positions} frames"
            )
        x = x.transpose(1, 2) + self.position_embedding(torch.arange(count, device=mel.device))  # [B, T', C]
        return x, mask

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None, *, mask_padding: bool = True) -> torch.Tensor:
        """mel [B, n_mels, T], lengths [B] valid frames -> pooled features [B, fc_dim]."""
        tokens, mask = self.tokens(mel, lengths if mask_padding else None)
        latents = self.pool_norm(self.perceiver(tokens, mask))  # [B, N, D]
        pooled = latents.mean(dim=2) + latents.amax(dim=2)  # [B, N]: one value per latent
        return F.leaky_relu(self.fc(pooled), 0.01)  # [B, fc_dim]
