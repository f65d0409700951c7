"""The linear probe's embedding cache: frozen encoders run once per (weights, data settings), then reused.

    key = cache_key(classifier.encoders(), fingerprint)       # hex digest
    embeddings = load_or_encode(path_for(cache_root, key), encode)   # {split: {input: [N, D]}}

The key hashes the encoder weights themselves (so it covers the checkpoint and a from-scratch model's
seed), the inputs and feature kind, and the fingerprint the caller gives: the data (data root, data
settings and each split's ``content_digest``: every utterance's key and words in order, and the
feature store's clip records) and the CLARA config, whose settings such as
``mask_padding`` change the embeddings without changing a weight. A file is one safetensors of tensors
``<split>/<input>``, written atomically; a corrupt file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from clara.io_utils import atomic_path
from meld.labels import label_index


def cache_key(encoders: torch.nn.Module, fingerprint: Mapping) -> str:
    """24 hex digits of SHA-256 over the encoders' state_dict and the JSON ``fingerprint``."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoders.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def path_for(cache_root: str | Path, key: str) -> Path:
    return Path(cache_root) / "embeddings" / f"{key}.safetensors"


def load_or_encode(path: Path, encode: Callable[[], dict[str, dict[str, torch.Tensor]]]) -> tuple[dict, bool]:
    """The cached ``{split: {input: [N, D]}}`` at ``path``, or ``encode()``'s, saved there; and whether it was cached."""
    if path.is_file():
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError):
            flat = None
        if flat is not None:
            nested: dict[str, dict[str, torch.Tensor]] = {}
            for name, tensor in flat.items():
                split, modality = name.split("/", 1)
                nested.setdefault(split, {})[modality] = tensor
            return nested, True
    nested = encode()
    flat = {f"{split}/{name}": tensor.contiguous() for split, values in nested.items() for name, tensor in values.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": "meld-clara-embeddings/1"})
    return nested, False


class EmbeddingDataset(Dataset):
    """Cached embeddings of one split with the labels of its utterances; items collate with torch's default."""

    def __init__(self, embeddings: Mapping[str, torch.Tensor], source: Dataset) -> None:
        sizes = {name: len(value) for name, value in embeddings.items()}
        if set(sizes.values()) != {len(source)}:
            raise ValueError(f"embeddings of sizes {sizes} do not fit {len(source)} utterances")
        self.embeddings = dict(embeddings)
        self.utterances = source.utterances
        self.lengths = [0] * len(source)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        utt = self.utterances[index]
        return {"embeddings": {name: value[index] for name, value in self.embeddings.items()},
                "emotion": label_index("emotion", utt.emotion), "sentiment": label_index("sentiment", utt.sentiment),
                "keys": utt.key}
