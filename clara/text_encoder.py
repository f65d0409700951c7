"""CLARA's text tower: token + position embeddings, post-LN transformer layers, mean+max pooling.

Matches the reference's ``nn.TransformerEncoder`` stack (post-LN, ReLU feed-forward) but runs its
attention through :func:`clara.attention.attention`, so padded tokens can be masked and fused kernels
used.  The output is the pooled ``text_fc1`` feature [B, fc_dim], before the projection head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clara.attention import attention
from clara.masking import length_mask, masked_max, masked_mean
from clara.model_config import TextConfig


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The transformer's fixed sin/cos table [length, width] (sin on even, cos on odd channels)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]  # [L, 1]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table


class TextLayer(nn.Module):
    """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + FF(x)), with ReLU FF."""

    compile_unit = True  # see clara.compilation

    def __init__(self, config: TextConfig, backend: str):
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.backend = backend
        self.qkv = nn.Linear(config.width, 3 * config.width)  # Q, K, V stacked, heads as (h d)
        self.out = nn.Linear(config.width, config.width)
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.width, config.ff_dim)
        self.fc2 = nn.Linear(config.ff_dim, config.width)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        p = self.dropout if self.training else 0.0
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
        a = attention(q, k, v, key_mask=key_mask, backend=self.backend, dropout_p=p)
        a = a.transpose(1, 2).reshape(batch, length, width)  # [B, L, W]
        x = self.norm1(x + F.dropout(self.out(a), p, self.training))
        h = F.dropout(F.relu(self.fc1(x)), p, self.training)
        return self.norm2(x + F.dropout(self.fc2(h), p, self.training))


class TextEncoder(nn.Module):
    def __init__(self, config: TextConfig, *, backend: str = "sdpa", activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.max_positions, config.width)
        else:
            self.position_embedding = None
            self.register_buffer(
                "position_table", sinusoidal_positions(config.max_positions, config.width), persistent=False
            )
        self.layers = nn.ModuleList(TextLayer(config, backend) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        self.project = nn.Linear(config.width, config.out_channels)
        self.project_norm = nn.LayerNorm(config.out_channels)
        self.pool_norm = nn.LayerNorm(config.out_channels)
        self.fc = nn.Linear(config.out_channels, config.fc_dim)

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        if self.position_embedding is not None:
            return self.position_embedding(torch.arange(length, device=device))  # [L, W]
        return self.position_table[:length]

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, *, mask_padding: bool = True) -> torch.Tensor:
        """tokens [B, L] (padded with any id), lengths [B] -> pooled features [B, fc_dim].

        With ``mask_padding`` and ``lengths``, padded tokens are neither attended to nor pooled, so an
        item's features do not depend on what it is batched with.
        """
        length = tokens.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"text of {length} tokens exceeds the {self.config.max_positions}-position table")
        x = self.token_embedding(tokens) + self.positions(length, tokens.device)  # [B, L, W]
        mask = length_mask(lengths, length) if (mask_padding and lengths is not None) else None  # [B, L]
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        x = self.project_norm(self.project(self.final_norm(x)))  # [B, L, C]
        x = self.pool_norm(x)
        pooled = masked_mean(x, mask, dim=1) + masked_max(x, mask, dim=1)  # [B, C]
        return F.leaky_relu(self.fc(pooled), 0.01)  # [B, fc_dim]
