import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from meld.labels import EMOTIONS
from meld.metrics import classification_metrics, confusion_matrix, mean_std, metrics_from_confusion, reference_metrics

ABC = ("a", "b", "c")
# The official MELD test split's gold counts, in EMOTIONS order.
MELD_TEST_COUNTS = {"neutral": 1256, "joy": 402, "surprise": 281, "anger": 345, "sadness": 208, "disgust": 68,
                    "fear": 50}


def test_three_classes_by_hand():
    gold = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
    # Confusion (rows gold): a -> [2, 1, 1], b -> [1, 2, 0], c -> [0, 1, 2]; predicted totals 3, 4, 3.
    # precision a 2/3, b 2/4, c 2/3; recall a 2/4, b 2/3, c 2/3
    # F1 a = 2(2/3)(1/2)/(7/6) = 4/7, b = 4/7, c = 2/3
    # macro = (4/7 + 4/7 + 2/3)/3 = 38/63; weighted = (4*4/7 + 3*4/7 + 3*2/3)/10 = 6/10
    # accuracy = 6/10; balanced accuracy = (1/2 + 2/3 + 2/3)/3 = 11/18
    m = classification_metrics(gold, pred, ABC)
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["macro_f1"] == pytest.approx(38 / 63)
    assert m["weighted_f1"] == pytest.approx(0.6)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(11 / 18)
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 0.5, "f1": 4 / 7, "support": 4})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert m["per_class"]["c"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert isinstance(m["per_class"]["a"]["support"], int)


def test_confusion_matrix_rows_are_gold():
    assert confusion_matrix([0, 0, 1], [1, 1, 1], 3).tolist() == [[0, 2, 0], [0, 1, 0], [0, 0, 0]]


def test_class_never_predicted_has_precision_and_f1_zero_not_nan():
    # c (support 1) is never predicted: 0/0 precision is 0, so F1 is 0 and it counts in macro-F1.
    # b: precision 2/3, recall 1, F1 0.8; macro = (1 + 0.8 + 0)/3 = 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero RuntimeWarning either
        m = classification_metrics([0, 0, 1, 1, 2], [0, 0, 1, 1, 1], ABC)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_class_absent_from_gold_is_excluded_from_macro_and_balanced():
    # c never occurs in gold but is predicted once. a: P 1, R 1/2, F1 2/3; b: F1 1.
    # macro = (2/3 + 1)/2 = 5/6 (c excluded, not averaged in as 0); balanced = (1/2 + 1)/2 = 3/4
    # weighted = (2 * 2/3 + 2 * 1)/4 = 5/6; accuracy 3/4 (the stray c prediction is still an error)
    gold, pred = [0, 0, 1, 1], [0, 2, 1, 1]
    m = classification_metrics(gold, pred, ABC)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)
    assert m["weighted_f1"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(3 / 4)
    # The convention is sklearn's with labels restricted to the classes present in gold.
    assert m["macro_f1"] == pytest.approx(skm.f1_score(gold, pred, labels=[0, 1], average="macro", zero_division=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has a class y_true lacks
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(gold, pred))


def test_all_correct_scores_one_even_with_an_absent_class():
    m = classification_metrics([0, 1, 1, 0], [0, 1, 1, 0], ABC)
    assert [m[k] for k in ("macro_f1", "weighted_f1", "accuracy", "balanced_accuracy")] == [1.0, 1.0, 1.0, 1.0]


def test_always_neutral_on_meld_test_reproduces_the_literature():
    gold = np.repeat(np.arange(len(EMOTIONS)), [MELD_TEST_COUNTS[name] for name in EMOTIONS])
    assert gold.size == 2610
    m = classification_metrics(gold, np.zeros_like(gold), EMOTIONS)
    assert round(100 * m["accuracy"], 2) == 48.12
    assert round(100 * m["weighted_f1"], 2) == 31.27
    assert round(100 * m["macro_f1"], 2) == 9.28
    assert round(100 * m["balanced_accuracy"], 2) == 14.29  # recall 1 for neutral, 0 for the other six
    assert all(m["per_class"][name]["f1"] == 0.0 for name in EMOTIONS[1:])
    # reference_metrics gives the same row from the counts alone.
    always = reference_metrics([MELD_TEST_COUNTS[name] for name in EMOTIONS], EMOTIONS)["always neutral"]
    assert {k: always[k] for k in ("macro_f1", "weighted_f1", "accuracy")} == pytest.approx(
        {k: m[k] for k in ("macro_f1", "weighted_f1", "accuracy")})


def test_uniform_chance_reference():
    # Two classes, 3 and 1 examples, guessed 50/50: expected confusion [[1.5, 1.5], [0.5, 0.5]].
    # precision 1.5/2 and 0.5/2, recall 1/2 each: F1 0.6 and 1/3; accuracy and balanced accuracy 1/2.
    chance = reference_metrics([3, 1], ("x", "y"))["uniform chance"]
    assert chance["confusion_matrix"] == [[1.5, 1.5], [0.5, 0.5]]
    assert chance["macro_f1"] == pytest.approx((0.6 + 1 / 3) / 2)
    assert chance["accuracy"] == pytest.approx(0.5)
    assert chance["balanced_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 7, size=400)
    pred = np.where(rng.random(400) < 0.4, gold, rng.integers(0, 7, size=400))
    m = classification_metrics(gold, pred, EMOTIONS)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(gold, pred, average="weighted"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(gold, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(gold, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(gold, pred, labels=range(7)).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(gold, pred, labels=range(7), zero_division=0)
    for i, name in enumerate(EMOTIONS):
        assert m["per_class"][name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]})


def test_bad_inputs():
    with pytest.raises(ValueError, match="gold has 2 labels but pred has 3"):
        confusion_matrix([0, 1], [0, 1, 1], 3)
    with pytest.raises(ValueError, match=r"pred has a label outside 0..2"):
        confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="no examples"):
        classification_metrics([], [], ABC)
    with pytest.raises(ValueError, match="does not fit 3 class names"):
        metrics_from_confusion(np.zeros((2, 2)), ABC)


def test_mean_std_over_seeds():
    runs = [classification_metrics([0, 0, 1, 2], pred, ABC) for pred in ([0, 0, 1, 2], [0, 1, 1, 1])]
    # run 1 is perfect; run 2: a P 1 R 1/2 F1 2/3, b P 1/3 R 1 F1 1/2, c F1 0 -> macro 7/18
    summary = mean_std(runs)
    assert summary["runs"] == 2
    macro = [1.0, 7 / 18]
    assert summary["macro_f1"]["mean"] == pytest.approx(np.mean(macro))
    assert summary["macro_f1"]["std"] == pytest.approx(np.std(macro, ddof=1))  # sample std across seeds
    assert summary["per_class"]["b"]["f1"] == pytest.approx({"mean": 0.75, "std": math.sqrt(0.125)})
    assert summary["per_class"]["a"]["support"] == {"mean": 2.0, "std": 0.0}
    assert "confusion_matrix" not in summary
    # Whole run documents nest the same way.
    nested = mean_std([{"dev": run, "test": run} for run in runs])
    assert nested["test"]["macro_f1"] == summary["macro_f1"]
    assert mean_std(runs[:1])["macro_f1"] == {"mean": 1.0, "std": 0.0}


def test_mean_std_refuses_mismatched_or_no_runs():
    run = classification_metrics([0, 1], [0, 1], ("a", "b"))
    with pytest.raises(ValueError, match="differ in the keys of metrics.per_class"):
        mean_std([run, classification_metrics([0, 1], [0, 1], ("a", "z"))])
    with pytest.raises(ValueError, match="at least one run"):
        mean_std([])
