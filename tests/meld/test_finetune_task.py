"""The fine-tune's engine task: the training loss, with and without the unimodal losses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from meld.classifier import HeadOnly
from clara.config import ConfigError
from meld.finetune import load_config, unimodal_losses
from meld.finetune_task import ClassificationTask
from meld.fusion import FusionHead

_WEIGHTS = torch.tensor([0.5, 1.0, 2.0])


def _task(tmp_path, unimodal_weight: float) -> ClassificationTask:
    dev = SimpleNamespace(utterances=[SimpleNamespace(emotion="neutral")])
    loss = torch.nn.CrossEntropyLoss(weight=_WEIGHTS)
    return ClassificationTask(loss, "emotion", ("neutral", "joy", "surprise"), dev, None, 8, tmp_path,
                              unimodal_weight=unimodal_weight)


def _batch() -> dict:
    torch.manual_seed(3)
    return {"embeddings": {"audio": torch.randn(6, 4), "text": torch.randn(6, 5)},
            "emotion": torch.tensor([0, 1, 2, 2, 1, 0])}


def test_unimodal_losses_add_each_inputs_own_weighted_loss(tmp_path):
    model = HeadOnly(FusionHead({"audio": 4, "text": 5}, 3, dropout=0.0))
    batch = _batch()
    loss, logs = _task(tmp_path, 0.5).training_step(model, batch)
    gold = batch["emotion"]
    head, emb = model.head, batch["embeddings"]
    weight, bias = head.classifier.weight, head.classifier.bias
    audio = head.norms["audio"](emb["audio"]) @ weight[:, :4].T + bias
    text = head.norms["text"](emb["text"]) @ weight[:, 4:].T + bias
    fused = audio + text - bias
    ce = lambda logits: F.cross_entropy(logits, gold, weight=_WEIGHTS)  # noqa: E731
    expected = ce(fused) + 0.5 * (ce(audio) + ce(text))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss_fused"].item() == pytest.approx(ce(fused).item(), rel=1e-5)
    assert logs["loss_audio"].item() == pytest.approx(ce(audio).item(), rel=1e-5)
    assert logs["loss_text"].item() == pytest.approx(ce(text).item(), rel=1e-5)
    loss.backward()
    assert head.classifier.weight.grad is not None


def test_without_unimodal_weight_the_loss_is_the_fused_loss_alone(tmp_path):
    model = HeadOnly(FusionHead({"audio": 4, "text": 5}, 3, dropout=0.0))
    batch = _batch()
    loss, logs = _task(tmp_path, 0.0).training_step(model, batch)
    assert loss.item() == pytest.approx(F.cross_entropy(model(batch), batch["emotion"], weight=_WEIGHTS).item())
    assert set(logs) == {"accuracy"}


def test_unimodal_losses_need_several_inputs_and_a_positive_weight():
    config = load_config(None, ["loss.unimodal_weight=1"])
    assert unimodal_losses(config, ("audio", "text"))
    assert not unimodal_losses(config, ("text",))  # one input: its own loss would repeat the fused one
    assert not unimodal_losses(load_config(None, ["loss.unimodal_weight=0"]), ("audio", "text"))
    with pytest.raises(ConfigError, match="unimodal_weight"):
        load_config(None, ["loss.unimodal_weight=-1"])
