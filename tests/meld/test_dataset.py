"""Datasets over the feature cache: items, collate padding (and its multiples), modalities, bucketing, class counts."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clara.config import ConfigError, load
from clara.model import Clara
from clara.model_config import load_model_config
from clara.tokenizer import Tokenizer
from meld.dataset import (
    DataConfig, LengthBucketSampler, MeldDataset, build_datasets, build_loaders, check_not_empty, class_counts, collate,
    make_dataloader,
)
from meld.demo import make_demo
from meld.errors import MeldDataError
from meld.feature_cache import SplitStore, store_path
from meld.labels import EMOTIONS, SENTIMENTS
from meld.layout import find_layout
from meld.prepare import prepare
from meld.records import SPLITS, load_splits

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SIZE = 40
HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(demo MELD.Raw, cache root) shared by the session: both steps return at once when already done."""
    base = tmp_path_factory.getbasetemp()
    demo = make_demo(base / "demo", size=DEMO_SIZE)
    prepare(demo, base / "dataset-cache", workers=1)
    return demo, base / "dataset-cache"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def test_items_carry_features_tokens_and_labels(prepared, tokenizer):
    demo, cache = prepared
    datasets = build_datasets(demo, DataConfig(), cache_root=cache, tokenizer=tokenizer)
    rows = load_splits(find_layout(demo, need_clips=False))
    cache_dir = next(cache.glob("audio-*"))
    for split, dataset in datasets.items():
        cached = {r.key for r in SplitStore(store_path(cache_dir, split)).records if r.cached}
        # CSV order, rows without audio left out and listed with their reason
        assert [u.key for u in dataset.utterances] == [u.key for u in rows[split] if u.key in cached]
        assert [key for key, _ in dataset.dropped] == [u.key for u in rows[split] if u.key not in cached]
        assert dataset.dropped and all(reason for _, reason in dataset.dropped)
    train = datasets["train"]
    item = train[0]
    utt = train.utterances[0]
    assert item["key"] == utt.key and item["speaker"] == utt.speaker and item["dialogue_id"] == utt.dialogue_id
    assert EMOTIONS[item["emotion"]] == utt.emotion and SENTIMENTS[item["sentiment"]] == utt.sentiment
    assert item["mel"].dtype == torch.float32 and item["mel"].shape == (80, train.lengths[0])
    assert float(item["mel"].abs().max()) <= 1.0
    assert item["tokens"].tolist() == tokenizer.encode(utt.text)


def test_collate_pads_with_zeros_and_returns_lengths(prepared, tokenizer):
    demo, cache = prepared
    dataset = build_datasets(demo, DataConfig(), splits=["dev"], cache_root=cache, tokenizer=tokenizer)["dev"]
    items = [dataset[i] for i in range(4)]
    batch = collate(items)
    mel_lengths = [item["mel"].shape[1] for item in items]
    token_lengths = [len(item["tokens"]) for item in items]
    assert batch["mel"].shape == (4, 80, max(mel_lengths)) and batch["mel_lengths"].tolist() == mel_lengths
    assert batch["tokens"].shape == (4, max(token_lengths)) and batch["token_lengths"].tolist() == token_lengths
    for row, item, frames, length in zip(range(4), items, mel_lengths, token_lengths):
        assert torch.equal(batch["mel"][row, :, :frames], item["mel"])
        assert not batch["mel"][row, :, frames:].any()
        assert torch.equal(batch["tokens"][row, :length], item["tokens"])
        assert not batch["tokens"][row, length:].any()
    assert batch["keys"] == [item["key"] for item in items]
    assert batch["emotion"].dtype == torch.long and batch["emotion"].tolist() == [item["emotion"] for item in items]
    assert batch["dialogue_ids"].tolist() == [item["dialogue_id"] for item in items]


def _items(frames: list[int], tokens: list[int]) -> list[dict]:
    """Dataset-like items: mel [80, T] in [-1, 1] and token ids [L] (never the pad id 0)."""
    generator = torch.Generator().manual_seed(0)
    return [{"key": f"k{i}", "emotion": i % 7, "sentiment": i % 3, "speaker": "Ross", "dialogue_id": i,
             "mel": torch.rand(80, t, generator=generator) * 2 - 1,
             "tokens": torch.randint(1, 50_000, (n,), generator=generator)}
            for i, (t, n) in enumerate(zip(frames, tokens))]


