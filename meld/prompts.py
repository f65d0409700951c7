"""Zero-shot prompt sets: templates × class names (with synonyms), turned into class embeddings.

    prompts = load_prompts("configs/prompts/emotion.yaml")
    texts = encode_prompts(model, tokenizer, prompts)       # once per run: [T, S_c, D] per class
    weights = class_embeddings(texts)                        # [C, D], the ensemble of every template
    weights_t0 = class_embeddings(texts, templates=[0])      # [C, D], the first template alone
    logits = zero_shot_logits(audio, weights, model.audio_log_scale.exp())   # [N, C]

A class embedding is the mean of the normalised text embeddings of every (template, name) pair of that
class, renormalised (as CLIP's and CLARA's zero-shot classifiers do); logits are the audio temperature
times the cosine similarities. Text embeddings are computed once, so scoring each template alone and
the ensemble costs a few small matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from clara.config import ConfigError, check_fills, format_fields, load
from clara.model import Clara
from clara.model_config import CONFIG_ROOT
from clara.tokenizer import Tokenizer
from meld.labels import TARGETS

PROMPT_ROOT = CONFIG_ROOT / "prompts"
SEED_TEMPLATE = "A person talking in a {label} voice"


@dataclass(frozen=True)
class PromptSet:
    target: Literal["emotion", "sentiment"] = "emotion"
    templates: tuple[str, ...] = (SEED_TEMPLATE,)
    classes: dict = field(default_factory=dict)  # class label -> list of names; {} = the labels themselves

    def __post_init__(self) -> None:
        if not self.templates:
            raise ConfigError("templates: give at least one template with a {label} field")
        for template in self.templates:
            if format_fields(template, "templates") != ["label"]:
                raise ConfigError(f"templates: {template!r} must hold exactly one field, {{label}}")
            check_fills(template, "templates", {"label": "label"})
        labels = TARGETS[self.target]
        if self.classes:
            missing = [label for label in labels if label not in self.classes]
            extra = sorted(set(self.classes) - set(labels))
            if missing or extra:
                raise ConfigError(f"classes: {self.target} needs exactly {', '.join(labels)}"
                                  + (f"; missing {', '.join(missing)}" if missing else "")
                                  + (f"; unknown {', '.join(extra)}" if extra else ""))
            for label, names in self.classes.items():
                if not isinstance(names, (list, tuple)) or not names or \
                        not all(isinstance(n, str) and n.strip() for n in names):
                    raise ConfigError(f"classes.{label}: expected a non-empty list of names, got {names!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        """The classes in meld.labels order, which every metric and report uses."""
        return TARGETS[self.target]

    def names(self, label: str) -> tuple[str, ...]:
        return tuple(self.classes[label]) if self.classes else (label,)

    def texts(self, label: str) -> list[str]:
        """Template-major: every name in the first template, then the second, ... (T · S texts)."""
        return [template.format(label=name) for template in self.templates for name in self.names(label)]


def load_prompts(path: str | Path | None = None) -> PromptSet:
    """The prompt set of a YAML file (``configs/prompts/emotion.yaml`` by default)."""
    return load(PromptSet, PROMPT_ROOT / "emotion.yaml" if path is None else path)


@torch.no_grad()
def encode_texts(model: Clara, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """Texts -> unit-norm embeddings [N, D] on the model's device, in batches (padding is masked)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        tokens, lengths = tokenizer.encode_batch(list(texts[start : start + batch_size]))
        out.append(model.encode_text(tokens.to(device), lengths.to(device)).float())
    return torch.cat(out)


def encode_prompts(model: Clara, tokenizer: Tokenizer, prompts: PromptSet) -> list[torch.Tensor]:
    """One tensor per class (labels order): its prompts' unit-norm embeddings, [T, S_c, D]."""
    per_class = [prompts.texts(label) for label in prompts.labels]
    flat = encode_texts(model, tokenizer, [text for texts in per_class for text in texts])  # [sum T·S_c, D]
    sizes = [len(texts) for texts in per_class]
    T = len(prompts.templates)
    return [chunk.reshape(T, size // T, -1) for chunk, size in zip(flat.split(sizes), sizes)]


def class_embeddings(prompt_embeds: Sequence[torch.Tensor], templates: Sequence[int] | None = None) -> torch.Tensor:
    """[T, S_c, D] per class -> [C, D]: mean over the chosen templates and every name, renormalised."""
    rows = []
    for embeds in prompt_embeds:
        chosen = embeds if templates is None else embeds[list(templates)]  # [T', S_c, D]
        rows.append(F.normalize(chosen.reshape(-1, chosen.shape[-1]).mean(dim=0), dim=-1))
    return torch.stack(rows)


def zero_shot_logits(audio_embeds: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """audio_embeds [N, D] unit norm, weights [C, D] -> logits [N, C] = scale · A Wᵀ."""
    return scale * audio_embeds.float() @ weights.float().T
