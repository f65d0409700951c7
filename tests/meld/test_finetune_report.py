import numpy as np
import pytest
import torch

from meld import finetune_report
from meld.finetune import load_config
from meld.labels import EMOTIONS
from meld.metrics import classification_metrics


def _outputs(n: int = 40) -> tuple[dict, dict, torch.Tensor, list[str]]:
    rng = np.random.default_rng(0)
    gold = rng.integers(0, len(EMOTIONS), size=n)
    logits = torch.from_numpy(rng.normal(size=(n, len(EMOTIONS)))).float()
    pred = logits.argmax(-1).numpy()
    doc = {split: classification_metrics(gold, pred, EMOTIONS) for split in ("dev", "test")}
    doc["selection"] = {"epoch": 1, "step": 2, "macro_f1": doc["dev"]["macro_f1"], "seed": 0}
    test = {"logits": logits, "fused": torch.zeros(n, 4)}
    return doc, test, torch.from_numpy(gold), [f"test/dia{i}_utt0" for i in range(n)]


def test_metrics_json_is_written_last_so_an_interrupted_run_is_not_taken_for_finished(tmp_path, monkeypatch):
    # meld.sweep reuses a final run whose metrics.json exists; a Ctrl-C while the report was written
    # must not leave one behind, or the rerun keeps a run without its report.
    config = load_config(None, ["outputs=light", "tensorboard_extras=false"])
    doc, test, gold, keys = _outputs()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_report, "write_report_md", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune_report.write_run_outputs(tmp_path, config, doc, test, gold, keys, EMOTIONS, step=2)
    assert not (tmp_path / "metrics.json").exists()

    monkeypatch.undo()
    finetune_report.write_run_outputs(tmp_path, config, doc, test, gold, keys, EMOTIONS, step=2)
    assert all((tmp_path / name).is_file() for name in ("metrics.json", "report.md", "predictions.csv"))
