"""meld.finetune_data: the views the fine-tune trains on."""

from __future__ import annotations

from meld.context import format_with_context
from meld.dataset import DataConfig, build_datasets
from meld.finetune_data import HFTextView, hf_ids_with_context
from meld.layout import find_layout
from meld.records import Utterance, load_splits
from tests.meld.finetune_helpers import small_demo


class CharTokenizer:
    """A stand-in for a transformers tokenizer: one id per character, so ids decode back to the text."""

    sep_token = "</s>"

    def __call__(self, text: str, truncation: bool = False, max_length: int | None = None) -> dict:
        ids = [ord(c) for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_transformers_text_reads_the_same_turns_as_clara_text_even_after_a_dropped_clip():
    root, cache = small_demo()
    datasets = build_datasets(root, DataConfig(modality="both", context_turns=2), cache_root=cache)
    rows = load_splits(find_layout(root, tuple(datasets), need_clips=False))
    after_dropped = 0
    for split, ds in datasets.items():
        view = HFTextView(ds, CharTokenizer(), max_tokens=10_000)
        for utt, ids in zip(ds.utterances, view.ids):
            # Every utterance as "Speaker: text", a dialogue's first one too, as CLARA's text reads it.
            expected = format_with_context(utt, ds.context[utt.key], sep=" </s> ")
            assert "".join(map(chr, ids.tolist())) == expected, utt.key
            assert "".join(map(chr, ids.tolist())).endswith(f"{utt.speaker}: {utt.text}")
        # The demo plants clips that do not decode; a turn after one still reads it as context (what was
        # said does not depend on which clips decoded).
        dropped = {key for key, _ in ds.dropped}
        dialogue = {}
        for row in sorted(rows[split], key=lambda r: (r.dialogue_id, r.utterance_id)):
            previous = dialogue.get(row.dialogue_id)
            if previous is not None and previous.key in dropped and row.key not in dropped:
                assert ds.context[row.key][-1] == (previous.speaker, previous.text), row.key
                after_dropped += 1
            dialogue[row.dialogue_id] = row
    assert after_dropped >= 1


def test_a_tight_transformers_budget_drops_the_oldest_turns_not_the_utterance():
    utt = Utterance("train", 0, 2, "Ross", "We were on a break!", "anger", "negative", 3, 15, 1.0, 2.0, 3)
    turns = [("Rachel", "You slept with her?"), ("Ross", "Yes.")]
    tokenizer = CharTokenizer()
    both = "Rachel: You slept with her? </s> Ross: Yes. </s> Ross: We were on a break!"
    latest = "Ross: Yes. </s> Ross: We were on a break!"

    def text(max_tokens: int) -> str:
        return "".join(map(chr, hf_ids_with_context(tokenizer, utt, turns, max_tokens)))

    assert text(len(both)) == both
    assert text(len(both) - 1) == latest  # the oldest turn goes first; the right-hand cut would end "a break"
    assert text(len(latest)) == latest
    alone = "Ross: We were on a break!"
    assert text(len(alone)) == alone  # no turn fits: the utterance alone, with its speaker as every other
    assert text(5) == "Ross:"  # the utterance alone is too long: only then is it cut
    # A run without context (turns None) reads the bare text, with no speaker name.
    assert "".join(map(chr, hf_ids_with_context(tokenizer, utt, None, 100))) == utt.text
