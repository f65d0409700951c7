"""Undo the two encoding accidents found in copies of the MELD CSVs, without touching clean text.

(a) C1 controls. The pre-2020 CSVs (the ones inside MELD.Raw and the Kaggle copy) hold Windows-1252
    punctuation that was decoded as Latin-1 and saved as UTF-8: "don\\x92t", "\\x85", "\\x97", and the
    speaker "Richard\\x92s Date". Each such C1 character is mapped back through its cp1252 byte ("’").
(b) UTF-8 read as cp1252 or Latin-1. Reading the post-2020 UTF-8 file with the wrong codec gives
    "donâ€™t". Every run of characters that spells a well-formed UTF-8 multi-byte sequence in cp1252
    (or Latin-1) is re-encoded to those bytes and decoded as UTF-8, but only where that gives a
    character cp1252 can hold (MELD's text has no other kind), so a clean "JOSÉ’S" stays as it is.

Both repairs work on short spans, never on the whole string, because the old files mix the broken and
the correct form in one line ("we canâ€™t ... That’s"), and a clean "é" must stay as it is.
"""

from __future__ import annotations

import re


def _byte_table() -> dict[str, int]:
    """Each character a wrong decode turns a byte 0x80-0xFF into, mapped back to that byte.

    That is the cp1252 character where cp1252 defines the byte, and always the Latin-1 one (a C1 control
    for 0x80-0x9F), since both codecs are used by mistake. Windows passes the five bytes cp1252 leaves
    undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) through as C1 controls, which is the Latin-1 character again.
    """
    byte_of = {}
    for byte in range(0x80, 0x100):
        byte_of[chr(byte)] = byte
        try:
            byte_of[bytes([byte]).decode("cp1252")] = byte
        except UnicodeDecodeError:
            pass
    return byte_of


_BYTE_OF = _byte_table()


def _chars_for(first: int, last: int) -> str:
    """A regex character class body matching every character that stands for a byte in first..last."""
    return "".join(re.escape(ch) for ch, byte in _BYTE_OF.items() if first <= byte <= last)


_CONT = f"[{_chars_for(0x80, 0xBF)}]"
# Lead bytes of 2-, 3- and 4-byte UTF-8 sequences, each followed by its number of continuation bytes.
_MOJIBAKE = re.compile(
    f"[{_chars_for(0xC2, 0xDF)}]{_CONT}"
    f"|[{_chars_for(0xE0, 0xEF)}]{_CONT}{{2}}"
    f"|[{_chars_for(0xF0, 0xF4)}]{_CONT}{{3}}"
)
_C1 = re.compile("[\x80-\x9f]")
# One wrong decode is the usual case; a second pass undoes a file that went through it twice, or an old
# C1 file that was then read as cp1252 ("Â’" -> "\x92" -> "’").
_MAX_PASSES = 3


def _undo_utf8_misread(match: re.Match[str]) -> str:
    span = match.group()
    try:
        decoded = bytes(_BYTE_OF[ch] for ch in span).decode("utf-8")
    except UnicodeDecodeError:
        return span
    # MELD's text was written in cp1252, so a real misread decodes to a character cp1252 holds (or to the
    # C1 control that stands for one). Anything else means the span was clean text that happens to spell
    # a UTF-8 sequence: "JOSÉ’S" would become "JOSɒS", "café…”" a CJK ideograph.
    return decoded if decoded in _BYTE_OF else span


def _undo_c1(match: re.Match[str]) -> str:
    ch = match.group()
    try:
        return ch.encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return ch


def repair_text(s: str) -> str:
    """Clean text from any MELD CSV variant: mojibake reversed, no-break spaces made spaces, stripped.

    Clean UTF-8 text comes back unchanged (apart from the strip). Inner whitespace is kept as it is: the
    post-2020 CSVs keep the double space where the old ones had "\\xa0 ".
    """
    for _ in range(_MAX_PASSES):
        repaired = _C1.sub(_undo_c1, _MOJIBAKE.sub(_undo_utf8_misread, s))
        if repaired == s:
            break
        s = repaired
    return s.replace("\xa0", " ").strip()
