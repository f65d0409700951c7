"""MELD's label sets, in the one canonical order that every model head, metric and report uses.

The order follows the class frequency in train (neutral first). MELD's README lists class weights in a
different order than its own index map (issue #51), so weights must always be derived from
``class_counts`` in this order, never copied.
"""

from __future__ import annotations

from collections.abc import Sequence

EMOTIONS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SENTIMENTS: tuple[str, ...] = ("neutral", "positive", "negative")
TARGETS: dict[str, tuple[str, ...]] = {"emotion": EMOTIONS, "sentiment": SENTIMENTS}


def label_index(target: str, name: str) -> int:
    """Index of label ``name`` for ``target`` ("emotion" or "sentiment").

    Case and surrounding whitespace are ignored (" Joy" -> 1). Raises ValueError naming the value and the
    allowed ones; the CSV reader turns that into a MeldDataError with the file and line.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    names = TARGETS[target]
    wanted = name.strip().lower()
    if wanted not in names:
        raise ValueError(f"{target} {name!r} is not one of {', '.join(names)}")
    return names.index(wanted)


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """How many times each class index 0..num_classes-1 occurs in ``labels``."""
    counts = [0] * num_classes
    for label in labels:
        if not 0 <= label < num_classes:
            raise ValueError(f"label index {label} is outside 0..{num_classes - 1}")
        counts[label] += 1
    return counts
