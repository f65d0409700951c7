"""Classification metrics for every MELD run (fine-tuning, zero-shot, sweeps), in plain numpy.

MELD is skewed (neutral is about half of every split), so macro-F1 is the headline: it weighs each
emotion equally, whereas weighted-F1 and accuracy are dominated by neutral and hide classes a model
never predicts. All values are fractions in [0, 1]; reports print them as percentages.

Conventions (chosen so every number is finite and JSON-safe, and stated in every report):

* A class never predicted has precision 0 (not NaN), hence F1 0.
* A class absent from the gold labels (support 0) has recall 0 and F1 0 in ``per_class`` and is
  EXCLUDED from macro-F1 and balanced accuracy: an average over the classes the split contains.
  This equals scikit-learn's ``f1_score(..., average="macro", labels=<classes present in gold>,
  zero_division=0)`` and its ``balanced_accuracy_score`` (which drops such classes too). Predictions
  of an absent class are still errors: they lower the recall of the true classes and the accuracy.
* Weighted-F1 weighs each class by its support, so absent classes drop out of it by themselves.

With these conventions, always predicting neutral on the official MELD test split gives accuracy
48.12, weighted-F1 31.27 and macro-F1 9.28 (percent), the figures the literature reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# The scalar entries of a split's metrics, headline first; also the order every report uses.
SCALARS = ("macro_f1", "weighted_f1", "accuracy", "balanced_accuracy")


def confusion_matrix(gold: Sequence[int], pred: Sequence[int], num_classes: int) -> np.ndarray:
    """[C, C] int64 counts; row = gold class, column = predicted class."""
    gold_arr = np.asarray(gold, dtype=np.int64).reshape(-1)
    pred_arr = np.asarray(pred, dtype=np.int64).reshape(-1)
    if gold_arr.shape != pred_arr.shape:
        raise ValueError(f"gold has {gold_arr.size} labels but pred has {pred_arr.size}")
    for name, arr in (("gold", gold_arr), ("pred", pred_arr)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has a label outside 0..{num_classes - 1}")
    flat = np.bincount(gold_arr * num_classes + pred_arr, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, with 0 where den is 0 (the zero-division convention above)."""
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Every metric from a [C, C] confusion matrix (rows gold, columns predicted).

    Counts may be fractional (expected counts, see ``reference_metrics``).
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not fit {len(class_names)} class names")
    support = cm.sum(axis=1)
    total = support.sum()
    if total <= 0:
        raise ValueError("no examples to score")
    true_pos = np.diag(cm)
    precision = _ratio(true_pos, cm.sum(axis=0))
    recall = _ratio(true_pos, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = support > 0
    counts = cm.tolist() if np.any(cm != np.round(cm)) else cm.astype(np.int64).tolist()
    return {
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float((f1 * support).sum() / total),
        "accuracy": float(true_pos.sum() / total),
        "balanced_accuracy": float(recall[present].mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]) if support[i] == round(support[i]) else float(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": counts,
    }


def classification_metrics(gold: Sequence[int], pred: Sequence[int], class_names: Sequence[str]) -> dict:
    """Metrics of predicted vs gold class indices (both into ``class_names``).

    Keys: ``macro_f1``, ``weighted_f1``, ``accuracy``, ``balanced_accuracy`` (floats in [0, 1]),
    ``per_class`` ({name: {precision, recall, f1, support}}) and ``confusion_matrix`` (list of lists,
    rows gold, columns predicted).
    """
    return metrics_from_confusion(confusion_matrix(gold, pred, len(class_names)), class_names)


def reference_metrics(support: Sequence[float], class_names: Sequence[str]) -> dict[str, dict]:
    """What trivial predictors score on a split with these gold counts per class.

    ``always <majority>`` predicts the most frequent class for every example (neutral on MELD);
    ``uniform chance`` guesses each class with probability 1/C, scored on its expected confusion
    matrix. A model's report puts its numbers beside these.
    """
    counts = np.asarray(support, dtype=np.float64)
    num_classes = len(class_names)
    majority = int(np.argmax(counts))
    always = np.zeros((num_classes, num_classes))
    always[:, majority] = counts
    uniform = np.repeat(counts[:, None] / num_classes, num_classes, axis=1)
    return {
        f"always {class_names[majority]}": metrics_from_confusion(always, class_names),
        "uniform chance": metrics_from_confusion(uniform, class_names),
    }


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def mean_std(runs: Sequence[Mapping]) -> dict:
    """Mean and sample standard deviation (ddof=1) of every numeric entry across runs (e.g. seeds).

    ``runs`` are metrics dicts of one shape (one split's, or whole ``{"dev": ..., "test": ...}``
    documents). The result mirrors that shape with each number replaced by ``{"mean", "std"}``, so
    ``per_class.fear.f1`` becomes ``{"mean": ..., "std": ...}``; lists (the confusion matrix) are left
    out. With a single run the std is 0. A ``"runs"`` entry records how many runs were averaged.
    """
    if not runs:
        raise ValueError("mean_std needs at least one run")
    return {**_mean_std_tree(runs, path="metrics"), "runs": len(runs)}


def _mean_std_tree(nodes: Sequence[Mapping], path: str) -> dict:
    keys = list(nodes[0])
    for node in nodes[1:]:
        if list(node) != keys:
            raise ValueError(f"runs differ in the keys of {path}: {keys} vs {list(node)}")
    out: dict = {}
    for key in keys:
        values = [node[key] for node in nodes]
        if all(_is_number(v) for v in values):
            arr = np.asarray(values, dtype=np.float64)
            out[key] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}
        elif all(isinstance(v, Mapping) for v in values):
            out[key] = _mean_std_tree(values, f"{path}.{key}")
    return out
