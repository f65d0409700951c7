import pytest

from meld.labels import EMOTIONS, SENTIMENTS, TARGETS, class_counts, label_index


def test_canonical_orders():
    assert EMOTIONS == ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
    assert SENTIMENTS == ("neutral", "positive", "negative")
    assert TARGETS == {"emotion": EMOTIONS, "sentiment": SENTIMENTS}


@pytest.mark.parametrize(
    ("target", "name", "index"),
    [
        ("emotion", "neutral", 0),
        ("emotion", " Joy ", 1),
        ("emotion", "FEAR", 6),
        ("emotion", "Disgust\t", 5),
        ("sentiment", "Negative", 2),
        ("sentiment", " positive", 1),
    ],
)
def test_label_index_ignores_case_and_surrounding_space(target, name, index):
    assert label_index(target, name) == index


def test_unknown_label_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"emotion 'happy' is not one of neutral, joy, surprise, anger, sadness, "
                                         r"disgust, fear"):
        label_index("emotion", "happy")


def test_unknown_target():
    with pytest.raises(ValueError, match=r"unknown target 'valence'; expected one of emotion, sentiment"):
        label_index("valence", "neutral")


def test_class_counts():
    assert class_counts([0, 2, 2, 6, 0, 0], 7) == [3, 0, 2, 0, 0, 0, 1]
    assert class_counts([], 3) == [0, 0, 0]


@pytest.mark.parametrize("bad", [-1, 3])
def test_class_counts_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"label index {bad} is outside 0..2"):
        class_counts([0, bad], 3)
