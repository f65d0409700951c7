"""CLARA tokenizer: documented ids, the API, and agreement with independent tokenizers.

The independent tokenizers are built here from the same ``multilingual.tiktoken`` ranks:
- HF ``tokenizers`` ByteLevel BPE with the merge list minus its first merge ``Ġ t``, which is what
  tokenizers 0.13.3 made of Whisper's header-less ``merges.txt`` when the CLARA checkpoint was trained;
  with the full merge list it checks ``merges="corrected"``;
- tiktoken's rank-based BPE, which must agree with ``merges="corrected"`` (a merge list derived from ranks
  reproduces rank semantics when no merge is missing).
"""

from __future__ import annotations

import base64
import importlib.util
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from clara.tokenizer import LANGUAGES, Tokenizer, is_language, language_code, unknown_language

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    *(f"<|{code}|>" for code in LANGUAGES),
    "<|translate|>",
    "<|transcribe|>",
    "<|nospeech|>",
    "<|speech|>",
]

TRICKY_TEXTS = [
    "",
    " ",
    "   leading and trailing   ",
    "multiple   spaces\tand\ttabs",
    "line one\nline two\n\n",
    "it’s Joey's, isn't it? they'll've 'quoted'",
    "Café, naïve, façade, Ångström, Ελληνικά, Русский",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🎉👍🏽 and flags 🇺🇸 and ZWJ 👩‍👩‍👧",
    "numbers 1234567 3.14159 -42 1,000,000 2nd",
    "punctuation!!! ??? ... --- ((brackets)) [x] {y} <z> @#$%^&*",
    "Oh my God\x85 Ross\x92s here\x97 (cp1252 leftovers, as in MELD)",
    "to the tall tree, then take two",
    "special tokens <|endoftext|> and <|fr|> inside text",
]

EMOTION_LABELS = [
    "neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust", "positive", "negative",
    "happy", "sad", "angry", "calm", "tired", "terrified", "tense", "thrilled", "tender", "timid",
    "excited", "frustrated", "bored", "sarcastic", "confused", "disappointed", "amused", "anxious",
]  # fmt: skip


def _token_bytes() -> list[bytes]:
    """Whisper's multilingual ranks from the installed package, as a list indexed by rank."""
    spec = importlib.util.find_spec("whisper")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "multilingual.tiktoken"
    return [base64.b64decode(line.split()[0]) for line in path.read_bytes().splitlines()]


