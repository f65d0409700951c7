"""meld.inference.forward_all: dataset order whatever the batch order, and the precision it runs in."""

from __future__ import annotations

import torch

from clara import Clara, load_model_config
from meld.classifier import MeldClassifier, input_dims
from meld.dataset import collate
from meld.fusion import FusionHead
from meld.inference import forward_all


class Items(torch.utils.data.Dataset):
    """Five utterances of different lengths, as MeldDataset items; ``lengths`` drive the batching."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.lengths = [50, 20, 41, 33, 12]
        self.items = [{"key": f"u{i}", "speaker": "S", "emotion": i % 7, "sentiment": 0, "dialogue_id": 0,
                       "mel": torch.randn(80, n, generator=g), "tokens": torch.randint(1, 1000, (3 + i,), generator=g)}
                      for i, n in enumerate(self.lengths)]  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _classifier() -> MeldClassifier:
    torch.manual_seed(0)
    clara = Clara(load_model_config("tiny"))
    head = FusionHead(input_dims(clara, None, ("audio", "text"), "projected"), 7)
    return MeldClassifier(clara, head, inputs=("audio", "text"), features="projected").eval()


def test_outputs_come_back_in_dataset_order():
    model, data = _classifier(), Items()
    out = forward_all(model, data, collate, 2, torch.device("cpu"))
    with torch.no_grad():
        one_by_one = torch.cat([model(collate([data[i]])) for i in range(len(data))])
    torch.testing.assert_close(out["logits"], one_by_one, rtol=1e-4, atol=1e-5)
    assert out["embeddings"]["audio"].shape[0] == 5 and out["fused"].dtype == torch.float32


def test_bf16_precision_runs_under_autocast_and_stays_close():
    """precision="bf16" (what a GPU run resolves "auto" to) really computes in bf16, here on the CPU,
    and the logits stay within bf16 rounding of fp32's; outputs still come back float32."""
    model, data = _classifier(), Items()
    reference = forward_all(model, data, collate, 2, torch.device("cpu"))["logits"]
    low = forward_all(model, data, collate, 2, torch.device("cpu"), precision="bf16")["logits"]
    assert low.dtype == torch.float32
    relative = ((low - reference).norm() / reference.norm()).item()
    assert 1e-5 < relative < 5e-2
