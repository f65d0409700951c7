"""What the README promises on the TensorBoard dashboards of a fine-tune run is in its event files."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from meld.finetune import run_finetune
from tests.meld.finetune_helpers import text_config, write_csv_meld


def load_events(directory: Path) -> list[EventAccumulator]:
    runs = {path.parent for path in directory.rglob("events.out.tfevents.*")}
    accumulators = []
    for run in sorted(runs):
        acc = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        accumulators.append(acc)
    return accumulators


def test_finetune_dashboards_hold_scalars_hparams_images_pr_curves_and_projector(tmp_path):
    root = write_csv_meld(tmp_path / "meld")
    out = tmp_path / "run"
    run_finetune(text_config(root, "tensorboard_extras=true"), out_dir=out)
    scalars, images, tensors, plugins = set(), set(), set(), set()
    for acc in load_events(out / "tensorboard"):
        tags = acc.Tags()
        scalars.update(tags["scalars"])
        images.update(tags["images"])
        tensors.update(tags["tensors"])
        plugins.update(acc.PluginTagToContent("hparams") and ["hparams"])
        plugins.update(acc.PluginTagToContent("pr_curves") and ["pr_curves"])
    assert any(tag.startswith("train/loss") or tag.endswith("/loss") for tag in scalars), scalars
    assert any("macro_f1" in tag for tag in scalars), scalars
    assert "test/confusion_matrix" in images and "dev/confusion_matrix" in images
    assert {"hparams", "pr_curves"} <= plugins
    assert any(tag.startswith("test/pr/") for tag in tensors), tensors
    assert list((out / "tensorboard").rglob("projector_config.pbtxt"))
