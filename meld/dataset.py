"""MELD as PyTorch datasets: cached log-mel features, tokens (optionally with dialogue context), labels.

    datasets = build_datasets(data_root, config)         # {"train": MeldDataset, "dev": ..., "test": ...}
    loader = make_dataloader(datasets["train"], config.batch_size, shuffle=True)
    batch = next(iter(loader))                           # padded tensors and lengths, see ``collate``
    counts = class_counts(datasets)["train"]["emotion"]  # for class weights, in meld.labels order

Audio comes from the feature cache ``python -m meld.prepare`` writes; rows whose clip is not cached
(missing, undecodable, silent) are left out of audio datasets and listed in ``dataset.dropped``. Text
needs only the CSVs, so ``modality="text"`` also runs on a CSV-only MELD folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clara.config import ConfigError
from clara.engine import sorted_in_pools
from clara.masking import round_up
from clara.tokenizer import Tokenizer, is_language, unknown_language
from meld.context import dialogue_context, format_with_context
from meld.demo import ensure_demo
from meld.errors import MeldDataError
from meld.feature_cache import (
    AudioSettings, SplitStore, audio_cache_dir, changed_clips, default_cache_root, store_path,
)
from meld.labels import TARGETS, label_index
from meld.labels import class_counts as count_labels
from meld.layout import find_layout
from meld.records import SPLITS, Utterance, load_splits

Modality = Literal["audio", "text", "both"]


@dataclass(frozen=True)
class DataConfig:
    """What the model is fed (``configs/data/default.yaml``); ``audio`` also keys the feature cache."""

    audio: AudioSettings = field(default_factory=AudioSettings)
    modality: Modality = "both"
    context_turns: int = 0  # previous turns, with speaker names, before the text; 0: the utterance alone
    max_tokens: int = 512  # a longer text loses its oldest context turns first, then its end
    language: str = "en"
    batch_size: int = 16  # build_loaders' batches; meld.finetune reads it for evaluation only (training: train.batch_size)
    bucket_by_length: bool = True  # batches of similar length, so less padding
    num_workers: int = 0  # build_loaders' worker processes; meld.finetune's training loader is the engine's (train.num_workers)
    # Pad a batch's mel frames / token ids up to a multiple of this (1: to the batch's longest). A
    # bounded set of batch shapes lets GPU kernel plans (cuDNN) and torch.compile graphs be reused
    # instead of rebuilt for every new length; e.g. 64 and 8. CLARA masks padding (mask_padding, the
    # default), so embeddings do not change; training's random audio-token dropout is drawn over the
    # padded length, so a seeded run is not bit-identical to one with multiple 1.
    frames_multiple: int = 1
    tokens_multiple: int = 1

    def __post_init__(self) -> None:
        if self.context_turns < 0:
            raise ConfigError(f"context_turns must be >= 0, got {self.context_turns}")
        if self.max_tokens < 3:
            raise ConfigError(f"max_tokens must be at least 3 (2 special tokens and a word), got {self.max_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not is_language(self.language):
            raise ConfigError(f"language: {unknown_language(self.language)}")
        for name in ("frames_multiple", "tokens_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (1: no rounding up), got {getattr(self, name)}")

    @property
    def uses_audio(self) -> bool:
        return self.modality in ("audio", "both")

    @property
    def uses_text(self) -> bool:
        return self.modality in ("text", "both")


def encode_with_context(tokenizer: Tokenizer, utt: Utterance, context: Sequence[tuple[str, str]] | None,
                        max_tokens: int) -> list[int]:
    """Token ids of the utterance after as many of its latest context turns as fit in ``max_tokens``.

    ``context`` None: the run reads text without context, so the utterance alone. A list, even an
    empty one (a dialogue's first turn), is read as ``Speaker: text``, after the turns that fit: a
    model with context sees every utterance in the same form, whether or not turns precede it.
    """
    if context is None:
        return tokenizer.encode(utt.text)[:max_tokens]
    for start in range(len(context) + 1):
        ids = tokenizer.encode(format_with_context(utt, context[start:]))
        if len(ids) <= max_tokens:
            return ids
    return ids[:max_tokens]


class MeldDataset(Dataset):
    """One split's utterances as dicts (see ``__getitem__``); ``lengths`` drive length bucketing."""

    def __init__(
        self,
        utterances: Sequence[Utterance],
        *,
        store: SplitStore | None = None,
        tokenizer: Tokenizer | None = None,
        context_turns: int = 0,
        max_tokens: int = 512,
    ) -> None:
        """``store`` gives audio (rows without a cached clip are dropped), ``tokenizer`` gives text; at least one."""
        if store is None and tokenizer is None:
            raise ValueError("a MeldDataset needs a feature store (audio), a tokenizer (text) or both")
        self.store = store
        self.dropped: list[tuple[str, str]] = []  # (key, why) of rows left out for lack of audio
        if store is None:
            self.utterances = list(utterances)
        else:
            why = {record.key: f"{record.status}: {record.reason}" for record in store.records}
            self.utterances = [utt for utt in utterances if utt.key in store]
            unknown = "no cached clip: missing, or the CSV changed since prepare ran"
            self.dropped = [(u.key, why.get(u.key, unknown)) for u in utterances if u.key not in store]
        # key -> up to context_turns previous (speaker, text), from every row of the split, also those
        # dropped for lack of audio: what was said before does not depend on which clips decoded.
        self.context = dialogue_context(utterances, context_turns)
        self.context_turns = context_turns
        self.tokens: list[torch.Tensor] | None = None
        if tokenizer is not None:
            self.tokens = [
                torch.tensor(encode_with_context(tokenizer, utt, self.turns(utt), max_tokens), dtype=torch.long)
                for utt in self.utterances
            ]
        if store is not None:
            frames = {record.key: record.frames for record in store.records}
            self.lengths = [frames[utt.key] for utt in self.utterances]
        else:
            self.lengths = [len(ids) for ids in self.tokens]

    def turns(self, utt: Utterance) -> list[tuple[str, str]] | None:
        """The (speaker, text) turns read before ``utt``, oldest first; None when the text is read
        without context (``context_turns`` 0), which also leaves out the utterance's own speaker."""
        return self.context[utt.key] if self.context_turns else None

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        """key, emotion and sentiment indices, speaker, dialogue_id; mel float32 [n_mels, T]; tokens long [L]."""
        utt = self.utterances[index]
        item = {
            "key": utt.key,
            "emotion": label_index("emotion", utt.emotion),
            "sentiment": label_index("sentiment", utt.sentiment),
            "speaker": utt.speaker,
            "dialogue_id": utt.dialogue_id,
        }
        if self.store is not None:
            item["mel"] = torch.from_numpy(self.store.log_mel(utt.key))
        if self.tokens is not None:
            item["tokens"] = self.tokens[index]
        return item

    def content_digest(self) -> str:
        """SHA-256 of what this split feeds a model: every utterance's key, speaker, text and dialogue
        context (with whether context is read at all: it adds the utterance's own speaker), and the feature
        store's digest (each clip's source file and frames).  Keys alone would let an embedding cache
        outlive a transcript edited in place or a clip replaced and prepared again."""
        rows = [(utt.key, utt.speaker, utt.text, self.turns(utt)) for utt in self.utterances]
        content = {"rows": rows, "store": self.store.digest if self.store is not None else None}
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def class_counts(self) -> dict[str, list[int]]:
        return {
            target: count_labels([label_index(target, getattr(u, target)) for u in self.utterances], len(labels))
            for target, labels in TARGETS.items()
        }


def _pad(sequences: Sequence[torch.Tensor], dims: tuple[int, ...], *,
         multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad along the last dim with zeros: ([B, *dims, W], lengths [B]), W the longest length
    rounded up to a multiple of ``multiple``."""
    lengths = torch.tensor([seq.shape[-1] for seq in sequences], dtype=torch.long)
    width = round_up(int(lengths.max()), multiple)
    out = torch.zeros(len(sequences), *dims, width, dtype=sequences[0].dtype)
    for row, seq in zip(out, sequences):
        row[..., : seq.shape[-1]] = seq
    return out, lengths


def collate(items: Sequence[dict], *, frames_multiple: int = 1, tokens_multiple: int = 1) -> dict:
    """Batch of items: keys, speakers (lists); emotion, sentiment, dialogue_ids [B]; and, as present,
    mel [B, n_mels, T] + mel_lengths [B] (padded with 0.0, as LogMel pads), tokens [B, L] + token_lengths [B]
    (padded with id 0, Tokenizer.pad_id). T and L are the batch's longest, rounded up to a multiple of
    ``frames_multiple`` and ``tokens_multiple`` (DataConfig); the lengths are the items' own."""
    batch = {
        "keys": [item["key"] for item in items],
        "speakers": [item["speaker"] for item in items],
        "emotion": torch.tensor([item["emotion"] for item in items], dtype=torch.long),
        "sentiment": torch.tensor([item["sentiment"] for item in items], dtype=torch.long),
        "dialogue_ids": torch.tensor([item["dialogue_id"] for item in items], dtype=torch.long),
    }
    if "mel" in items[0]:
        mels = [item["mel"] for item in items]
        batch["mel"], batch["mel_lengths"] = _pad(mels, (mels[0].shape[0],), multiple=frames_multiple)
    if "tokens" in items[0]:
        batch["tokens"], batch["token_lengths"] = _pad([item["tokens"] for item in items], (), multiple=tokens_multiple)
    return batch


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of indices of similar length.

    Shuffled: each epoch, a random permutation is cut into pools of ``pool_batches`` batches; each
    pool is sorted by length and cut into batches, and the batches are shuffled. Not shuffled: sorted
    by length throughout (least padding, a fixed order for evaluation). The epoch advances on each
    iteration, or is set with ``set_epoch``; the same seed and epoch give the same batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, pool_batches: int = 50) -> None:
        self.lengths = torch.as_tensor(np.asarray(lengths))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pool = batch_size * pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        count = len(self.lengths)
        if self.shuffle:
            rng = np.random.default_rng((self.seed, self.epoch))
            permutation = torch.from_numpy(rng.permutation(count))
            if self.drop_last:
                # The incomplete batch's samples leave the permutation before it is sorted: the last
                # batch of the sorted order would be the longest of the last pool, so long samples
                # would be dropped far more often than short ones.
                permutation = permutation[: count // self.batch_size * self.batch_size]
            order = sorted_in_pools(permutation, self.lengths, self.pool)
        else:
            order = sorted_in_pools(torch.arange(count), self.lengths, count)
        # A pool is a whole number of batches, so no batch straddles two pools.
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self.epoch += 1
        yield from batches

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + int(rest > 0 and not self.drop_last)


def make_dataloader(dataset: MeldDataset, batch_size: int, *, shuffle: bool = False, bucket_by_length: bool = True,
                    num_workers: int = 0, seed: int = 0, drop_last: bool = False, frames_multiple: int = 1,
                    tokens_multiple: int = 1) -> DataLoader:  # fmt: skip
    """A DataLoader yielding ``collate`` batches; seeded, so the same seed gives the same batches."""
    collate_fn = functools.partial(collate, frames_multiple=frames_multiple, tokens_multiple=tokens_multiple)
    common = {"collate_fn": collate_fn, "num_workers": num_workers, "persistent_workers": num_workers > 0}
    if bucket_by_length:
        sampler = LengthBucketSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator,
                      **common)


@functools.lru_cache(maxsize=8)
def _shared_tokenizer(language: str) -> Tokenizer:
    """One tokenizer per language and process. Building one fills two 50k-entry tables (~35 ms), which a
    sweep of sub-second trials would pay in every trial; its only mutable state is a word -> ids cache."""
    return Tokenizer(language)


def _no_features(root: Path, split: str, cache_dir: Path, cache_root: str | Path | None) -> str:
    """Why a split has no audio features, and what to do: prepare them, or, for a folder of the CSVs
    alone, know that there is nothing to prepare (prepare would only fail on the missing clips)."""
    try:
        find_layout(root, (split,), need_clips=True)
    except MeldDataError as err:
        return f"no audio features for the {split} split, and no clips to prepare them from: {err}; the CSVs alone serve text only"
    cache = f" --cache {cache_root}" if cache_root is not None else ""
    return (f"no audio features for the {split} split in {cache_dir}: run "
            f"`python -m meld.prepare --data {root}{cache}` with the same audio settings first")


def _check_current(store: SplitStore, root: Path, split: str, cache_root: str | Path | None) -> None:
    """Refuse features that are not of ``root``'s clips as they are now (``changed_clips``)."""
    changed = changed_clips(store, root)
    if changed:
        cache = f" --cache {cache_root}" if cache_root is not None else ""
        raise MeldDataError(f"{len(changed)} clip(s) of the {split} split of {root} are not the files their features "
                            f"in {store.path.parent} were made from (first: {changed[0].file}; changed since, or "
                            f"another MELD copy prepared into that cache): run `python -m meld.prepare --data "
                            f"{root}{cache}` to bring them up to date")


def check_not_empty(datasets: Mapping[str, MeldDataset], root: Path) -> None:
    """Raise MeldDataError naming the first split with no usable row: a driver would fail deep in its
    metrics with nothing to train on, score or estimate a prior from."""
    for split, dataset in datasets.items():
        if len(dataset):
            continue
        if dataset.store is not None and dataset.dropped:
            raise MeldDataError(f"the {split} split of {root} has no clip with audio features: all "
                                f"{len(dataset.dropped)} rows are missing, undecodable, silent or too short "
                                f"(prepare's report in {dataset.store.path.parent} lists why)")
        raise MeldDataError(f"the {split} split of {root} has no rows")


def build_datasets(
    data_root: str | Path | None = None,
    config: DataConfig = DataConfig(),
    *,
    splits: Sequence[str] = SPLITS,
    cache_root: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict[str, MeldDataset]:
    """One MeldDataset per split of the MELD at ``data_root`` (the demo if None).

    ``cache_root`` is prepare's ``--cache`` (default: the dataset's folder in the user cache). Raises
    MeldDataError when the CSVs, or for audio the prepared features, are not there.
    """
    root = Path(data_root) if data_root is not None else ensure_demo()
    utterances = load_splits(find_layout(root, splits, need_clips=False))
    stores: dict[str, SplitStore | None] = dict.fromkeys(splits)
    if config.uses_audio:
        cache_dir = audio_cache_dir(cache_root if cache_root is not None else default_cache_root(root), config.audio)
        for split in splits:
            path = store_path(cache_dir, split)
            if not path.is_file():
                raise MeldDataError(_no_features(root, split, cache_dir, cache_root))
            stores[split] = SplitStore(path)
            _check_current(stores[split], root, split, cache_root)
    if config.uses_text and tokenizer is None:
        tokenizer = _shared_tokenizer(config.language)
    return {
        split: MeldDataset(
            utterances[split],
            store=stores[split],
            tokenizer=tokenizer if config.uses_text else None,
            context_turns=config.context_turns,
            max_tokens=config.max_tokens,
        )
        for split in splits
    }


def build_loaders(data_root: str | Path | None = None, config: DataConfig = DataConfig(), *,
                  cache_root: str | Path | None = None, seed: int = 0) -> dict[str, DataLoader]:
    """DataLoaders for train (shuffled) and dev and test (in a fixed order), as ``config`` says."""
    datasets = build_datasets(data_root, config, cache_root=cache_root)
    return {
        split: make_dataloader(dataset, config.batch_size, shuffle=split == "train",
                               bucket_by_length=config.bucket_by_length, num_workers=config.num_workers, seed=seed,
                               frames_multiple=config.frames_multiple, tokens_multiple=config.tokens_multiple)
        for split, dataset in datasets.items()
    }


def class_counts(datasets: Mapping[str, MeldDataset]) -> dict[str, dict[str, list[int]]]:
    """Per split, the count of each emotion and sentiment (meld.labels order) among the dataset's items."""
    return {split: dataset.class_counts() for split, dataset in datasets.items()}
