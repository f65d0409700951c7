"""The symmetric contrastive loss with one learnable temperature per modality.

L = ½ [CE(s_a · A Tᵀ, I) + CE(s_t · T Aᵀ, I)], A and T the unit-norm audio and text embeddings of
matching pairs, s_a and s_t the exponentiated temperatures.  With ``gather=True`` under
torch.distributed, every process sees all processes' embeddings as negatives (gathered with
gradients), so the loss equals the single-process loss on the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x [B, D] from every process in rank order -> [W·B, D], keeping the autograd graph."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    def __init__(self, gather: bool = False):
        super().__init__()
        self.gather = gather

    def similarity(self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """audio_embeds, text_embeds [B, D] -> the cosine similarities the loss scores, [N, N] (audio
        rows, text columns, pairs on the diagonal): N = B, or W·B with ``gather`` under W processes,
        the same matrix in every process.  Also what in-batch accuracy is measured on, so that it
        counts the candidates the loss does and reads the same for any number of processes.
        At least fp32 (fp64 stays fp64), also under autocast: there the product would be bf16, whose
        8-bit significand rounds cosines near 1 by up to 2e-3, 0.2 in logits scaled by 100; the
        reference trained in fp32."""
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            audio_embeds = gather_with_grad(audio_embeds)
            text_embeds = gather_with_grad(text_embeds)
        dtype = torch.promote_types(torch.promote_types(audio_embeds.dtype, text_embeds.dtype), torch.float32)
        with torch.autocast(audio_embeds.device.type, enabled=False):
            return audio_embeds.to(dtype) @ text_embeds.to(dtype).T

    @staticmethod
    def from_similarity(similarity: torch.Tensor, audio_scale: torch.Tensor, text_scale: torch.Tensor) -> torch.Tensor:
        """The loss of a ``similarity`` [N, N] matrix; scales are scalars."""
        targets = torch.arange(similarity.shape[0], device=similarity.device)
        audio_loss = F.cross_entropy(audio_scale * similarity, targets)
        text_loss = F.cross_entropy(text_scale * similarity.T, targets)
        return (audio_loss + text_loss) / 2

    def forward(
        self,
        audio_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        audio_scale: torch.Tensor,
        text_scale: torch.Tensor,
    ) -> torch.Tensor:
        """audio_embeds, text_embeds [B, D] (row i of each is a pair); scales are scalars."""
        return self.from_similarity(self.similarity(audio_embeds, text_embeds), audio_scale, text_scale)
