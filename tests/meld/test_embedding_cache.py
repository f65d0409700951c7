"""meld.embedding_cache.cache_key: the key must follow the encoder weights, not only the data fingerprint.

The linear probe and zero-shot reuse embeddings by this key; the end-to-end cache tests only show that a
second run with the *same* model hits. A key blind to the weights would also hit after a new checkpoint
and silently serve the old model's embeddings, so these tests pin it to the weights directly.
"""

from __future__ import annotations

import torch
from torch import nn

from meld.embedding_cache import cache_key

FINGERPRINT = {"kind": "test/1", "splits": {"test": ["test/dia0_utt0", "test/dia0_utt1"]}}


def _encoders(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_identical_weights_give_the_same_key():
    assert cache_key(_encoders(0), FINGERPRINT) == cache_key(_encoders(0), FINGERPRINT)


def test_another_seed_gives_another_key():
    assert cache_key(_encoders(0), FINGERPRINT) != cache_key(_encoders(1), FINGERPRINT)


def test_one_nudged_weight_gives_another_key():
    # Same names, shapes and fingerprint; one float of one tensor differs.
    base, nudged = _encoders(0), _encoders(0)
    with torch.no_grad():
        nudged[0].weight[1, 2] += 1e-3
    assert cache_key(base, FINGERPRINT) != cache_key(nudged, FINGERPRINT)
    nudged.load_state_dict(base.state_dict())  # the very same bits again: the same key
    assert cache_key(base, FINGERPRINT) == cache_key(nudged, FINGERPRINT)


def test_a_changed_buffer_value_gives_another_key():
    # state_dict includes buffers (e.g. a BatchNorm's running statistics), which also shape the embeddings.
    base, changed = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    changed.running_mean.fill_(0.5)
    assert cache_key(base, FINGERPRINT) != cache_key(changed, FINGERPRINT)


def test_the_fingerprint_is_part_of_the_key():
    other = {**FINGERPRINT, "splits": {"test": ["test/dia0_utt0"]}}
    assert cache_key(_encoders(0), FINGERPRINT) != cache_key(_encoders(0), other)
    assert len(cache_key(_encoders(0), FINGERPRINT)) == 24
