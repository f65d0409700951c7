import pytest

from meld.context import dialogue_context, format_with_context
from meld.records import Utterance


def utt(split: str, dialogue: int, index: int, speaker: str, text: str) -> Utterance:
    return Utterance(split, dialogue, index, speaker, text, "neutral", "neutral", 1, 1, 0.0, 1.0, 0)


# Dialogue 0 has a gap (no utterance 2) and is given out of order; train/dia1 and dev/dia0 are other
# dialogues and must never leak into train/dia0.
UTTERANCES = [
    utt("train", 0, 3, "Ross", "r3"),
    utt("train", 0, 0, "Monica", "m0"),
    utt("train", 1, 0, "Rachel", "other dialogue"),
    utt("train", 0, 1, "Joey", "j1"),
    utt("dev", 0, 0, "Phoebe", "other split"),
    utt("train", 0, 4, "Chandler", "c4"),
]


def test_k0_gives_no_context():
    assert dialogue_context(UTTERANCES, 0) == {u.key: [] for u in UTTERANCES}


def test_k1():
    assert dialogue_context(UTTERANCES, 1) == {
        "train/dia0_utt0": [],
        "train/dia0_utt1": [("Monica", "m0")],
        "train/dia0_utt3": [("Joey", "j1")],
        "train/dia0_utt4": [("Ross", "r3")],
        "train/dia1_utt0": [],
        "dev/dia0_utt0": [],
    }


def test_k2_across_the_gap():
    context = dialogue_context(UTTERANCES, 2)
    assert context["train/dia0_utt1"] == [("Monica", "m0")]
    assert context["train/dia0_utt3"] == [("Monica", "m0"), ("Joey", "j1")]
    assert context["train/dia0_utt4"] == [("Joey", "j1"), ("Ross", "r3")]
    assert context["train/dia1_utt0"] == [] and context["dev/dia0_utt0"] == []


def test_large_k_is_whole_history():
    assert dialogue_context(UTTERANCES, 10)["train/dia0_utt4"] == [("Monica", "m0"), ("Joey", "j1"), ("Ross", "r3")]


def test_negative_k():
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        dialogue_context(UTTERANCES, -1)


def test_format_with_context():
    current = UTTERANCES[5]
    context = dialogue_context(UTTERANCES, 2)[current.key]
    assert format_with_context(current, context) == "Joey: j1 </s> Ross: r3 </s> Chandler: c4"
    assert format_with_context(current, []) == "Chandler: c4"
    assert format_with_context(current, context, sep=" | ", turn_format="{text}") == "j1 | r3 | c4"
    assert format_with_context(current, context, sep="\n", turn_format="[{speaker}] {text}") == (
        "[Joey] j1\n[Ross] r3\n[Chandler] c4"
    )
