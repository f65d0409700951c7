"""The engine task of fine-tuning: one classification loss per step, dev evaluation with model selection.

After every epoch the engine calls ``evaluate``: the dev split is classified, its metrics logged, and
the weights saved to ``best.safetensors`` when dev macro-F1 beats every earlier epoch (ties keep the
earlier one), with that epoch's confusion-matrix figure in TensorBoard unless ``dev_figures`` is off
(light runs: sweep trials). ``best.json`` records which epoch that was, so a resumed run keeps
selecting against the same best. The weights carry the same record in their metadata and are written
first, so after a crash between the two files, or a damaged ``best.json``, the weights' record holds.
Then ``epoch_callback(epoch, dev_metrics)`` runs; an exception it raises (a sweep pruning the trial)
propagates out of ``fit``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from clara.checkpoint import CheckpointError
from clara.io_utils import atomic_path, atomic_write_text
from meld.inference import forward_all
from meld.labels import label_index
from meld.metrics import SCALARS, classification_metrics
from meld.report import log_confusion_figure

BEST_WEIGHTS = "best.safetensors"
BEST_STATE = "best.json"
_SELECTION_KEY = "meld_clara_best"  # best.safetensors' metadata: the best.json record of these weights


def labels_of(dataset: Dataset, target: str) -> torch.Tensor:
    """[N] class indices of ``target`` for every utterance of a dataset, in its order."""
    return torch.tensor([label_index(target, getattr(utt, target)) for utt in dataset.utterances], dtype=torch.long)


def _parse(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _valid_best(best: object) -> bool:
    return (isinstance(best, dict) and all(isinstance(best.get(k), int) for k in ("epoch", "step"))
            and isinstance(best.get("macro_f1"), (int, float)))


def read_best(out_dir: Path) -> dict | None:
    """The selection so far in a run directory (None when it has none yet), checked against its weights.

    Raises CheckpointError naming the file when the selection is damaged: unreadable weights, or a
    record that cannot be read (and that the weights do not carry themselves), or a record whose
    weights are gone. Resuming would otherwise fail at the end or keep a best that no longer exists.
    """
    weights, state = out_dir / BEST_WEIGHTS, out_dir / BEST_STATE
    damaged = " and ".join(str(path) for path in (state, weights) if path.exists())
    advice = f"delete {damaged} to resume with the selection starting over, or give a new --out to train afresh"
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:
                own = (handle.metadata() or {}).get(_SELECTION_KEY)
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{weights}: not readable ({err}); it holds the best dev weights so far: "
                                  f"{advice}") from None
        best = _parse(own) if own is not None else None
        if _valid_best(best):
            if not state.is_file() or state.read_bytes() != _state_text(best).encode():
                atomic_write_text(state, _state_text(best))  # a crash between the two writes, or damage
            return best
    if not state.is_file():
        return None  # weights without a record are overwritten at the next evaluation
    try:
        best = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state}: not readable ({err}); it records the best dev epoch so far: {advice}") from None
    if not _valid_best(best):
        raise CheckpointError(f"{state}: expected {{\"epoch\": int, \"step\": int, \"macro_f1\": number}}, "
                              f"got {json.dumps(best)[:80]}: {advice}")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing, but {state} records a best dev epoch ({best['epoch']}, macro-F1 "
                              f"{best['macro_f1']:.4f}) with those weights: {advice}")
    return best


def _state_text(best: dict) -> str:
    return json.dumps(best) + "\n"


class ClassificationTask:
    def __init__(self, loss: torch.nn.Module, target: str, class_names: tuple[str, ...], dev: Dataset,
                 collate_fn: Callable, batch_size: int, out_dir: Path,
                 epoch_callback: Callable[[int, dict], None] | None = None, *, dev_figures: bool = True,
                 unimodal_weight: float = 0.0) -> None:  # fmt: skip
        self.loss = loss
        self.unimodal_weight = unimodal_weight
        self.target = target
        self.class_names = class_names
        self.dev = dev
        self.dev_labels = labels_of(dev, target)
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.out_dir = out_dir
        self.epoch_callback = epoch_callback
        self.dev_figures = dev_figures
        self.trainer = None  # set once the Trainer exists: evaluation needs its step, writer and device
        self.best = read_best(out_dir)

    def training_step(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        gold = batch[self.target]  # [B]
        if not self.unimodal_weight:
            logits = model(batch)  # [B, C]
            return self.loss(logits, gold), {"accuracy": (logits.argmax(-1) == gold).float().mean()}
        logits, own = model(batch, unimodal=True)  # [B, C], {input: [B, C]}
        fused = self.loss(logits, gold)
        logs = {"accuracy": (logits.argmax(-1) == gold).float().mean(), "loss_fused": fused.detach()}
        loss = fused
        for name, own_logits in own.items():
            own_loss = self.loss(own_logits, gold)
            logs[f"loss_{name}"] = own_loss.detach()
            loss = loss + self.unimodal_weight * own_loss
        return loss, logs

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        trainer = self.trainer
        out = forward_all(model, self.dev, self.collate_fn, self.batch_size, trainer.device, precision=trainer.precision)
        pred = out["logits"].argmax(-1)
        metrics = classification_metrics(self.dev_labels.tolist(), pred.tolist(), self.class_names)
        epoch = trainer.step // trainer.steps_per_epoch
        if self.best is None or metrics["macro_f1"] > self.best["macro_f1"]:
            self.best = {"epoch": epoch, "step": trainer.step, "macro_f1": metrics["macro_f1"]}
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
            with atomic_path(self.out_dir / BEST_WEIGHTS) as tmp:
                save_file(tensors, str(tmp), metadata={_SELECTION_KEY: json.dumps(self.best)})
            atomic_write_text(self.out_dir / BEST_STATE, _state_text(self.best))
            # Drawn at each new best only: a figure costs more than a linear-probe epoch, and the
            # selected checkpoint's matrix is the one worth seeing.
            if self.dev_figures and trainer.writer is not None:
                log_confusion_figure(trainer.writer, "dev/confusion_matrix", metrics["confusion_matrix"],
                                     self.class_names, trainer.step)
        if self.epoch_callback is not None:
            self.epoch_callback(epoch, metrics)
        scalars = {key: metrics[key] for key in SCALARS}
        scalars["loss"] = float(F.cross_entropy(out["logits"], self.dev_labels))
        scalars["best_macro_f1"] = self.best["macro_f1"]
        return scalars
