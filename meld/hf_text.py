"""An optional text encoder from Hugging Face transformers (e.g. RoBERTa), loaded from a LOCAL folder only.

Nothing is downloaded: ``from_pretrained(..., local_files_only=True)``. The utterance's features are
the mean of the last hidden states over its real tokens. The tokenizer and config are saved with a
fine-tuned classifier, so a run directory is complete without the original folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clara.attention import without_cudnn_attention
from clara.checkpoint import CheckpointError


def _load(kind: str, path: str | Path):
    import transformers

    try:
        return getattr(transformers, kind).from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a local transformers model folder with a tokenizer ({first})") from None


def load_hf_tokenizer(path: str | Path):
    return _load("AutoTokenizer", path)


class HFTextEncoder(nn.Module):
    """token ids [B, L] + attention mask [B, L] -> mean-pooled last hidden states [B, hidden_size]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # float32 weights whatever the folder holds: transformers 5 loads (and builds from its config) a
        # bf16 / fp16 checkpoint in that dtype, and AdamW then rounds away every update below the weight's
        # half-precision step. Compute precision is the run's autocast, as for CLARA.
        self.model = model.float()
        self.dim = int(model.config.hidden_size)
        self.num_layers = int(getattr(model.config, "num_hidden_layers", 0))

    @classmethod
    def from_folder(cls, path: str | Path) -> HFTextEncoder:
        if not Path(path).is_dir():
            raise CheckpointError(f"{path}: model.hf_text must be a local transformers model folder")
        return cls(_load("AutoModel", path))

    @classmethod
    def from_config_folder(cls, path: str | Path) -> HFTextEncoder:
        """The architecture alone (weights come from the classifier's own file)."""
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        return cls(transformers.AutoModel.from_config(config))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Utterances pad to a new length in almost every batch; cuDNN's attention would plan anew for each.
        with without_cudnn_attention():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, H]
        weights = mask.to(hidden.dtype)[..., None]  # [B, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # [B, H]