def _merges_from_ranks(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Each multi-byte token's merge, in rank order: rank-based BPE of its bytes over lower ranks, to two parts."""
    rank_of = {token: rank for rank, token in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        parts = [bytes([value]) for value in token]
        while len(parts) > 2:
            joined = [parts[i] + parts[i + 1] for i in range(len(parts) - 1)]
            i = min(range(len(joined)), key=lambda j: rank_of.get(joined[j], len(tokens)))
            assert rank_of[joined[i]] < rank
            parts[i : i + 2] = [joined[i]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _gpt2_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the rest to U+0100..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return {value: chr(value) if value in printable else chr(next(others)) for value in range(256)}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def corrected() -> Tokenizer:
    return Tokenizer(merges="corrected")


@pytest.fixture(scope="module")
def hf_tokenizers():
    """HF tokenizers keyed by mode: "reference" lacks the first merge, as tokenizers 0.13.3 did."""
    hf = pytest.importorskip("tokenizers")
    tokens = _token_bytes()
    alphabet = _gpt2_alphabet()

    def to_str(token: bytes) -> str:
        return "".join(alphabet[value] for value in token)

    vocab = {to_str(token): rank for rank, token in enumerate(tokens)}
    merges = [(to_str(left), to_str(right)) for left, right in _merges_from_ranks(tokens)]
    assert merges[0] == ("Ġ", "t")
    built = {}
    for mode, mode_merges in (("reference", merges[1:]), ("corrected", merges)):
        model = hf.Tokenizer(hf.models.BPE(vocab=vocab, merges=mode_merges))
        model.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        model.decoder = hf.decoders.ByteLevel()
        model.add_special_tokens([hf.AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
        built[mode] = model
    return built


def _hf_ids(model, texts: list[str], language: str = "en") -> list[list[int]]:
    return [encoding.ids for encoding in model.encode_batch([f"<|{language}|><|speech|> {t}" for t in texts])]


# Documented ids and the API.


def test_documented_reference_ids(tokenizer):
    assert tokenizer.encode("a person talking in a happy voice") == [
        50259, 50372, 257, 954, 220, 29302, 278, 294, 257, 2055, 3177,
    ]  # fmt: skip
    assert tokenizer.encode("to the tall") == [50259, 50372, 220, 1353, 220, 3322, 220, 83, 336]


def test_corrected_merges_keep_space_t(corrected):
    assert corrected.encode("a person talking") == [50259, 50372, 257, 954, 1417]


def test_empty_text_is_the_prompt_and_a_space(tokenizer):
    assert tokenizer.encode("") == [50259, 50372, 220]


def test_special_token_ids(tokenizer):
    assert tokenizer.vocab_size == 50373
    assert tokenizer.pad_id == 0
    assert len(LANGUAGES) == 110 and len(set(LANGUAGES)) == 110
    assert "yue" not in LANGUAGES
    expected_language_ids = {"en": 50259, "zh": 50260, "zh-CN": 50261, "de": 50262, "fr": 50266, "iw": 50280}
    expected_language_ids |= {"su": 50358, "gn": 50359, "fy-NL": 50361, "rw": 50368}
    for code, token_id in expected_language_ids.items():
        assert tokenizer.language_id(code) == token_id
    for i, code in enumerate(LANGUAGES):
        assert tokenizer.language_id(code) == 50259 + i
        assert tokenizer.decode([50259 + i], skip_special=False) == f"<|{code}|>"
    named = {
        "<|endoftext|>": 50257,
        "<|startoftranscript|>": 50258,
        "<|translate|>": 50369,
        "<|transcribe|>": 50370,
        "<|nospeech|>": 50371,
        "<|speech|>": 50372,
    }
    for token, token_id in named.items():
        assert tokenizer.decode([token_id], skip_special=False) == token
        assert tokenizer.encode(token)[2:] == [220, token_id]


def test_language_codes_are_case_insensitive_and_he_means_iw(tokenizer):
    assert tokenizer.language_id("EN") == 50259
    assert tokenizer.language_id("zh-cn") == 50261
    assert tokenizer.language_id("he") == tokenizer.language_id("iw") == 50280
    assert tokenizer.encode("hi", language="fr")[0] == 50266
    assert Tokenizer(language="de").encode("hi")[0] == 50262


def test_unknown_language_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match=r"unknown language code 'xx'; valid codes: en, zh, zh-CN, de, "):
        tokenizer.language_id("xx")
    with pytest.raises(ValueError, match="unknown language code 'klingon'.*or Whisper's language names such as english"):
        tokenizer.encode("hello", language="klingon")
    with pytest.raises(ValueError, match="unknown language code 'yue'"):
        Tokenizer(language="yue")
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        tokenizer.encode_batch(["a", "b"], language=["en", "xx"])


def test_whisper_language_names_and_aliases_mean_their_codes_in_any_case(tokenizer):
    # Whisper's tokenizer takes "english" for "en"; datasets label rows either way.
    from whisper.tokenizer import TO_LANGUAGE_CODE

    for name, code in TO_LANGUAGE_CODE.items():
        if code == "yue":  # Cantonese: Whisper has it, the reference's token list does not
            assert not is_language(name) and language_code(name) is None
            continue
        expected = tokenizer.language_id(code)
        for spelling in (name, name.upper(), name.title()):
            assert tokenizer.language_id(spelling) == expected, spelling
            assert language_code(spelling) == ("iw" if code == "he" else code), spelling
    assert tokenizer.language_id("English") == tokenizer.language_id("en") == 50259
    assert tokenizer.language_id("castilian") == tokenizer.language_id("es") == 50263
    assert tokenizer.language_id("Hebrew") == 50280 and language_code("HEBREW") == "iw"
    assert tokenizer.encode_batch(["hi", "hi"], ["German", "de"])[0].tolist() == [[50262, 50372, 4879]] * 2
    assert language_code("zh-cn") == "zh-CN" and language_code("EN") == "en" and language_code("xx") is None


def test_is_language_accepts_exactly_the_codes_the_tokenizer_encodes(tokenizer):
    # Configs and manifests check codes with it when read, so it must agree with language_id.
    for code in ["en", "EN", "zh-cn", "he", "iw", "fy-NL", "xx", "yue", "english", "", None, 5]:
        try:
            tokenizer.language_id(code)
            encodes = True
        except ValueError:
            encodes = False
        assert is_language(code) == encodes, code
    assert all(is_language(code) for code in LANGUAGES)
    assert not is_language("xx") and unknown_language("xx").startswith("unknown language code 'xx'; valid codes: en, zh")


def test_invalid_arguments_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="merges must be 'reference' or 'corrected'"):
        Tokenizer(merges="fixed")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        Tokenizer(max_length=0)
    with pytest.raises(TypeError, match="text must be a str, got float"):
        tokenizer.encode(float("nan"))
    with pytest.raises(TypeError, match="use encode for a single text"):
        tokenizer.encode_batch("hello")
    with pytest.raises(ValueError, match="got 1 languages for 2 texts"):
        tokenizer.encode_batch(["a", "b"], language=["en"])
    with pytest.raises(ValueError, match=r"token id 50373 is outside the vocabulary \[0, 50373\)"):
        tokenizer.decode([50373])


def test_encode_batch_pads_with_zero_and_reports_lengths(tokenizer):
    texts = ["a person talking in a happy voice", "", "to the tall"]
    ids, lengths = tokenizer.encode_batch(texts, language=["en", "de", "fr"])
    assert ids.dtype == lengths.dtype == torch.long
    assert ids.shape == (3, 11)
    assert lengths.tolist() == [11, 3, 9]
    assert ids[0].tolist() == tokenizer.encode(texts[0])
    assert ids[1].tolist() == [50262, 50372, 220] + [0] * 8
    assert ids[2].tolist() == [50266, 50372, 220, 1353, 220, 3322, 220, 83, 336, 0, 0]
    empty_ids, empty_lengths = tokenizer.encode_batch([])
    assert empty_ids.shape == (0, 0) and empty_lengths.shape == (0,)


def test_truncation_at_max_length():
    text = "well " * 5000
    full = Tokenizer().encode(text)
    assert len(full) == 4096
    short = Tokenizer(max_length=5)
    assert short.encode(text) == full[:5]
    ids, lengths = short.encode_batch([text, "hi"])
    assert ids.shape == (2, 5) and lengths.tolist() == [5, 3]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special=False) == f"<|en|><|speech|> {text}"
    without_specials = f" {text}".replace("<|endoftext|>", "").replace("<|fr|>", "")
    assert tokenizer.decode(ids) == without_specials
    assert tokenizer.decode(torch.tensor(ids)) == without_specials


def test_decode_replaces_a_split_character(tokenizer):
    ids = tokenizer.encode("🎉")
    assert len(ids) > 3
    assert tokenizer.decode(ids[:-1]) == " \ufffd"


def test_pickles_for_dataloader_workers(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.encode("to the tall", language="de") == tokenizer.encode("to the tall", language="de")


# Agreement with independent tokenizers.


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_matches_hf_on_prompts_and_tricky_texts(hf_tokenizers, mode):
    ours = Tokenizer(merges=mode)
    texts = [f"a person talking in a {label} voice" for label in EMOTION_LABELS] + TRICKY_TEXTS
    expected = _hf_ids(hf_tokenizers[mode], texts)
    assert [ours.encode(text) for text in texts] == expected
    assert [ours.decode(ids, skip_special=False) for ids in expected] == [
        hf_tokenizers[mode].decode(ids, skip_special_tokens=False) for ids in expected
    ]


def test_matches_hf_for_every_language(hf_tokenizers, tokenizer):
    for code in LANGUAGES:
        assert tokenizer.encode("the tone of voice", language=code) == _hf_ids(
            hf_tokenizers["reference"], ["the tone of voice"], code
        )[0]


def test_matches_hf_and_tiktoken_on_all_meld_utterances(hf_tokenizers, tokenizer, corrected, shared_meld_dir):
    tiktoken = pytest.importorskip("tiktoken")
    texts = []
    for split in ("train", "dev", "test"):
        texts += pd.read_csv(shared_meld_dir / f"{split}_sent_emo.csv")["Utterance"].tolist()
    assert len(texts) == 13708

    assert [tokenizer.encode(text) for text in texts] == _hf_ids(hf_tokenizers["reference"], texts)
    corrected_ids = [corrected.encode(text) for text in texts]
    assert corrected_ids == _hf_ids(hf_tokenizers["corrected"], texts)

    ranks = {token: rank for rank, token in enumerate(_token_bytes()) if token}
    rank_bpe = tiktoken.Encoding("whisper-multilingual", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert [ids[2:] for ids in corrected_ids] == rank_bpe.encode_ordinary_batch([f" {text}" for text in texts])
