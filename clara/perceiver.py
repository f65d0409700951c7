"""The Perceiver-IO encoder of CLARA's audio tower.

A learned latent array [N, D] reads the audio tokens once through cross-attention, then refines
itself with ``layers`` self-attention blocks.  Every block is pre-norm and residual; feed-forwards
are GEGLU.  Cost is linear in the number of audio tokens, quadratic only in the (fixed) latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clara.attention import attention, gelu_attention
from clara.geglu_kernel import geglu
from clara.model_config import AudioConfig
from clara.recompute import keep_matmul_outputs


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] laid out as (h d) -> [B, H, L, D]."""
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class GEGLUFeedForward(nn.Module):
    """PreNorm -> Linear(D, 2·m·D) -> halves [a, g] -> a·GELU(g) -> Linear(m·D, D); no residual here.

    ``kernel="triton"`` computes a·GELU(g) (biases included) and its backward with clara.geglu_kernel's
    hand-written kernels on CUDA tensors; the parameters and the numbers (up to rounding) are the same."""

    compile_unit = True  # see clara.compilation

    def __init__(self, dim: int, mult: int, kernel: str = "pytorch"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult * 2)
        self.fc2 = nn.Linear(dim * mult, dim)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        x = self.norm(x)
        half = self.fc2.in_features
        if self.kernel == "triton":
            a = F.linear(x, self.fc1.weight[:half])  # [..., m·D], bias added by the kernel
            gate = F.linear(x, self.fc1.weight[half:])
            return self.fc2(geglu(a, gate, self.fc1.bias[:half], self.fc1.bias[half:]))
        # fc1 as two products over its weight's halves (the same numbers as splitting its output):
        # a and g are then separate tensors, and the backward's elementwise kernel reads each once
        # and writes their gradients side by side, instead of gathering both halves of one
        # [..., 2·m·D] tensor for every element of its gradient (3x slower on an H200).
        a = F.linear(x, self.fc1.weight[:half], self.fc1.bias[:half])  # [..., m·D]
        gate = F.linear(x, self.fc1.weight[half:], self.fc1.bias[half:])  # [..., m·D]
        return self.fc2(a * F.gelu(gate))


class CrossAttention(nn.Module):
    """Latents [B, N, D] attend to audio tokens [B, T, C]; both sides pre-normed."""

    compile_unit = True

    def __init__(self, config: AudioConfig, backend: str):
        super().__init__()
        inner = config.cross_heads * config.cross_dim_head
        self.heads = config.cross_heads
        self.backend = backend
        self.kind = config.cross_attention
        self.norm = nn.LayerNorm(config.latent_dim)
        self.norm_context = nn.LayerNorm(config.width)
        self.q = nn.Linear(config.latent_dim, inner, bias=False)
        self.kv = nn.Linear(config.width, 2 * inner, bias=False)  # K then V, each (h d)
        self.out = nn.Linear(inner, config.latent_dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q = split_heads(self.q(self.norm(latents)), self.heads)  # [B, H, N, d]
        k, v = (split_heads(t, self.heads) for t in self.kv(self.norm_context(context)).chunk(2, dim=-1))  # [B, H, T, d]
        if self.kind == "gelu":
            a = gelu_attention(q, k, v, key_mask=key_mask)
        else:
            a = attention(q, k, v, key_mask=key_mask, backend=self.backend)
        return self.out(merge_heads(a))  # [B, N, D]


class SelfAttention(nn.Module):
    """Pre-norm self-attention over the latents, Q, K and V from one fused projection weight
    (applied as one product, or as three over its thirds with ``split``: see AudioConfig.latent_qkv)."""

    def __init__(self, dim: int, heads: int, dim_head: int, backend: str, *, split: bool = False):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.split = split
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)  # Q, K, V stacked, each (h d)
        self.out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        x = self.norm(x)
        if self.split:
            inner = self.out.in_features
            q, k, v = (split_heads(F.linear(x, weight), self.heads) for weight in self.qkv.weight.split(inner))
        else:
            qkv = self.qkv(x).view(batch, length, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
        return self.out(merge_heads(attention(q, k, v, backend=self.backend)))


class LatentBlock(nn.Module):
    compile_unit = True

    def __init__(self, config: AudioConfig, backend: str, *, selective_recompute: bool = False):
        super().__init__()
        self.selective_recompute = selective_recompute
        self.attn = SelfAttention(config.latent_dim, config.latent_heads, config.latent_dim_head, backend,
                                  split=config.latent_qkv == "split")
        self.ff = GEGLUFeedForward(config.latent_dim, config.ff_mult, config.geglu_kernel)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        if self.selective_recompute and torch.is_grad_enabled():
            return keep_matmul_outputs(self._forward, x)
        return self._forward(x)


def keep_random_tokens(
    tokens: torch.Tensor, key_mask: torch.Tensor | None, keep: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training-time token dropout: keep a random ``keep`` fraction of each item's audio tokens.

    tokens [B, T, C] -> [B, K, C] with K = max(1, int(keep·T)), the reference's count.  Real tokens are
    drawn before padded ones; with a mask, an item keeps min(ceil(keep·its length), K) real tokens and
    the returned mask [B, K] marks them (so the batch's longest item keeps K, int rather than ceil).
    Order does not matter: positions were already added and attention is permutation invariant over
    keys.
    """
    batch, length, _ = tokens.shape
    count = max(1, int(keep * length))
    scores = torch.rand(batch, length, device=tokens.device)  # [B, T]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, -1.0)
    index = scores.topk(count, dim=1).indices  # [B, K]
    kept = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    if key_mask is None:
        return kept, None
    keep_counts = torch.ceil(key_mask.sum(1) * keep).clamp(min=1)  # [B]
    return kept, torch.arange(count, device=tokens.device)[None, :] < keep_counts[:, None]


class Perceiver(nn.Module):
    def __init__(self, config: AudioConfig, backend: str, *, activation_checkpointing: bool = False,
                 selective_recompute: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.latent_dim))
        self.cross_attn = CrossAttention(config, backend)
        self.cross_ff = GEGLUFeedForward(config.latent_dim, config.ff_mult, config.geglu_kernel)
        recompute = selective_recompute and not activation_checkpointing
        self.layers = nn.ModuleList(LatentBlock(config, backend, selective_recompute=recompute) for _ in range(config.layers))

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T, C], key_mask [B, T] -> latents [B, N, D]."""
        if self.training and self.config.token_keep < 1.0:
            tokens, key_mask = keep_random_tokens(tokens, key_mask, self.config.token_keep)
        x = self.latents.expand(tokens.shape[0], -1, -1)  # [B, N, D]
        device = tokens.device.type
        if self.config.latent_stream == "autocast" and torch.is_autocast_enabled(device):
            # Every residual add then stays in the low-precision dtype (the blocks' outputs are
            # autocast Linear outputs); the norms still compute their statistics in fp32.
            x = x.to(torch.get_autocast_dtype(device))
        x = x + self.cross_attn(x, tokens, key_mask)
        x = x + self.cross_ff(x)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

