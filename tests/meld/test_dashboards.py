"""What the README promises on the TensorBoard dashboards of a fine-tune run, full or light, is in its event files."""

from __future__ import annotations

import json

from meld.finetune import run_finetune
from tests.meld.finetune_helpers import text_config, write_csv_meld
from tests.meld.tensorboard_helpers import dashboards


def test_finetune_dashboards_hold_scalars_hparams_images_pr_curves_and_projector(tmp_path):
    root = write_csv_meld(tmp_path / "meld")
    out = tmp_path / "run"
    run_finetune(text_config(root, "tensorboard_extras=true"), out_dir=out)
    scalars, images, tensors, plugins = dashboards(out / "tensorboard")
    assert any(tag.startswith("train/loss") or tag.endswith("/loss") for tag in scalars), scalars
    assert any("macro_f1" in tag for tag in scalars), scalars
    assert "test/confusion_matrix" in images and "dev/confusion_matrix" in images
    assert {"hparams", "pr_curves"} <= plugins
    assert any(tag.startswith("test/pr/") for tag in tensors), tensors
    assert list((out / "tensorboard").rglob("projector_config.pbtxt"))
    assert "confusion_test.png" in (out / "report.md").read_text() and (out / "confusion_test.png").is_file()


def test_light_outputs_keep_scalars_and_hparams_and_drop_the_figures_only(tmp_path):
    root = write_csv_meld(tmp_path / "meld")
    full, light = tmp_path / "full", tmp_path / "light"
    run_finetune(text_config(root, "tensorboard_extras=true"), out_dir=full)
    run_finetune(text_config(root, "tensorboard_extras=true", "outputs=light"), out_dir=light)
    scalars, images, tensors, plugins = dashboards(light / "tensorboard")
    assert "eval/macro_f1" in scalars and "train/loss" in scalars and "hparams/test/macro_f1" in scalars, scalars
    assert plugins == {"hparams"} and not images and not any(tag.startswith("test/pr/") for tag in tensors)
    assert not list((light / "tensorboard").rglob("projector_config.pbtxt"))
    assert not (light / "confusion_test.png").exists() and ".png" not in (light / "report.md").read_text()
    assert (light / "predictions.csv").read_text() == (full / "predictions.csv").read_text()
    # The same training: only what is drawn afterwards differs.
    light_doc, full_doc = (json.loads((run / "metrics.json").read_text()) for run in (light, full))
    assert light_doc["dev"] == full_doc["dev"] and light_doc["test"] == full_doc["test"]
    assert light_doc["selection"]["step"] == full_doc["selection"]["step"]
    assert (light / "model" / "classifier.json").is_file()


def test_without_tensorboard_extras_the_dashboards_hold_scalars_only(tmp_path):
    root = write_csv_meld(tmp_path / "meld")
    out = tmp_path / "run"
    run_finetune(text_config(root, "tensorboard_extras=false"), out_dir=out)
    scalars, images, tensors, plugins = dashboards(out / "tensorboard")
    assert "eval/macro_f1" in scalars and "train/loss" in scalars, scalars
    assert not images and not plugins and not any(tag.startswith("test/pr/") for tag in tensors)
    assert not list((out / "tensorboard").rglob("projector_config.pbtxt"))
    # The files are outputs=full's: the PNG is drawn all the same.
    assert (out / "confusion_test.png").is_file()
