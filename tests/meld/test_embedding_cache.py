"""meld.embedding_cache: the key must follow the encoder weights, and a damaged file must be a miss.

The linear probe and zero-shot reuse embeddings by this key; the end-to-end cache tests only show that a
second run with the *same* model hits. A key blind to the weights would also hit after a new checkpoint
and silently serve the old model's embeddings, so these tests pin it to the weights directly. A file under
the right key but with the wrong content (cut short, damaged, entries missing or reshaped, an older format)
must be recomputed, not read into a traceback or into wrong numbers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from meld.embedding_cache import cache_key, load_or_encode

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


def _embeddings() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return {"train": {"audio": torch.randn(3, 4, generator=generator), "text": torch.randn(3, 4, generator=generator)},
            "dev": {"audio": torch.randn(2, 4, generator=generator).to(torch.bfloat16)}}


class _Encoder:
    """encode() for load_or_encode, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, dict[str, torch.Tensor]]:
        self.calls += 1
        return _embeddings()


def _assert_same(got: dict, expected: dict) -> None:
    names = {split: set(values) for split, values in got.items()}
    assert names == {split: set(values) for split, values in expected.items()}
    for split, values in expected.items():
        for name, tensor in values.items():
            assert got[split][name].dtype == tensor.dtype
            torch.testing.assert_close(got[split][name], tensor, rtol=0, atol=0)


def test_a_cached_file_is_read_back_exactly_without_encoding(tmp_path):
    path, encode, lines = tmp_path / "embeddings" / "k.safetensors", _Encoder(), []
    _, hit = load_or_encode(path, encode, log=lines.append)
    assert not hit and encode.calls == 1
    second, hit = load_or_encode(path, encode, log=lines.append)
    assert hit and encode.calls == 1 and lines == []
    _assert_same(second, _embeddings())  # bfloat16 too


def _flat(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def _resaved(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    copy = path.with_name("copy.safetensors")
    save_file(tensors, str(copy), metadata=metadata)
    return copy.read_bytes()


def _damaged(path) -> dict[str, bytes]:
    """name -> the bytes of a file under the right key whose content is not what was written."""
    good = path.read_bytes()
    flat, metadata = _flat(path)
    flipped = bytearray(good)
    flipped[-3] ^= 0x40  # one bit of the last tensor's data: still a valid file, other numbers
    return {
        "garbage": b"garbage", "empty": b"", "truncated": good[:-6], "a flipped bit": bytes(flipped),
        # The metadata (checksum included) kept, the tensors changed:
        "an entry missing": _resaved(path, {k: v for k, v in flat.items() if k != "dev/audio"}, metadata),
        "a tensor reshaped": _resaved(path, {**flat, "train/text": flat["train/text"][:2].clone()}, metadata),
        # The format before checksums: nothing proves its content whole.
        "an older format": _resaved(path, flat, {"format": "meld-clara-embeddings/1"}),
    }


DAMAGES = ["garbage", "empty", "truncated", "a flipped bit", "an entry missing", "a tensor reshaped", "an older format"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_file_is_a_miss_recomputed_and_replaced_with_one_notice(tmp_path, damage):
    path, encode = tmp_path / "embeddings" / "k.safetensors", _Encoder()
    load_or_encode(path, encode)
    path.write_bytes(_damaged(path)[damage])
    lines: list[str] = []
    got, hit = load_or_encode(path, encode, log=lines.append)
    assert not hit and encode.calls == 2
    _assert_same(got, _embeddings())
    assert len(lines) == 1 and lines[0].startswith(f"{path}: not a usable embedding cache (")
    assert lines[0].endswith("computing the embeddings again") and "\n" not in lines[0]
    # Replaced by a whole file: the next run reads it.
    again, hit = load_or_encode(path, encode, log=lines.append)
    assert hit and encode.calls == 2 and len(lines) == 1
    _assert_same(again, _embeddings())
    assert _flat(path)[1]["format"] == "meld-clara-embeddings/2"
