"""Shared by the fine-tune and predict tests: small MELD folders and fast settings."""

from __future__ import annotations

import csv
import functools
import tempfile
from pathlib import Path

from meld.finetune import load_config

COLUMNS = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
           "Episode", "StartTime", "EndTime"]
# Words that give the emotion away, so a tiny model learns them in a few epochs.
LINES = {"neutral": ("So what time is it?", "I will get the keys.", "It is on the table."),
         "joy": ("Yay, this is great!", "I love it, so happy!", "Woo-hoo, the best day!"),
         "surprise": ("Whoa, no way?!", "What, really?!", "Oh my God, seriously?!"),
         "anger": ("Get out, I hate this!", "Stop it, you idiot!", "Damn it, how dare you!"),
         "sadness": ("I miss her so much.", "I am so sad and alone.", "It hurts, I cried all night."),
         "disgust": ("Eww, that is gross.", "Ugh, disgusting.", "Yuck, it smells."),
         "fear": ("I am scared, help!", "Oh no, what was that noise?", "I am terrified.")}
SENTIMENT = {"neutral": "neutral", "joy": "positive", "surprise": "positive", "anger": "negative",
             "sadness": "negative", "disgust": "negative", "fear": "negative"}
FAST = ["threads=1", "train.epochs=2", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=5",
        "train.progress=false", "tensorboard_extras=false", "data.batch_size=32"]


def write_csv_meld(root: Path, per_class: dict[str, int] | None = None, *, bad_label: str | None = None) -> Path:
    """A CSV-only MELD (train/dev/test_sent_emo.csv at the top) of templated lines."""
    root.mkdir(parents=True, exist_ok=True)
    per_class = per_class or {"train": 6, "dev": 2, "test": 2}
    for split, count in per_class.items():
        rows, number = [], 1
        for emotion_index, (emotion, lines) in enumerate(LINES.items()):
            for i in range(count):
                label = bad_label if bad_label and i == 0 and emotion_index == 0 else emotion
                dialogue, utterance = emotion_index * 100 + i // 3, i % 3
                rows.append([number, lines[i % len(lines)], "Ross", label, SENTIMENT[emotion], dialogue, utterance,
                             1, 1, "0:00:01,000", "0:00:02,500"])
                number += 1
        with open(root / f"{split}_sent_emo.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
    return root


@functools.cache
def small_demo() -> tuple[Path, Path]:
    """(MELD root, feature cache) of the smallest built-in demo, built and prepared once per test session."""
    from meld.demo import make_demo
    from meld.prepare import prepare

    base = Path(tempfile.mkdtemp(prefix="meld-finetune-test-"))
    root = make_demo(base / "demo", size=30, workers=1)
    prepare(root, base / "cache", workers=1)
    return root, base / "cache"


def text_config(root: Path, *extra: str):
    return load_config(None, [*FAST, f"data_root={root}", "data.modality=text", *extra])
