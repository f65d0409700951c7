"""CLARA's text tokenizer: Whisper's multilingual byte-level BPE plus CLARA's special tokens.

Every text is encoded as ``<|{lang}|><|speech|> {text}``, without start/end tokens, cut to ``max_length``
tokens and padded with id 0.

Ids 0..50256 are the 50257 BPE ranks of Whisper's ``multilingual.tiktoken`` (read from the installed
``openai-whisper`` package, nothing is downloaded); ids 50257..50372 are the special tokens in the order
the reference implementation added them.

The published CLARA checkpoint was trained with a tokenizer that lost the first BPE merge, ``Ġ t``:
tokenizers 0.13 treated the first line of Whisper's header-less ``merges.txt`` as a header. A word starting
with ``t`` after a space therefore keeps the space as a token of its own (`` talking`` -> `` `` + ``talk`` +
``ing``). ``merges="reference"`` (the default) reproduces those ids; ``merges="corrected"`` keeps the merge
(`` talking`` -> one token) and is only suitable for models trained from scratch with it.

BPE here follows merge-list semantics, like a tokenizer loaded from ``vocab.json`` + ``merges.txt``: a pair
of adjacent tokens merges only if that exact pair is a merge, earliest merge first. With a merge removed
this differs from tiktoken's rank semantics, which would still join `` talking`` into one token.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import regex
import torch

# Language codes in token-id order (<|en|> = 50259): Whisper's 99 languages as the reference listed them
# (Hebrew as "iw", no Cantonese "yue"), with zh-CN right after zh and ten more languages appended.
LANGUAGES: tuple[str, ...] = (
    "en", "zh", "zh-CN", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv",
    "it", "id", "hi", "fi", "vi", "iw", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur",
    "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et",
    "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn",
    "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk",
    "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su",
    "gn", "fy", "fy-NL", "eo", "cnh", "cv", "dv", "ky", "or", "rw",
)  # fmt: skip

# Lower-cased code -> its spelling in LANGUAGES. Current Whisper and ISO 639-1 spell Hebrew "he"; the
# reference's token is <|iw|>.
_CODES = {code.lower(): code for code in LANGUAGES} | {"he": "iw"}

# Whisper's language names and aliases (whisper.tokenizer.TO_LANGUAGE_CODE, which its tokenizer accepts
# beside the codes), as the code of our token: datasets often label rows "english" or "German".
# Whisper's "cantonese" (yue) has no CLARA token and is left out.
_NAMES = {
    "english": "en", "chinese": "zh", "german": "de", "spanish": "es", "russian": "ru", "korean": "ko",
    "french": "fr", "japanese": "ja", "portuguese": "pt", "turkish": "tr", "polish": "pl", "catalan": "ca",
    "dutch": "nl", "arabic": "ar", "swedish": "sv", "italian": "it", "indonesian": "id", "hindi": "hi",
    "finnish": "fi", "vietnamese": "vi", "hebrew": "iw", "ukrainian": "uk", "greek": "el", "malay": "ms",
    "czech": "cs", "romanian": "ro", "danish": "da", "hungarian": "hu", "tamil": "ta", "norwegian": "no",
    "thai": "th", "urdu": "ur", "croatian": "hr", "bulgarian": "bg", "lithuanian": "lt", "latin": "la",
    "maori": "mi", "malayalam": "ml", "welsh": "cy", "slovak": "sk", "telugu": "te", "persian": "fa",
    "latvian": "lv", "bengali": "bn", "serbian": "sr", "azerbaijani": "az", "slovenian": "sl", "kannada": "kn",
    "estonian": "et", "macedonian": "mk", "breton": "br", "basque": "eu", "icelandic": "is", "armenian": "hy",
    "nepali": "ne", "mongolian": "mn", "bosnian": "bs", "kazakh": "kk", "albanian": "sq", "swahili": "sw",
    "galician": "gl", "marathi": "mr", "punjabi": "pa", "sinhala": "si", "khmer": "km", "shona": "sn",
    "yoruba": "yo", "somali": "so", "afrikaans": "af", "occitan": "oc", "georgian": "ka", "belarusian": "be",
    "tajik": "tg", "sindhi": "sd", "gujarati": "gu", "amharic": "am", "yiddish": "yi", "lao": "lo",
    "uzbek": "uz", "faroese": "fo", "haitian creole": "ht", "pashto": "ps", "turkmen": "tk", "nynorsk": "nn",
    "maltese": "mt", "sanskrit": "sa", "luxembourgish": "lb", "myanmar": "my", "tibetan": "bo", "tagalog": "tl",
    "malagasy": "mg", "assamese": "as", "tatar": "tt", "hawaiian": "haw", "lingala": "ln", "hausa": "ha",
    "bashkir": "ba", "javanese": "jw", "sundanese": "su", "burmese": "my", "valencian": "ca", "flemish": "nl",
    "haitian": "ht", "letzeburgesch": "lb", "pushto": "ps", "panjabi": "pa", "moldavian": "ro",
    "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
}  # fmt: skip

# Special tokens in id order, starting right after the BPE ranks.
_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    *(f"<|{code}|>" for code in LANGUAGES),
    "<|translate|>",
    "<|transcribe|>",
    "<|nospeech|>",
    "<|speech|>",
)

# GPT-2's pre-tokenisation: contractions, letters, digits and other symbols, each optionally led by one
# space; runs of whitespace keep their last space for the following word.
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# Splits text around special tokens (none is a prefix of another); the reference split them out of user
# text too.
_SPECIAL_PATTERN = regex.compile("(" + "|".join(regex.escape(token) for token in _SPECIAL_TOKENS) + ")")

_N_RANKS = 50257
_SPECIAL_IDS = {token: _N_RANKS + i for i, token in enumerate(_SPECIAL_TOKENS)}
_LANGUAGE_IDS = {code: _SPECIAL_IDS[f"<|{code}|>"] for code in LANGUAGES}


def language_code(language: object) -> str | None:
    """The code in ``LANGUAGES`` that ``language`` means, else None: a code in any case ("EN", "zh-cn";
    "he" for "iw") or one of Whisper's names and aliases in any case ("English", "castilian")."""
    if not isinstance(language, str):
        return None
    key = language.lower()
    return _CODES.get(key) or _NAMES.get(key)