def test_collate_pads_up_to_the_multiples():
    items = _items([70, 130], [5, 9])
    batch = collate(items, frames_multiple=64, tokens_multiple=8)
    assert batch["mel"].shape == (2, 80, 192) and batch["tokens"].shape == (2, 16)
    assert batch["mel_lengths"].tolist() == [70, 130] and batch["token_lengths"].tolist() == [5, 9]
    for row, item in enumerate(items):
        frames, length = item["mel"].shape[1], len(item["tokens"])
        assert torch.equal(batch["mel"][row, :, :frames], item["mel"]) and not batch["mel"][row, :, frames:].any()
        assert torch.equal(batch["tokens"][row, :length], item["tokens"]) and not batch["tokens"][row, length:].any()
    plain = collate(items)  # multiple 1: the batch's longest, as before
    assert plain["mel"].shape == (2, 80, 130) and plain["tokens"].shape == (2, 9)
    assert torch.equal(batch["mel"][..., :130], plain["mel"]) and torch.equal(batch["tokens"][:, :9], plain["tokens"])
    exact = collate(_items([128, 64], [8, 1]), frames_multiple=64, tokens_multiple=8)  # already a multiple: no more
    assert exact["mel"].shape[-1] == 128 and exact["tokens"].shape[-1] == 8


@pytest.mark.parametrize("attention, cross_attention", [("sdpa", "softmax"), ("eager", "softmax"), ("sdpa", "gelu")])
def test_padding_to_multiples_leaves_clara_embeddings_unchanged(attention, cross_attention):
    """The padding is masked: the same items give the same embeddings however far the batch is padded."""
    config = load_model_config("tiny")
    config = dataclasses.replace(config, attention=attention,
                                 audio=dataclasses.replace(config.audio, cross_attention=cross_attention))
    model = Clara(config).eval()
    items = _items([70, 130, 33, 101], [5, 9, 3, 12])
    plain = collate(items)
    padded = collate(items, frames_multiple=64, tokens_multiple=8)
    assert padded["mel"].shape[-1] == 192 and padded["tokens"].shape[-1] == 16
    with torch.no_grad():
        for name in ("audio_embeds", "text_embeds"):
            expected = getattr(model(plain["mel"], plain["tokens"], plain["mel_lengths"], plain["token_lengths"]), name)
            actual = getattr(model(padded["mel"], padded["tokens"], padded["mel_lengths"], padded["token_lengths"]), name)
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("field", ["frames_multiple", "tokens_multiple"])
def test_data_config_rejects_a_multiple_below_one(field):
    with pytest.raises(ConfigError, match=f"^{field} must be at least 1.*got 0$"):
        DataConfig(**{field: 0})


def test_data_config_rejects_an_unknown_language_when_loaded():
    # Found when the config is read, not when the first text is tokenised.
    with pytest.raises(ConfigError, match=r"^overrides: language: unknown language code 'xx'; valid codes: en, zh"):
        load(DataConfig, None, ["language=xx"])
    assert DataConfig(language="he").language == "he"


def test_modalities(prepared, tokenizer):
    demo, cache = prepared
    audio = build_datasets(demo, DataConfig(modality="audio"), splits=["test"], cache_root=cache)["test"]
    assert "tokens" not in audio[0] and "mel" in audio[0] and audio.tokens is None
    text_config = DataConfig(modality="text")
    text = build_datasets(demo, text_config, splits=["test"], cache_root=cache, tokenizer=tokenizer)["test"]
    assert "mel" not in text[0] and "tokens" in text[0] and not text.dropped
    assert len(text) == len(audio) + len(audio.dropped)  # text keeps the rows whose clip is bad
    assert text.lengths == [len(ids) for ids in text.tokens]
    batch = collate([text[0], text[1]])
    assert "mel" not in batch and batch["tokens"].shape[0] == 2


def test_dialogue_context_and_token_budget(prepared, tokenizer):
    demo, _ = prepared
    config = DataConfig(modality="text", context_turns=2)
    dataset = build_datasets(demo, config, splits=["train"], tokenizer=tokenizer)["train"]
    index = next(i for i, u in enumerate(dataset.utterances) if u.utterance_id >= 2)
    utt = dataset.utterances[index]
    turns = [u for u in dataset.utterances if u.dialogue_id == utt.dialogue_id and u.utterance_id < utt.utterance_id]
    text = tokenizer.decode(dataset[index]["tokens"])
    assert text.endswith(f"{utt.speaker}: {utt.text}") and f"{turns[-1].speaker}: {turns[-1].text}" in text
    # With a tight budget the oldest turns go first, and the utterance itself stays whole.
    budget = len(tokenizer.encode(f"{turns[-1].speaker}: {turns[-1].text} </s> {utt.speaker}: {utt.text}"))
    tight = build_datasets(demo, DataConfig(modality="text", context_turns=2, max_tokens=budget), splits=["train"],
                           tokenizer=tokenizer)["train"]
    expected = f" {turns[-1].speaker}: {turns[-1].text} </s> {utt.speaker}: {utt.text}"
    assert tokenizer.decode(tight[index]["tokens"]) == expected
    # A dialogue's first utterance has no turn before it, and is still read with its speaker, as every
    # other utterance is; without context the text is read bare.
    first = next(i for i, u in enumerate(dataset.utterances) if u.utterance_id == 0)
    opener = dataset.utterances[first]
    assert tokenizer.decode(dataset[first]["tokens"]) == f" {opener.speaker}: {opener.text}"
    bare = build_datasets(demo, DataConfig(modality="text"), splits=["train"], tokenizer=tokenizer)["train"]
    assert tokenizer.decode(bare[first]["tokens"]) == f" {opener.text}"
    assert bare.content_digest() != dataset.content_digest()


