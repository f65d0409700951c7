"""Running a classifier (or just its encoders) over a whole dataset, in length-sorted batches.

Results come back in the dataset's own order, whatever order the batches ran in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from clara.engine import move_to
from clara.precision import autocast_for
from meld.finetune_data import ordered_batches


@torch.no_grad()
def forward_all(model: torch.nn.Module, dataset: Dataset, collate_fn: Callable, batch_size: int,
                device: torch.device, *, head: bool = True, precision: str = "fp32") -> dict:  # fmt: skip
    """``{"embeddings": {input: [N, D]}}`` and, with ``head``, ``"fused"`` [N, F] and ``"logits"`` [N, C].

    ``model`` has ``embed(batch)`` and, with ``head``, a ``head`` (``meld.fusion.FusionHead``); the
    caller puts it in eval mode. The encoders and head run under ``precision``'s autocast (a
    resolved clara.precision value: the training run's). Tensors come back float32 on the CPU.
    """
    lengths = getattr(dataset, "lengths", None) or [0] * len(dataset)
    batches = ordered_batches(lengths, batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn)
    parts: dict[str, list[torch.Tensor]] = {}
    order: list[int] = []
    for indices, batch in zip(batches, loader):
        with autocast_for(device, precision):
            embeddings = model.embed(move_to(batch, device))
            outputs = {f"embeddings/{name}": value for name, value in embeddings.items()}
            if head:
                outputs["fused"] = model.head.fuse(embeddings)
                outputs["logits"] = model.head.classifier(outputs["fused"])
        for name, value in outputs.items():
            parts.setdefault(name, []).append(value.float().cpu())
        order += indices
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    stacked = {name: torch.cat(values)[inverse] for name, values in parts.items()}
    result: dict = {"embeddings": {name.split("/", 1)[1]: value for name, value in stacked.items() if "/" in name}}
    result.update({name: value for name, value in stacked.items() if "/" not in name})
    return result
