"""The fine-tune's engine task: the training loss, with and without the unimodal losses; the dev selection's state."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import default_collate

from clara.checkpoint import CheckpointError
from meld.classifier import HeadOnly
from clara.config import ConfigError
from meld.embedding_cache import EmbeddingDataset
from meld.finetune import load_config, unimodal_losses
from meld.finetune_task import BEST_STATE, BEST_WEIGHTS, ClassificationTask
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


class _Dev(torch.utils.data.Dataset):
    """Three neutral dev utterances with 4-d audio embeddings, as a linear probe evaluates them."""

    def __init__(self) -> None:
        self.utterances = [SimpleNamespace(emotion="neutral", sentiment="neutral", key=f"dev/dia0_utt{i}")
                           for i in range(3)]

    def __len__(self) -> int:
        return 3


def _evaluating_task(out_dir) -> ClassificationTask:
    dev = EmbeddingDataset({"audio": torch.randn(3, 4)}, _Dev())
    task = ClassificationTask(torch.nn.CrossEntropyLoss(), "emotion", ("neutral", "joy", "surprise"), dev,
                              default_collate, 8, out_dir)
    task.trainer = SimpleNamespace(device=torch.device("cpu"), precision="fp32", step=0, steps_per_epoch=1, writer=None)
    return task


def _predicting(label: int) -> HeadOnly:
    """A head that predicts class ``label`` for every input."""
    model = HeadOnly(FusionHead({"audio": 4}, 3, dropout=0.0)).eval()
    with torch.no_grad():
        model.head.classifier.weight.zero_()
        model.head.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), 3) * 5.0)
    return model


def test_a_crash_between_the_weights_and_best_json_keeps_the_weights_selection(tmp_path):
    task = _evaluating_task(tmp_path)
    task.trainer.step = 1
    task.evaluate(_predicting(1))  # all joy: macro-F1 0, the first best all the same
    stale = (tmp_path / BEST_STATE).read_text()
    task.trainer.step = 2
    task.evaluate(_predicting(0))  # all neutral, as the labels: a new best
    newest = json.loads((tmp_path / BEST_STATE).read_text())
    assert newest["step"] == 2 and newest["macro_f1"] > json.loads(stale)["macro_f1"]
    # Killed after the weights were replaced, before best.json was: the record must describe the weights.
    (tmp_path / BEST_STATE).write_text(stale)
    assert _evaluating_task(tmp_path).best == newest
    assert json.loads((tmp_path / BEST_STATE).read_text()) == newest  # brought back in line
    # A damaged best.json is recovered the same way, from the record the weights carry.
    (tmp_path / BEST_STATE).write_text("{")
    assert _evaluating_task(tmp_path).best == newest
    assert json.loads((tmp_path / BEST_STATE).read_text()) == newest


def _old_run(tmp_path, best_json: str | None, weights: bytes | None) -> None:
    """A run directory as runs before the weights carried their record left it."""
    if best_json is not None:
        (tmp_path / BEST_STATE).write_text(best_json)
    if weights is not None:
        (tmp_path / BEST_WEIGHTS).write_bytes(weights)


def _plain_weights(tmp_path) -> bytes:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    return (tmp_path / "plain.safetensors").read_bytes()


_RECORD = '{"epoch": 3, "step": 30, "macro_f1": 0.25}\n'


@pytest.mark.parametrize("case, named, expected", [
    ("torn best.json", BEST_STATE, "not readable"),
    ("best.json of the wrong shape", BEST_STATE, "expected {\"epoch\": int"),
    ("weights deleted", BEST_WEIGHTS, "missing, but .*best.json records a best dev epoch \\(3, macro-F1 0.2500\\)"),
    ("weights overwritten", BEST_WEIGHTS, "not readable"),
])
def test_damaged_selection_state_is_one_error_naming_the_file(tmp_path, case, named, expected):
    best_json, weights = {
        "torn best.json": ("{", _plain_weights(tmp_path)),
        "best.json of the wrong shape": ("[]", _plain_weights(tmp_path)),
        "weights deleted": (_RECORD, None),
        "weights overwritten": (_RECORD, b"garbage\n"),
    }[case]
    _old_run(tmp_path, best_json, weights)
    with pytest.raises(CheckpointError, match=expected) as caught:
        _evaluating_task(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / named}: ") and "\n" not in message
    assert "to resume with the selection starting over" in message
    for path in (tmp_path / BEST_STATE, tmp_path / BEST_WEIGHTS):  # the advice names what is there to delete
        assert (str(path) in message.split("delete ")[1]) == path.exists()


def test_an_intact_selection_of_an_older_run_is_resumed(tmp_path):
    _old_run(tmp_path, _RECORD, _plain_weights(tmp_path))
    assert _evaluating_task(tmp_path).best == json.loads(_RECORD)
    (tmp_path / BEST_STATE).unlink()  # weights without a record: replaced at the next evaluation
    assert _evaluating_task(tmp_path).best is None
