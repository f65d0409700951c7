"""Reading a run's TensorBoard event files back: which scalars, images, tensors and plugins they hold."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_events(directory: Path) -> list[EventAccumulator]:
    runs = {path.parent for path in directory.rglob("events.out.tfevents.*")}
    accumulators = []
    for run in sorted(runs):
        acc = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        accumulators.append(acc)
    return accumulators


def dashboards(directory: Path) -> tuple[set[str], set[str], set[str], set[str]]:
    """The scalar, image and tensor tags and the plugins (hparams, pr_curves) of a run's event files."""
    scalars, images, tensors, plugins = set(), set(), set(), set()
    for acc in load_events(directory):
        tags = acc.Tags()
        scalars.update(tags["scalars"])
        images.update(tags["images"])
        tensors.update(tags["tensors"])
        plugins.update(name for name in ("hparams", "pr_curves") if _has_plugin(acc, name))
    return scalars, images, tensors, plugins


def _has_plugin(acc: EventAccumulator, name: str) -> bool:
    try:
        return bool(acc.PluginTagToContent(name))
    except KeyError:  # no event of that plugin in this file
        return False