def is_language(language: object) -> bool:
    """Whether the tokenizer has a token for ``language`` (see ``language_code``); configs and manifests
    check theirs with it when read, without building a tokenizer."""
    return language_code(language) is not None


def unknown_language(language: object) -> str:
    """The error message for a language that ``is_language`` refuses, with a few valid examples."""
    return (f"unknown language code {language!r}; valid codes: {', '.join(LANGUAGES[:8])}, ... "
            f"({len(LANGUAGES)} in clara.tokenizer.LANGUAGES), in any case, or Whisper's language names "
            "such as english, German, chinese")


def _ranks_path() -> Path:
    """``whisper/assets/multilingual.tiktoken``, found without importing whisper (which loads torch models)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "CLARA's tokenizer reads its vocabulary from the openai-whisper package; "
            "install it with `pip install openai-whisper`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "multilingual.tiktoken"


@functools.lru_cache(maxsize=1)
def _load_ranks() -> tuple[bytes, ...]:
    """The bytes of every BPE token, indexed by rank (= token id); 50257 entries, the last one empty."""
    path = _ranks_path()
    tokens: list[bytes] = []
    # Each line is "<base64 token bytes> <rank>", ranks counting up from 0.
    for line in path.read_bytes().splitlines():
        encoded, rank = line.split()
        if int(rank) != len(tokens):
            raise ValueError(f"{path}: expected rank {len(tokens)}, found {int(rank)}")
        tokens.append(base64.b64decode(encoded))
    if len(tokens) != _N_RANKS:
        raise ValueError(f"{path}: expected {_N_RANKS} ranks, found {len(tokens)}")
    return tuple(tokens)


@functools.lru_cache(maxsize=1)
def _derive_merges() -> tuple[tuple[int, int], ...]:
    """The merge list, as (left id, right id) pairs in merge order, recovered from the ranks.

    The merge that creates token ``t`` is found by running rank-based BPE on ``t``'s bytes with only the
    lower-ranked tokens until two parts remain. Multi-byte tokens are visited in rank order, so the i-th
    merge creates the i-th multi-byte token and a lower merged id means an earlier merge.
    """
    tokens = _load_ranks()
    rank_of = {token: rank for rank, token in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            # Merge the pair that forms the lowest-ranked token; tokens of this rank or higher are not built yet.
            best_rank, i = min(
                (rank_of.get(left + right, _N_RANKS), i) for i, (left, right) in enumerate(zip(parts, parts[1:]))
            )
            if best_rank >= rank:
                raise ValueError(f"BPE rank {rank} ({token!r}) cannot be built from lower-ranked tokens")
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((rank_of[parts[0]], rank_of[parts[1]]))
    return tuple(merges)


class Tokenizer:
    """Encodes texts as CLARA's ``<|{lang}|><|speech|> {text}`` token ids and decodes ids back to text.

    ``language`` is the default for ``encode``; ``merges`` picks the training-time quirk (``"reference"``)
    or the full merge list (``"corrected"``); ``max_length`` caps every encoded text, special tokens included.
    """

    vocab_size: int = _N_RANKS + len(_SPECIAL_TOKENS)  # 50373
    pad_id: int = 0

    def __init__(
        self,
        language: str = "en",
        merges: Literal["reference", "corrected"] = "reference",
        max_length: int = 4096,
    ) -> None:
        if merges not in ("reference", "corrected"):
            raise ValueError(f"merges must be 'reference' or 'corrected', got {merges!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.language = language
        self.language_id(language)  # fail now on an unknown code, not at the first encode
        self.merges = merges
        self.max_length = max_length

        self._token_bytes = _load_ranks()
        rank_of = {token: rank for rank, token in enumerate(self._token_bytes)}
        self._byte_ids = [rank_of[bytes([value])] for value in range(256)]
        # (left id, right id) -> merged id; merged ids grow with merge order, so the smallest one merges first.
        merge_list = _derive_merges()
        if merges == "reference":
            merge_list = merge_list[1:]  # the lost first merge, "Ġ t"
        self._merges = {pair: rank_of[self._token_bytes[pair[0]] + self._token_bytes[pair[1]]] for pair in merge_list}
        # Pre-tokenised word -> ids: texts repeat words a lot, and BPE is the slow part. A plain dict keeps the
        # tokenizer picklable (DataLoader workers started with spawn).
        self._cache: dict[str, tuple[int, ...]] = {}

    def language_id(self, language: str) -> int:
        """The id of ``<|{code}|>`` for a code or language name that ``language_code`` reads."""
        code = language_code(language)
        if code is None:
            raise ValueError(unknown_language(language))
        return _LANGUAGE_IDS[code]

    def encode(self, text: str, language: str | None = None) -> list[int]:
        """Ids of ``<|{language}|><|speech|> {text}``, at most ``max_length`` of them."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.language_id(self.language if language is None else language), _SPECIAL_IDS["<|speech|>"]]
        # Special tokens inside the text are kept whole, as the reference did; everything else is BPE.
        for i, chunk in enumerate(_SPECIAL_PATTERN.split(" " + text)):
            if i % 2:
                ids.append(_SPECIAL_IDS[chunk])
            else:
                for word in _WORD_PATTERN.findall(chunk):
                    word_ids = self._cache.get(word)
                    if word_ids is None:
                        word_ids = self._cache[word] = self._bpe(word)
                    ids.extend(word_ids)
        return ids[: self.max_length]

    def encode_batch(
        self, texts: Sequence[str], language: str | Sequence[str] | None = None
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Ids [B, L] right-padded with ``pad_id`` to the longest text, and each text's length [B].

        ``language`` is one language (a code or name) for all texts, one per text, or None for the tokenizer's default.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts; use encode for a single text")
        if language is None or isinstance(language, str):
            languages = [language] * len(texts)
        else:
            languages = list(language)
            if len(languages) != len(texts):
                raise ValueError(f"got {len(languages)} languages for {len(texts)} texts")
        encoded = [self.encode(text, lang) for text, lang in zip(texts, languages)]
        width = max((len(ids) for ids in encoded), default=0)
        padded = [ids + [self.pad_id] * (width - len(ids)) for ids in encoded]
        ids = torch.tensor(padded, dtype=torch.long).reshape(len(encoded), width)
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        return ids, lengths

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text spelled by ``ids``; special tokens are dropped, or written out if ``skip_special`` is False.

        Padding cannot be told apart from the token "!" (id 0): cut padded rows to their length first.
        """
        pieces = []
        for token_id in (int(i) for i in ids):
            if 0 <= token_id < _N_RANKS:
                pieces.append(self._token_bytes[token_id])
            elif _N_RANKS <= token_id < self.vocab_size:
                if not skip_special:
                    pieces.append(_SPECIAL_TOKENS[token_id - _N_RANKS].encode())
            else:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        # A cut can split a multi-byte character; show it as U+FFFD rather than fail.
        return b"".join(pieces).decode("utf-8", errors="replace")

    def _bpe(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenised word: merge the adjacent pair that comes first in the merge list, repeat."""
        ids = [self._byte_ids[value] for value in word.encode("utf-8")]
        while len(ids) > 1:
            merged, i = min((self._merges.get(pair, _N_RANKS), i) for i, pair in enumerate(zip(ids, ids[1:])))
            if merged == _N_RANKS:
                break
            ids[i : i + 2] = [merged]
        return tuple(ids)
