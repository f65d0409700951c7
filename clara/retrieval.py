"""Audio-text retrieval metrics: recall at k both ways, in-batch top-1, and their chance levels.

Captions may repeat in a held-out set (several clips described alike), so texts are given once and
``text_of_audio[i]`` names the text that describes audio ``i``.  Audio -> text: the query's one
relevant text must rank within the top k.  Text -> audio: any of the audios it describes counts.
Ties with irrelevant candidates count against the query, so a collapsed model that scores every
pair alike gets 0, not 1; a NaN score (a diverged model) ranks below every candidate, so it is a miss.
A text no audio maps to is a candidate for audio -> text but not a text -> audio query.
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import torch

KS = (1, 5, 10)


def first_relevant_rank(similarity: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """similarity, relevant [Q, C] -> [Q] 0-based rank of each query's best relevant candidate.

    The rank is the number of irrelevant candidates scoring at least as high as that candidate.
    """
    # NaN compares false with everything, so a NaN relevant score would outrank all and count as a hit.
    similarity = similarity.nan_to_num(nan=float("-inf"))
    best = similarity.masked_fill(~relevant, float("-inf")).amax(dim=1)  # [Q]
    return ((similarity >= best[:, None]) & ~relevant).sum(dim=1)


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """Fraction of queries (rows with at least one relevant candidate) whose best relevant rank is < k."""
    has_relevant = relevant.any(dim=1)
    ranks = first_relevant_rank(similarity[has_relevant], relevant[has_relevant])
    return {k: float((ranks < k).float().mean()) if ranks.numel() else 0.0 for k in ks}


def _check_text_of_audio(text_of_audio: torch.Tensor, num_audio: int, num_texts: int) -> None:
    """One error naming ``text_of_audio``: an index out of range would silently drop its audio."""
    if text_of_audio.dtype.is_floating_point or text_of_audio.dtype == torch.bool:
        raise ValueError(f"text_of_audio: needs integer text indices, got dtype {text_of_audio.dtype}")
    if tuple(text_of_audio.shape) != (num_audio,):
        raise ValueError(f"text_of_audio: shape {tuple(text_of_audio.shape)}, expected ({num_audio},): "
                         "one text index per audio")
    if num_audio and (int(text_of_audio.min()) < 0 or int(text_of_audio.max()) >= num_texts):
        raise ValueError(f"text_of_audio: indices {int(text_of_audio.min())}..{int(text_of_audio.max())} "
                         f"outside 0..{num_texts - 1} ({num_texts} texts)")


def _relevance(text_of_audio: torch.Tensor, num_texts: int) -> torch.Tensor:
    """[Na] text index per audio -> [Na, Nt] bool."""
    return text_of_audio[:, None] == torch.arange(num_texts, device=text_of_audio.device)[None, :]


def retrieval_metrics(
    audio_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_of_audio: torch.Tensor | None = None,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """R@k both ways for unit-norm ``audio_embeds [Na, D]`` and ``text_embeds [Nt, D]``.

    ``text_of_audio [Na]`` (long) maps each audio to its text; None means pairs (audio i <-> text i).
    Keys: ``a2t_R@k`` and ``t2a_R@k``.
    """
    num_audio, num_texts = audio_embeds.shape[0], text_embeds.shape[0]
    if text_of_audio is None:
        if num_audio != num_texts:
            raise ValueError(f"text_of_audio: required when audio_embeds ({num_audio} rows) and text_embeds "
                             f"({num_texts} rows) are not pairs")
        text_of_audio = torch.arange(num_audio, device=audio_embeds.device)
    _check_text_of_audio(text_of_audio, num_audio, num_texts)
    similarity = audio_embeds.float() @ text_embeds.float().T  # [Na, Nt]
    relevant = _relevance(text_of_audio.to(similarity.device), text_embeds.shape[0])
    a2t = recall_at_k(similarity, relevant, ks)
    t2a = recall_at_k(similarity.T, relevant.T, ks)
    return {**{f"a2t_R@{k}": v for k, v in a2t.items()}, **{f"t2a_R@{k}": v for k, v in t2a.items()}}


def chance_levels(text_of_audio: torch.Tensor, num_texts: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """The expected ``retrieval_metrics`` of random rankings, same keys."""
    num_audio = text_of_audio.shape[0]
    # Without audios (or texts) there is no query to rank for, and the chance of a hit is 0 / 0. Both
    # callers' loaders refuse an empty eval set first, so reaching this is a caller's bug.
    if not num_audio or not num_texts:
        raise ValueError(f"chance_levels: needs at least one audio and one text, got {num_audio} audio(s) "
                         f"and {num_texts} text(s)")
    _check_text_of_audio(text_of_audio, num_audio, num_texts)
    counts = torch.bincount(text_of_audio, minlength=num_texts).tolist()  # audios per text
    described = [m for m in counts if m > 0]
    result = {}
    for k in ks:
        result[f"a2t_R@{k}"] = min(k, num_texts) / num_texts
    for k in ks:
        # A text misses only if all k top-ranked audios come from the num_audio - m it does not describe.
        misses = [comb(num_audio - m, k) / comb(num_audio, k) if k <= num_audio else 0.0 for m in described]
        result[f"t2a_R@{k}"] = 1.0 - sum(misses) / len(described)
    return result


def in_batch_top1(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """similarity [B, B] (audio rows, text columns, pairs on the diagonal) -> (a2t, t2a) top-1 accuracy.

    Argmax picks the first of tied candidates; a NaN score is a miss, as in ``retrieval_metrics``
    (argmax takes NaN for the maximum, so a diverged pair counted as a hit and hid its row's and
    column's real hits).  Returns 0-d tensors (no device sync).
    """
    targets = torch.arange(similarity.shape[0], device=similarity.device)
    scores = similarity.nan_to_num(nan=float("-inf"))  # [B, B]
    real = ~similarity.diagonal().isnan()  # [B]: a NaN pair misses even where every score is NaN
    a2t = ((scores.argmax(dim=1) == targets) & real).float().mean()
    t2a = ((scores.argmax(dim=0) == targets) & real).float().mean()
    return a2t, t2a