def test_text_only_on_the_real_csvs(shared_meld_dir, tokenizer):
    datasets = build_datasets(shared_meld_dir, DataConfig(modality="text"), tokenizer=tokenizer)
    assert {split: len(d) for split, d in datasets.items()} == {"train": 9989, "dev": 1109, "test": 2610}
    counts = class_counts(datasets)
    assert counts["train"]["emotion"] == [4710, 1743, 1205, 1109, 683, 271, 268]
    assert counts["dev"]["emotion"] == [470, 163, 150, 153, 111, 22, 40]
    assert counts["test"]["emotion"] == [1256, 402, 281, 345, 208, 68, 50]
    assert sum(counts["test"]["sentiment"]) == 2610


def test_text_only_on_a_hand_made_csv_folder(tmp_path, tokenizer):
    times = '"0:00:01,000","0:00:02,500"'
    rows = {"train": [f"1,Hi there.,Joey,joy,positive,0,0,1,1,{times}",
                      f"2,Oh no.,Ross,sadness,negative,0,1,1,1,{times}"],
            "dev": [f"1,What?,Monica,surprise,negative,3,0,1,1,{times}"],
            "test": [f"1,Okay.,Rachel,neutral,neutral,5,2,1,1,{times}"]}
    for split, lines in rows.items():
        (tmp_path / f"{split}_sent_emo.csv").write_text(HEADER + "\n".join(lines) + "\n")
    datasets = build_datasets(tmp_path, DataConfig(modality="text", context_turns=1), tokenizer=tokenizer)
    assert [len(datasets[split]) for split in SPLITS] == [2, 1, 1]
    assert tokenizer.decode(datasets["train"][1]["tokens"]) == " Joey: Hi there. </s> Ross: Oh no."
    assert class_counts(datasets)["train"]["emotion"] == [0, 1, 0, 0, 1, 0, 0]
    with pytest.raises(MeldDataError, match="no audio features for the train split, and no clips to prepare them from: "):
        build_datasets(tmp_path, DataConfig(modality="both"), cache_root=tmp_path / "cache", tokenizer=tokenizer)


def test_a_split_without_rows_is_one_error_naming_it(tmp_path, tokenizer):
    times = '"0:00:01,000","0:00:02,500"'
    for split in SPLITS:
        rows = "" if split == "dev" else f"1,Hi there.,Joey,joy,positive,0,0,1,1,{times}\n"
        (tmp_path / f"{split}_sent_emo.csv").write_text(HEADER + rows)
    datasets = build_datasets(tmp_path, DataConfig(modality="text"), tokenizer=tokenizer)
    check_not_empty({split: datasets[split] for split in ("train", "test")}, tmp_path)
    with pytest.raises(MeldDataError, match=f"^the dev split of {re.escape(str(tmp_path))} has no rows$"):
        check_not_empty(datasets, tmp_path)


def test_content_digest_follows_text_context_and_clips_not_labels(tmp_path, tokenizer):
    """The embedding caches key a split on this digest: it must change with anything the model reads."""
    times = '"0:00:01,000","0:00:02,500"'

    def digests(first: str, second: str, emotion: str = "sadness") -> tuple[str, str]:
        rows = [f"1,{first},Joey,joy,positive,0,0,1,1,{times}", f"2,{second},Ross,{emotion},negative,0,1,1,1,{times}"]
        for split in SPLITS:
            (tmp_path / f"{split}_sent_emo.csv").write_text(HEADER + "\n".join(rows) + "\n")
        config = DataConfig(modality="text", context_turns=1)
        train = build_datasets(tmp_path, config, splits=["train"], tokenizer=tokenizer)["train"]
        return train.content_digest(), train.utterances[1].key

    base, key = digests("Hi there.", "Oh no.")
    assert key == "train/dia0_utt1" and base == digests("Hi there.", "Oh no.")[0]
    assert digests("Hi there.", "Oh no!")[0] != base  # the utterance's own text
    assert digests("Hello there.", "Oh no.")[0] != base  # the turn before, read as context
    assert digests("Hi there.", "Oh no.", emotion="anger")[0] == base  # labels are not model input


