"""Captions for MELD clips, built from the utterance, its emotion and sentiment and the speaker.

    config = load_captions("configs/captions/meld.yaml")
    caption_for(utt, config)  # 'Rachel sounds happy: "I got the job!"'

Used to adapt CLARA to MELD (``meld.pretrain_manifest``) and as the texts of zero-shot's audio-text
retrieval. Each clip gets one template, chosen by a hash of its key: stable across runs and processes
(Python's ``hash`` of a string is salted per process, so SHA-256 is used) and even over the templates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from clara.config import ConfigError, check_fills, format_fields, load
from clara.model_config import CONFIG_ROOT
from meld.labels import EMOTIONS, SENTIMENTS
from meld.records import Utterance

DEFAULT_CAPTIONS = CONFIG_ROOT / "captions" / "meld.yaml"
FIELDS = ("utterance", "speaker", "emotion", "emotion_label", "sentiment")


@dataclass(frozen=True)
class CaptionConfig:
    templates: tuple[str, ...] = ("A person talking in a {emotion} voice, saying: {utterance}",)
    emotion_words: dict = field(default_factory=lambda: {name: name for name in EMOTIONS})
    sentiment_words: dict = field(default_factory=lambda: {name: name for name in SENTIMENTS})

    def __post_init__(self) -> None:
        if not self.templates:
            raise ConfigError("templates: give at least one caption template")
        for template in self.templates:
            unknown = sorted(set(format_fields(template, "templates")) - set(FIELDS))
            if unknown:
                raise ConfigError(f"templates: {template!r} uses unknown field(s) "
                                  f"{', '.join('{' + name + '}' for name in unknown)}; known fields: {', '.join(FIELDS)}")
            check_fills(template, "templates", {name: name for name in FIELDS})  # before an export or a zero-shot run
        for key, labels in (("emotion_words", EMOTIONS), ("sentiment_words", SENTIMENTS)):
            words = getattr(self, key)
            missing = [label for label in labels if not isinstance(words.get(label), str) or not words[label].strip()]
            extra = sorted(set(words) - set(labels))
            if missing or extra:
                raise ConfigError(f"{key}: needs one word for each of {', '.join(labels)}"
                                  + (f"; missing {', '.join(missing)}" if missing else "")
                                  + (f"; unknown {', '.join(extra)}" if extra else ""))


def load_captions(path: str | Path | None = None) -> CaptionConfig:
    """The caption config of a YAML file (``configs/captions/meld.yaml`` by default)."""
    return load(CaptionConfig, DEFAULT_CAPTIONS if path is None else path)


def template_index(key: str, count: int) -> int:
    """Which of ``count`` templates the clip ``key`` gets: stable, and uniform over keys."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % count


def caption_for(utt: Utterance, config: CaptionConfig) -> str:
    template = config.templates[template_index(utt.key, len(config.templates))]
    return template.format(
        utterance=utt.text,
        speaker=utt.speaker,
        emotion=config.emotion_words[utt.emotion],
        emotion_label=utt.emotion,
        sentiment=config.sentiment_words[utt.sentiment],
    ).strip()
