import csv

import pytest

from meld.text_repair import repair_text

# The punctuation MELD uses, with the C1 control the pre-2020 CSVs hold for it.
C1_FORMS = {"’": "\x92", "…": "\x85", "—": "\x97", "‘": "\x91", "“": "\x93", "”": "\x94", "–": "\x96"}


def _wrong_decode(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


WRONG_DECODE = [_wrong_decode(byte) for byte in range(256)]


def misread_as_cp1252(text: str) -> str:
    """What opening UTF-8 text as cp1252 shows (Windows passes undefined bytes through as C1)."""
    return "".join(WRONG_DECODE[byte] for byte in text.encode("utf-8"))


@pytest.mark.parametrize(("clean", "c1"), sorted(C1_FORMS.items()))
def test_c1_controls_become_punctuation(clean, c1):
    assert c1 == clean.encode("cp1252").decode("latin-1")
    assert repair_text(f"don{c1}t") == f"don{clean}t"


@pytest.mark.parametrize("clean", sorted(C1_FORMS) + ["é", "ó"])
def test_utf8_misread_as_cp1252_or_latin1(clean):
    text = f"caf{clean} ok"
    assert repair_text(misread_as_cp1252(text)) == text
    assert repair_text(text.encode("utf-8").decode("latin-1")) == text


def test_known_mojibake_spellings():
    assert repair_text("donâ€™t") == "don’t"
    assert repair_text("Wait â€” what? â€œNoâ€\x9d") == "Wait — what? “No”"
    assert repair_text("Oh. My. Godâ€¦") == "Oh. My. God…"


def test_mixed_broken_and_clean_in_one_line():
    # As in train dia473_utt3 of the old CSV: one apostrophe broken, the next one already fixed.
    assert repair_text("we can\x92t turn on each other.\xa0 That’s just") == "we can’t turn on each other.  That’s just"
    assert repair_text("it’s donâ€™t") == "it’s don’t"


def test_twice_broken_text():
    assert repair_text(misread_as_cp1252(misread_as_cp1252("don’t"))) == "don’t"
    # An old C1 file read as cp1252: the C1 byte pair shows as "Â’".
    assert repair_text("Richard\x92s Date".encode("utf-8").decode("cp1252")) == "Richard’s Date"


def test_nbsp_and_strip():
    assert repair_text("\xa0 Yeah, right.\xa0 Sure! ") == "Yeah, right.  Sure!"


@pytest.mark.parametrize(
    "clean",
    ["", "Hey!", "café", "naïve — “fine”…", "100 € ™", "Ã", "Â", "Señor", "Zoë’s", "a  b", "(She doesn't hear him)"],
)
def test_clean_text_is_unchanged(clean):
    assert repair_text(clean) == clean


def test_real_utf8_text_is_unchanged(shared_meld_dir):
    changed = []
    for split in ("train", "dev", "test"):
        with open(shared_meld_dir / f"{split}_sent_emo.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                for field in ("Utterance", "Speaker"):
                    if repair_text(row[field]) != row[field]:
                        changed.append(row[field])
    assert changed == []


@pytest.mark.parametrize("clean", ["JOSÉ’S CAFÉ", "“CAFÉ”", "a café…”", "Ñ’s", "¿Qué—”"])
def test_clean_letter_before_punctuation_is_unchanged(clean):
    # Each holds a span that spells a UTF-8 sequence in cp1252 ("É’" is C9 92, U+0252 "ɒ"), which no
    # misread of MELD's cp1252-only text can produce.
    assert repair_text(clean) == clean


def test_no_accented_letter_before_meld_punctuation_is_taken_for_mojibake():
    # Â, Ã, â (and Å, Æ, Ë, whose pairs spell cp1252's Œ, ƒ, ˆ ...) lead real misreads; the other
    # lead-byte letters before MELD's punctuation decode only to characters cp1252 lacks.
    punctuation = sorted(C1_FORMS)
    pair_leads = [chr(code) for code in range(0xC4, 0xE0) if chr(code) not in "ÅÆË"]
    triple_leads = [chr(code) for code in range(0xE0, 0xF0) if chr(code) != "â"]
    changed = [f"{lead}{p}" for lead in pair_leads for p in punctuation if repair_text(f"x{lead}{p}") != f"x{lead}{p}"]
    changed += [f"{lead}{p}{q}" for lead in triple_leads for p in punctuation for q in punctuation
                if repair_text(f"x{lead}{p}{q}") != f"x{lead}{p}{q}"]
    assert changed == []
