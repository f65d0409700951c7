"""What a fine-tune run writes after training: metrics.json, predictions.csv, report.md, the confusion
PNG and the TensorBoard extras (test confusion figure, per-class PR curves, hparams, test-set projector).

``outputs: light`` (sweep trials) keeps the files and the hparams and leaves out the figures, PR curves
and projector: drawing them costs a linear-probe run several times its training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from clara import config as config_lib
from meld.report import (
    coverage_lines, log_confusion_figure, log_embeddings, log_hparams, log_pr_curves, save_confusion_png,
    write_metrics_json, write_predictions_csv, write_report_md,
)

CONFUSION_PNG = "confusion_test.png"


def _title(config) -> str:
    source = config.model.checkpoint or f"CLARA {config.model.clara} from scratch"
    return (f"MELD {config.target}: {config.strategy.name} on {config.data.modality} "
            f"({source}, fusion {config.model.fusion}, loss {config.loss.name})")


def _sections(doc: Mapping) -> dict[str, str]:
    """The report's sections after the tables: the CSV rows each split used, then the model selection."""
    sections = {"CSV rows used": coverage_lines(doc["rows"])} if "rows" in doc else {}
    return {**sections, **_selection_section(doc)}


def _selection_section(doc: Mapping) -> dict[str, str]:
    selection = doc.get("selection", {})
    if not selection:
        return {}
    text = (f"The checkpoint of epoch {selection['epoch']} (step {selection['step']}), the best dev macro-F1 "
            f"({100 * selection['macro_f1']:.2f}) of seed {selection['seed']}.")
    if "mean_std" in doc:
        text += (f" Of the {doc['mean_std']['runs']} seeds, seed {selection['seed']} has the best dev macro-F1: "
                 "its run is the one in the tables above, while the headline is the mean over all seeds.")
    return {"Model selection": text}


def write_run_outputs(out_dir: Path, config, doc: Mapping, test_outputs: Mapping, gold: torch.Tensor,
                      keys: Sequence[str], class_names: Sequence[str], *, step: int) -> None:  # fmt: skip
    """One seed's files; ``test_outputs`` are ``meld.inference.forward_all``'s (logits [N, C], fused [N, F])."""
    probabilities = test_outputs["logits"].softmax(-1).numpy()  # [N, C]
    pred = probabilities.argmax(-1)
    png = _png(config)
    write_predictions_csv(out_dir / "predictions.csv", keys, gold.tolist(), pred.tolist(), probabilities, class_names)
    if png is not None:
        save_confusion_png(out_dir / png, doc["test"]["confusion_matrix"], class_names, "test")
    write_report_md(out_dir / "report.md", _title(config), doc, class_names, confusion_png=png,
                    extra_sections=_sections(doc))
    if config.tensorboard_extras:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
        try:
            scalars = {split: {k: v for k, v in doc[split].items() if isinstance(v, float)} for split in ("dev", "test")}
            log_hparams(writer, config_lib.to_dict(config), scalars)
            if config.outputs == "full":
                _log_test_extras(writer, doc, probabilities, test_outputs, gold, class_names, step)
        finally:
            writer.close()
    # Last: a run folder with metrics.json holds every output (meld.sweep's final runs are reused on
    # it). Written first, a Ctrl-C or kill while the figures were drawn left a run taken for finished.
    write_metrics_json(out_dir / "metrics.json", doc)


def _log_test_extras(writer, doc: Mapping, probabilities, test_outputs: Mapping, gold: torch.Tensor,
                     class_names: Sequence[str], step: int) -> None:  # fmt: skip
    """The heavy TensorBoard extras: test confusion figure, PR curves, projector of the fused test features."""
    log_confusion_figure(writer, "test/confusion_matrix", doc["test"]["confusion_matrix"], class_names, step)
    log_pr_curves(writer, "test/pr", gold.tolist(), probabilities, class_names, step)
    log_embeddings(writer, test_outputs["fused"].numpy(), [class_names[g] for g in gold.tolist()], "test/fused", step)


def _png(config) -> str | None:
    """The confusion PNG's name, which light runs do not draw."""
    return CONFUSION_PNG if config.outputs == "full" else None


def write_seed_summary(out_dir: Path, config, doc: Mapping, class_names: Sequence[str]) -> None:
    """The top level of a multi-seed run: the selected seed's metrics beside mean ± std over all seeds."""
    write_report_md(out_dir / "report.md", _title(config), doc, class_names, confusion_png=_png(config),
                    seeds=doc["mean_std"], extra_sections=_sections(doc))
    write_metrics_json(out_dir / "metrics.json", doc)  # last, as in write_run_outputs
