"""Fine-tuning's view of the MELD datasets: transformers tokens, balanced resampling, ordered batching.

``meld.dataset`` gives items with log-mel and CLARA tokens; this module adds what fine-tuning needs
around them without changing them:

* ``HFTextView``: each item also carries the ids of the transformers tokenizer (with the same
  dialogue context as CLARA's text), collated by ``Collate`` into ``hf_ids`` / ``hf_mask`` [B, L].
* ``BalancedView``: each epoch, a fresh draw of N items with every class equally likely, a pure
  function of (seed, epoch), so the engine's exact resume still holds.
* ``ordered_batches``: index batches sorted by length, for evaluation and encoding with little padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from meld.context import format_with_context
from meld.dataset import MeldDataset, collate
from meld.records import Utterance


def hf_text_with_context(tokenizer, utt: Utterance, turns: Sequence[tuple[str, str]] | None) -> str:
    """The text a transformers encoder reads for ``utt`` after its context ``turns`` (speaker, text),
    joined by the tokenizer's own separator, each turn and the utterance as ``Speaker: text``; the
    utterance's text alone when ``turns`` is None (a run without context)."""
    if turns is None:
        return utt.text
    return format_with_context(utt, turns, sep=f" {tokenizer.sep_token or '|'} ")


def hf_ids_with_context(tokenizer, utt: Utterance, turns: Sequence[tuple[str, str]] | None,
                        max_tokens: int) -> list[int]:
    """The transformers ids of ``utt`` after as many of its latest ``turns`` as fit in ``max_tokens``, as
    ``meld.dataset.encode_with_context`` does for CLARA's tokens: the tokenizer's own truncation cuts
    from the right, which would cut the utterance itself and keep the oldest turns."""
    if turns is not None:
        for start in range(len(turns)):
            ids = tokenizer(hf_text_with_context(tokenizer, utt, turns[start:]))["input_ids"]
            if len(ids) <= max_tokens:
                return ids
        turns = []
    # No turn fits (or none is read): the utterance alone, cut from the right only if it is too long.
    return tokenizer(hf_text_with_context(tokenizer, utt, turns), truncation=True, max_length=max_tokens)["input_ids"]


class HFTextView(Dataset):
    def __init__(self, base: MeldDataset, tokenizer, *, max_tokens: int) -> None:
        self.base = base
        self.utterances = base.utterances
        self.lengths = base.lengths
        self.ids = []
        for utt in base.utterances:
            turns = base.turns(utt)  # the same turns as CLARA's text tower reads
            self.ids.append(torch.tensor(hf_ids_with_context(tokenizer, utt, turns, max_tokens)))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], "hf_ids": self.ids[index]}


class BalancedView(Dataset):
    """``len(base)`` items per epoch, drawn with replacement with probability 1 / (classes x count of its class)."""

    def __init__(self, base: Dataset, labels: Sequence[int], seed: int) -> None:
        self.base = base
        labels_arr = np.asarray(labels)
        counts = np.bincount(labels_arr)
        self.probabilities = 1.0 / (np.count_nonzero(counts) * counts[labels_arr])  # [N], sums to 1
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng((self.seed, epoch))
        self.indices = rng.choice(len(self.base), size=len(self.base), p=self.probabilities)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return self.base[int(self.indices[index])]


class Collate:
    """``meld.dataset.collate`` (mel frames and CLARA tokens padded up to ``frames_multiple`` /
    ``tokens_multiple``) plus, where items have them, transformers ids padded with ``pad_id`` to the
    batch's longest."""

    def __init__(self, pad_id: int = 0, *, frames_multiple: int = 1, tokens_multiple: int = 1) -> None:
        self.pad_id = pad_id
        self.frames_multiple = frames_multiple
        self.tokens_multiple = tokens_multiple

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = collate(items, frames_multiple=self.frames_multiple, tokens_multiple=self.tokens_multiple)
        if "hf_ids" in items[0]:
            ids = [item["hf_ids"] for item in items]
            width = max(len(row) for row in ids)
            batch["hf_ids"] = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            batch["hf_mask"] = torch.zeros(len(ids), width, dtype=torch.long)
            for row, seq in enumerate(ids):
                batch["hf_ids"][row, : len(seq)] = seq
                batch["hf_mask"][row, : len(seq)] = 1
        return batch


def ordered_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches; every index appears once."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
