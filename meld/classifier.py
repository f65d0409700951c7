"""The MELD classifier: CLARA's towers (and optionally a transformers text encoder) + a fusion head.

    classifier = MeldClassifier(clara, head, inputs=("audio", "text"))
    logits = classifier(batch)              # [B, C]; batch as meld.dataset.collate (+ hf_ids, hf_mask)

Each input gives one embedding per utterance: ``audio`` and ``text`` from CLARA (the projected,
unit-norm joint-space embedding, or the tower's pooled features), ``hf_text`` from
``meld.hf_text.HFTextEncoder``. A batch may instead carry them ready-made under ``embeddings``
(the linear probe's cache), and then no tower runs.

Freezing and layer-wise learning rates work on *depths*: every encoder parameter gets a depth from
0 (embeddings, conv front-end) to its tower's top (pooling, projection head), with one depth per
transformer / Perceiver layer in between; ``set_trainable`` unfreezes the top k layers of each tower
and ``meld.layer_decay`` scales each depth's learning rate.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from clara.model import Clara
from clara.tokenizer import Tokenizer
from meld.fusion import FusionHead
from meld.hf_text import HFTextEncoder

_LAYER = re.compile(r"\.layers?\.(\d+)\.")


class MeldClassifier(nn.Module):
    def __init__(self, clara: Clara | None, head: FusionHead, *, inputs: tuple[str, ...], features: str = "projected",
                 hf_text: HFTextEncoder | None = None) -> None:
        super().__init__()
        if ("audio" in inputs or "text" in inputs) and clara is None:
            raise ValueError("audio and text inputs need a CLARA model")
        if "hf_text" in inputs and hf_text is None:
            raise ValueError("the hf_text input needs a transformers text encoder")
        self.clara = clara
        self.hf_text = hf_text
        self.head = head
        self.inputs = inputs
        self.features = features

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """{input: [B, D_input]} for one collated batch."""
        if "embeddings" in batch:
            return batch["embeddings"]
        out = {}
        projected = self.features == "projected"
        if "audio" in self.inputs:
            mel, lengths = batch["mel"], batch["mel_lengths"]
            out["audio"] = self.clara.encode_audio(mel, lengths) if projected else self.clara.audio_features(mel, lengths)
        if "text" in self.inputs:
            tokens, lengths = batch["tokens"], batch["token_lengths"]
            out["text"] = self.clara.encode_text(tokens, lengths) if projected else self.clara.text_features(tokens, lengths)
        if "hf_text" in self.inputs:
            out["hf_text"] = self.hf_text(batch["hf_ids"], batch["hf_mask"])
        return out

    def forward(self, batch: dict, *, unimodal: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """logits [B, C]; with ``unimodal``, also each input's own logits {name: [B, C]}."""
        embeddings = self.embed(batch)
        logits = self.head(embeddings)
        return (logits, self.head.unimodal_logits(embeddings)) if unimodal else logits

    def train(self, mode: bool = True) -> MeldClassifier:
        """Set training mode, but keep every frozen part of the towers in evaluation mode.

        A frozen layer is a fixed feature extractor: with its dropout on (0.5 in CLARA's towers), the
        trained layers above it would learn on noisier features than they get at evaluation, and a
        partial fine-tune's frozen bottom would compute something else than the linear probe's.
        Input augmentations of a tower with trainable layers (the Perceiver's token dropout) still apply.
        """
        super().train(mode)
        if mode:
            for tower in (self.clara, self.hf_text):
                if tower is not None:
                    _freeze_mode(tower)
        return self

    def encoders(self) -> nn.Module:
        """The part that maps raw inputs to embeddings (frozen, and run once, in a linear probe)."""
        return nn.ModuleDict({name: module for name, module in (("clara", self.clara), ("hf_text", self.hf_text))
                              if module is not None})


def _freeze_mode(module: nn.Module) -> None:
    """Put in evaluation mode each largest submodule of ``module`` that has parameters and trains none of them."""
    parameters = list(module.parameters())
    if parameters and not any(parameter.requires_grad for parameter in parameters):
        module.eval()
        return
    for child in module.children():
        _freeze_mode(child)


class HeadOnly(nn.Module):
    """The head of a classifier, trained on cached embeddings; its state_dict keys are the classifier's."""

    def __init__(self, head: FusionHead) -> None:
        super().__init__()
        self.head = head

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        return batch["embeddings"]

    def forward(self, batch: dict, *, unimodal: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict]:
        logits = self.head(batch["embeddings"])
        return (logits, self.head.unimodal_logits(batch["embeddings"])) if unimodal else logits


def input_names(modality: str, hf_text: bool, hf_mode: str) -> tuple[str, ...]:
    """Which embeddings feed the head: CLARA audio and/or text, and the transformers text encoder."""
    names = ["audio"] if modality in ("audio", "both") else []
    if modality in ("text", "both"):
        if not hf_text or hf_mode == "beside":
            names.append("text")
        if hf_text:
            names.append("hf_text")
    return tuple(names)


def input_dims(clara: Clara | None, hf_text: HFTextEncoder | None, inputs: tuple[str, ...], features: str) -> dict[str, int]:
    dims = {}
    for name in inputs:
        if name == "hf_text":
            dims[name] = hf_text.dim
        elif features == "projected":
            dims[name] = clara.config.output_dim
        else:
            dims[name] = getattr(clara.config, name).fc_dim
    return dims


