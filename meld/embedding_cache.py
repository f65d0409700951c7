"""The linear probe's embedding cache: frozen encoders run once per (weights, data settings), then reused.

    key = cache_key(classifier.encoders(), fingerprint)       # hex digest
    embeddings = load_or_encode(path_for(cache_root, key), encode)   # {split: {input: [N, D]}}

The key hashes the encoder weights themselves (so it covers the checkpoint and a from-scratch model's
seed), the inputs and feature kind, and the fingerprint the caller gives: the data (data root, data
settings and each split's ``content_digest``: every utterance's key and words in order, and the
feature store's clip records) and the CLARA config, whose settings such as
``mask_padding`` change the embeddings without changing a weight. A file is one safetensors of tensors
``<split>/<input>``, written atomically, with its format and a SHA-256 of every tensor (name, dtype, shape,
bytes) in its metadata. A file that is unreadable, of another format, or whose tensors do not match that
checksum (truncated, damaged on disk, entries missing or reshaped) is a miss: recomputed and replaced,
with one line saying why, so neither a traceback nor wrong numbers come out of the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from clara.io_utils import atomic_path
from meld.labels import label_index

# Version 2 added the checksum; a version-1 file (no checksum to verify) is computed again once.
FORMAT = "meld-clara-embeddings/2"


def _raw(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes, as a uint8 array (any dtype, bfloat16 included, which numpy has not)."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def cache_key(encoders: torch.nn.Module, fingerprint: Mapping) -> str:
    """24 hex digits of SHA-256 over the encoders' state_dict and the JSON ``fingerprint``."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoders.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_raw(tensor))
    return digest.hexdigest()[:24]


def _checksum(flat: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: what a file must hold to be the one written."""
    digest = hashlib.sha256()
    for name, tensor in sorted(flat.items()):
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(_raw(tensor))
    return digest.hexdigest()


def path_for(cache_root: str | Path, key: str) -> Path:
    return Path(cache_root) / "embeddings" / f"{key}.safetensors"


def _read(path: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The tensors of the cache file at ``path`` by name, or None and why it cannot be trusted."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            flat = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        return None, f"{type(err).__name__}: {err}"
    if meta.get("format") != FORMAT:
        return None, f"format {meta.get('format')!r}, expected {FORMAT!r}"
    if meta.get("sha256") != _checksum(flat):
        return None, "its tensors do not match the checksum written with them: truncated or damaged"
    return flat, ""


def load_or_encode(path: Path, encode: Callable[[], dict[str, dict[str, torch.Tensor]]],
                   log: Callable[[str], None] = print) -> tuple[dict, bool]:
    """The cached ``{split: {input: [N, D]}}`` at ``path``, or ``encode()``'s, saved there; and whether it was cached.

    A file at ``path`` that fails ``_read``'s checks is recomputed and replaced, with one line to ``log``.
    """
    if path.is_file():
        flat, problem = _read(path)
        if flat is not None:
            nested: dict[str, dict[str, torch.Tensor]] = {}
            for name, tensor in flat.items():
                split, modality = name.split("/", 1)
                nested.setdefault(split, {})[modality] = tensor
            return nested, True
        log(f"{path}: not a usable embedding cache ({problem}); computing the embeddings again")
    nested = encode()
    flat = {f"{split}/{name}": tensor.contiguous() for split, values in nested.items() for name, tensor in values.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": FORMAT, "sha256": _checksum(flat)})
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
