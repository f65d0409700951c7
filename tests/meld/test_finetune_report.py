import numpy as np
import pytest
import torch

from meld import finetune_report
from meld.finetune import load_config
from meld.labels import EMOTIONS
from meld.metrics import classification_metrics, mean_std


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


def test_seed_summary_leads_with_the_mean_and_names_the_selected_seed(tmp_path):
    # Seed 7 (perfect, test macro-F1 1) has the best dev score; seed 8 scores test macro-F1 7/18
    # (F1 a 2/3, b 1/2, c 0). Headline: mean 25/36 = 69.44%, sample std (11/18)/sqrt(2) = 43.21%.
    abc = ("a", "b", "c")
    runs = [{split: classification_metrics([0, 0, 1, 2], pred, abc) for split in ("dev", "test")}
            for pred in ([0, 0, 1, 2], [0, 1, 1, 1])]
    doc = {**runs[0], "selection": {"epoch": 3, "step": 12, "macro_f1": 1.0, "seed": 7}, "mean_std": mean_std(runs)}
    config = load_config(None, ["outputs=light", "tensorboard_extras=false", "seeds=2"])
    finetune_report.write_seed_summary(tmp_path, config, doc, abc)
    text = (tmp_path / "report.md").read_text()
    assert "**test macro-F1: 69.44 ± 43.21**" in text
    assert "one of those runs, not the mean: test macro-F1 100.00" in text
    assert "Of the 2 seeds, seed 7 has the best dev macro-F1" in text