def parameter_depth(name: str, classifier: MeldClassifier) -> tuple[str, int, int] | None:
    """(tower, depth, top depth) of an encoder parameter; None for the head and unused parameters.

    CLARA text: embeddings 0, layer i -> i + 1, the rest of the tower and ``text_head`` -> layers + 1.
    CLARA audio: conv front-end and positions 0, the Perceiver's cross-attention block 1, latent layer i
    -> i + 2, pooling and ``audio_head`` -> layers + 2. Transformers: embeddings 0, layer i -> i + 1,
    the rest -> layers + 1, but a pooler (BERT's [CLS] dense + tanh) is unused: the encoder mean-pools
    the last hidden states. With ``features`` pooled, CLARA's projection heads (``audio_head``,
    ``text_head``) compute nothing the classifier uses, so they are unused parameters too.
    """
    if classifier.features == "pooled" and name.startswith(("clara.audio_head.", "clara.text_head.")):
        # Left trainable, they never got a gradient: DDP (without train.find_unused_parameters) failed at
        # its second step, still waiting for their gradients, and the trainable counts included them.
        return None
    if name.startswith(("clara.text.", "clara.text_head.")) and "text" in classifier.inputs:
        top = classifier.clara.config.text.layers + 1
        if name.startswith(("clara.text.token_embedding", "clara.text.position_embedding")):
            return "text", 0, top
        match = _LAYER.search(name)
        return "text", (int(match.group(1)) + 1 if match else top), top
    if name.startswith(("clara.audio.", "clara.audio_head.")) and "audio" in classifier.inputs:
        top = classifier.clara.config.audio.layers + 2
        if name.startswith(("clara.audio.conv", "clara.audio.position_embedding")):
            return "audio", 0, top
        if name.startswith(("clara.audio.perceiver.latents", "clara.audio.perceiver.cross_")):
            return "audio", 1, top
        match = _LAYER.search(name)
        return "audio", (int(match.group(1)) + 2 if match else top), top
    if name.startswith("hf_text.") and "hf_text" in classifier.inputs:
        if ".pooler." in name:
            # AutoModel builds BERT / RoBERTa with their pooler, whose output HFTextEncoder never reads: left
            # trainable it gets no gradient (DDP then waits for it, as for the heads above) yet counts as trained.
            return None
        top = classifier.hf_text.num_layers + 1
        if ".embeddings." in name:
            return "hf_text", 0, top
        match = _LAYER.search(name)
        return "hf_text", (int(match.group(1)) + 1 if match else top), top
    return None


def set_trainable(classifier: MeldClassifier, strategy: str, unfreeze_layers: int = 0) -> dict[str, int]:
    """Freeze / unfreeze encoder parameters for ``strategy``; returns trainable counts per part.

    ``full``: every parameter of the towers in use. ``partial``: per tower, the top ``unfreeze_layers``
    layers and everything above them (pooling, projection). ``linear_probe``: none (the head alone).
    Unused towers and CLARA's contrastive temperatures are always frozen. The head is always trained.
    """
    counts: dict[str, int] = {}
    for name, parameter in classifier.named_parameters():
        if name.startswith("head."):
            parameter.requires_grad_(True)
            part = "head"
        else:
            depth = parameter_depth(name, classifier)
            if depth is None or strategy == "linear_probe":
                train = False
            elif strategy == "full":
                train = True
            else:
                _, level, top = depth
                train = level > top - 1 - unfreeze_layers
            parameter.requires_grad_(train)
            part = depth[0] if depth is not None else "unused"
        if parameter.requires_grad:
            counts[part] = counts.get(part, 0) + parameter.numel()
    return counts


@torch.no_grad()
def zero_shot_init(classifier: MeldClassifier, class_names: tuple[str, ...], prompt: str, tokenizer: Tokenizer) -> None:
    """Set the audio block of a linear concat head to CLARA's class-prompt text embeddings.

    The head LayerNorms the unit-norm audio embedding e first, which gives about sqrt(D) * e; rows
    scale * p_c / sqrt(D) then make the logits about scale * cos(e, p_c): CLARA's zero-shot classifier.
    Other inputs' blocks and the bias start at zero, so training begins from zero-shot predictions.
    """
    clara, head = classifier.clara, classifier.head
    was_training = clara.training
    clara.eval()
    tokens, lengths = tokenizer.encode_batch([prompt.format(label=name) for name in class_names])
    device = next(clara.parameters()).device
    prompts = clara.encode_text(tokens.to(device), lengths.to(device))  # [C, D], unit norm
    clara.train(was_training)
    dim = prompts.shape[1]
    scale = clara.audio_log_scale.exp()
    weight = torch.zeros_like(head.output.weight)  # [C, sum D]
    offset = 0
    for name in head.names:
        width = head.norms[name].normalized_shape[0]
        if name == "audio":
            weight[:, offset : offset + width] = F.normalize(prompts, dim=-1) * scale / dim**0.5
        offset += width
    head.output.weight.copy_(weight)
    head.output.bias.zero_()