def test_content_digest_follows_a_clip_prepared_again(tmp_path):
    demo = make_demo(tmp_path / "demo", size=30)
    prepare(demo, tmp_path / "cache", workers=1)
    config = DataConfig(modality="audio")

    def dev() -> MeldDataset:
        return build_datasets(demo, config, splits=["dev"], cache_root=tmp_path / "cache")["dev"]

    before = dev().content_digest()
    assert dev().content_digest() == before
    clip = demo / next(record.file for record in dev().store.records if record.cached)
    clip.write_bytes(clip.read_bytes())  # same audio, a new mtime: prepare decodes it again
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))
    prepare(demo, tmp_path / "cache", workers=1)
    assert dev().content_digest() != before


def test_length_buckets_cover_every_item_once_and_follow_the_seed():
    lengths = np.random.default_rng(1).integers(10, 500, size=203).tolist()
    sampler = LengthBucketSampler(lengths, 8, shuffle=True, seed=3, pool_batches=5)
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(203)) and len(first) == len(sampler)
    spread = np.mean([np.ptp([lengths[i] for i in batch]) for batch in first])
    assert spread < 0.5 * np.ptp(lengths)  # batches hold similar lengths
    second = list(sampler)  # the next epoch
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(LengthBucketSampler(lengths, 8, shuffle=True, seed=4, pool_batches=5)) != first

    dropping = LengthBucketSampler(lengths, 8, shuffle=True, seed=3, drop_last=True, pool_batches=5)
    batches = list(dropping)
    assert all(len(batch) == 8 for batch in batches) and len(batches) == len(dropping)
    ordered = list(LengthBucketSampler(lengths, 8, shuffle=False))
    flat = [lengths[i] for batch in ordered for i in batch]
    assert flat == sorted(lengths) and len(ordered) == 26


def test_length_buckets_drop_random_samples_not_the_longest():
    """drop_last leaves out the epoch's permutation's last 5 samples (237 = 29 batches of 8, and 5),
    whatever their length.  Cut after sorting, they were the longest 5 of the last pool (37 samples):
    the longest tenth of the samples took ~90% of the drops and the shorter half none."""
    lengths = np.random.default_rng(1).permutation(237).tolist()  # length = rank
    sampler = LengthBucketSampler(lengths, 8, shuffle=True, seed=3, drop_last=True, pool_batches=5)
    dropped = []
    for epoch in range(200):
        left_out = set(range(237)) - {i for batch in sampler for i in batch}  # iterating advances the epoch
        assert left_out == set(np.random.default_rng((3, epoch)).permutation(237)[232:].tolist())
        dropped += [lengths[i] for i in left_out]
    # A uniform draw of 1000 ranks out of 0..236: mean 118, standard error ~2 (before: ~215).
    assert abs(np.mean(dropped) - 118) < 15


def test_loaders_and_pickling(prepared, tokenizer):
    demo, cache = prepared
    loaders = build_loaders(demo, DataConfig(batch_size=4), cache_root=cache)
    train = loaders["train"]
    batches = list(train)
    assert sum(len(batch["keys"]) for batch in batches) == len(train.dataset)
    assert all(batch["mel"].shape[0] == batch["tokens"].shape[0] for batch in batches)
    plain = make_dataloader(train.dataset, 5, shuffle=True, bucket_by_length=False, seed=1)
    assert [b["keys"] for b in plain] == [b["keys"] for b in make_dataloader(train.dataset, 5, shuffle=True,
                                                                              bucket_by_length=False, seed=1)]
    copy = pickle.loads(pickle.dumps(train.dataset))  # what a DataLoader worker started with spawn gets
    assert torch.equal(copy[2]["mel"], train.dataset[2]["mel"])


def test_loaders_pad_batches_to_the_configured_multiples(prepared):
    demo, cache = prepared
    config = DataConfig(batch_size=4, frames_multiple=64, tokens_multiple=8, num_workers=1)
    batches = list(build_loaders(demo, config, cache_root=cache)["dev"])  # a worker process: the collate pickles
    assert all(b["mel"].shape[-1] % 64 == 0 and b["tokens"].shape[-1] % 8 == 0 for b in batches)
    assert all(b["mel"].shape[-1] - int(b["mel_lengths"].max()) < 64 for b in batches)


def test_default_yaml_is_the_defaults():
    assert load(DataConfig, REPO_ROOT / "configs" / "data" / "default.yaml") == DataConfig()
