"""The classification head: per-modality embeddings -> fused vector -> class logits.

Inputs are a dict ``{name: [B, D_name]}`` (``audio``, ``text``, ``hf_text``), always in the order of
``dims``. Fusions:

* ``concat``: LayerNorm each embedding and concatenate: [B, sum D].
* ``gated``: project each to ``fusion_dim`` (tanh) and mix them with learned gates computed from all
  inputs, per unit: [B, H]. The gates are a softmax over the modalities; with two that is exactly a
  sigmoid gate g * audio + (1 - g) * text.
* ``attention``: project each to a token of width ``fusion_dim`` plus a learned modality embedding,
  and let a learned query attend over the tokens (4 heads; 1 when ``fusion_dim`` is not a multiple of
  4): [B, H].

The head is a linear layer on the fused vector, or one hidden layer first when ``hidden_dim`` > 0.

``modality_dropout`` p: in training, each example loses one of its inputs (zeroed after its
LayerNorm) with probability p, so the head cannot lean on one modality alone and the others learn
to carry the prediction too (fusion then does at least as well as either alone more reliably).

``unimodal_logits`` gives each input's own class logits, for the unimodal losses of training
(``loss.unimodal_weight``): trained jointly through one fused loss, the tower that learns fastest
(text, on the demo) soon fits the training set and the other (audio) gets almost no gradient; a loss
per input keeps every tower learning to predict on its own. With a linear head on the concatenation
the per-input heads are the blocks of that head, so the fused logits are the sum of the per-input
ones (a late fusion); other heads get one extra linear layer per input (``unimodal_heads``).
"""

from __future__ import annotations

import torch
from torch import nn


class FusionHead(nn.Module):
    def __init__(self, dims: dict[str, int], num_classes: int, *, fusion: str = "concat", fusion_dim: int = 128,
                 hidden_dim: int = 0, dropout: float = 0.1, modality_dropout: float = 0.0,
                 unimodal_heads: bool = False) -> None:
        super().__init__()
        if not dims:
            raise ValueError("the head needs at least one input embedding")
        # Checked here, not only in the fine-tune config: a saved classifier.json's head options come back
        # through this constructor, and a negative size failed deep in torch instead of as a ValueError.
        if fusion_dim < 1 or hidden_dim < 0 or not 0.0 <= dropout < 1.0 or not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"fusion_dim must be >= 1, hidden_dim >= 0, dropout and modality_dropout in [0, 1); got "
                             f"{fusion_dim}, {hidden_dim}, {dropout}, {modality_dropout}")
        self.names = list(dims)
        self.fusion = fusion
        self.modality_dropout = modality_dropout
        self.norms = nn.ModuleDict({name: nn.LayerNorm(dim) for name, dim in dims.items()})
        if fusion == "concat":
            fused = sum(dims.values())
        elif fusion in ("gated", "attention"):
            fused = fusion_dim
            self.proj = nn.ModuleDict({name: nn.Linear(dim, fusion_dim) for name, dim in dims.items()})
            if fusion == "gated":
                self.gate = nn.Linear(sum(dims.values()), fusion_dim * len(dims))
            else:
                self.modality = nn.Parameter(torch.zeros(len(dims), fusion_dim))
                self.query = nn.Parameter(torch.randn(1, 1, fusion_dim) * fusion_dim**-0.5)
                heads = 4 if fusion_dim % 4 == 0 else 1
                self.attend = nn.MultiheadAttention(fusion_dim, heads, dropout=dropout, batch_first=True)
                self.attend_norm = nn.LayerNorm(fusion_dim)
        else:
            raise ValueError(f"unknown fusion {fusion!r}; expected concat, gated or attention")
        self.dropout = nn.Dropout(dropout)
        if hidden_dim:
            self.classifier = nn.Sequential(nn.Linear(fused, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                            nn.Linear(hidden_dim, num_classes))
        else:
            self.classifier = nn.Linear(fused, num_classes)
        self.fused_dim = fused
        self.hidden_dim = hidden_dim
        # Own heads per input for the unimodal losses, unless the fused head is linear on a concatenation:
        # then each input's block of it is that input's head (see ``unimodal_logits``).
        self.block_heads = fusion == "concat" and not hidden_dim
        self.unimodal = None
        if unimodal_heads and not self.block_heads:
            self.unimodal = nn.ModuleDict({name: nn.Linear(dim, num_classes) for name, dim in dims.items()})
        self.last_gates: torch.Tensor | None = None  # gated: the latest [B, M, H] gates, for inspection

    @property
    def output(self) -> nn.Linear:
        """The final linear layer (the one zero-shot initialisation writes)."""
        return self.classifier if isinstance(self.classifier, nn.Linear) else self.classifier[-1]

    def _normed(self, embeddings: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.norms[name](embeddings[name].float()) for name in self.names]

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: [B, D_name]} -> fused [B, fused_dim]."""
        missing = [name for name in self.names if name not in embeddings]
        if missing:
            raise KeyError(f"the head needs embeddings {self.names}; missing {missing}")
        normed = self._normed(embeddings)  # each [B, D]
        if self.training and self.modality_dropout > 0 and len(normed) > 1:
            batch = normed[0].shape[0]
            dropped = torch.randint(len(normed), (batch,), device=normed[0].device)  # [B]: which input to drop
            drop = torch.rand(batch, device=normed[0].device) < self.modality_dropout  # [B]
            normed = [x * ~(drop & (dropped == i))[:, None] for i, x in enumerate(normed)]
        if self.fusion == "concat":
            return torch.cat(normed, dim=-1)
        tokens = torch.stack([self.proj[name](x) for name, x in zip(self.names, normed)], dim=1)  # [B, M, H]
        if self.fusion == "gated":
            logits = self.gate(torch.cat(normed, dim=-1)).view(tokens.shape)  # [B, M, H]
            gates = logits.softmax(dim=1)
            self.last_gates = gates.detach()
            return (gates * torch.tanh(tokens)).sum(dim=1)  # [B, H]
        tokens = tokens + self.modality  # [B, M, H]
        query = self.query.expand(tokens.shape[0], -1, -1)  # [B, 1, H]
        out, _ = self.attend(query, tokens, tokens, need_weights=False)
        return self.attend_norm(out.squeeze(1) + query.squeeze(1))  # [B, H]

    def forward(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: [B, D_name]} -> logits [B, num_classes]."""
        return self.classifier(self.dropout(self.fuse(embeddings)))

    def unimodal_logits(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: [B, C]}: each input's own class logits, from its embedding alone.

        With a linear head on the concatenation (``concat``, ``hidden_dim`` 0) these are the blocks of
        that head, W_name @ x_name + b: the fused logits are then their sum minus (M - 1) biases, a late
        fusion of per-input classifiers. Otherwise each input has its own linear head, used in training only.
        """
        normed = self._normed(embeddings)  # each [B, D_name]
        if self.block_heads:
            weight, bias = self.classifier.weight, self.classifier.bias  # [C, sum D], [C]
            blocks = weight.split([x.shape[-1] for x in normed], dim=1)
            return {name: self.dropout(x) @ w.T + bias for name, x, w in zip(self.names, normed, blocks)}
        if self.unimodal is None:
            raise ValueError(f"a {self.fusion} head with hidden_dim {self.hidden_dim} needs unimodal_heads=True "
                             "for per-input logits")
        return {name: self.unimodal[name](self.dropout(x)) for name, x in zip(self.names, normed)}
