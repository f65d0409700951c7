"""MELD's split CSVs (``{split}_sent_emo.csv``) parsed into validated, clean ``Utterance`` records."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meld.errors import MeldDataError
from meld.labels import EMOTIONS, SENTIMENTS, label_index
from meld.text_repair import repair_text

if TYPE_CHECKING:
    from meld.layout import SplitLocation

SPLITS: tuple[str, ...] = ("train", "dev", "test")

COLUMNS: tuple[str, ...] = (
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
    "Season", "Episode", "StartTime", "EndTime",
)
_INT_COLUMNS = ("Sr No.", "Dialogue_ID", "Utterance_ID", "Season", "Episode")

_TIMESTAMP = re.compile(r"([0-9]{1,2}):([0-9]{2}):([0-9]{2}),([0-9]{2,3})")
# Tried in order, after a UTF-8 byte-order mark is cut off. A file re-saved by Excel on Windows is cp1252;
# what neither decodes falls back to Latin-1, which decodes any bytes, and repair_text maps the C1
# controls that leaves.
_ENCODINGS = ("utf-8", "cp1252")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# MELD's ids are small; Python refuses to convert a number of over 4300 digits (and its message names no field).
_MAX_DIGITS = 18


@dataclass(frozen=True)
class Utterance:
    """One CSV row. The key is (split, dialogue_id, utterance_id); ``sr_no`` is not unique in train."""

    split: str
    dialogue_id: int
    utterance_id: int
    speaker: str
    text: str
    emotion: str
    sentiment: str
    season: int
    episode: int
    start_s: float
    end_s: float
    sr_no: int

    @property
    def key(self) -> str:
        return f"{self.split}/dia{self.dialogue_id}_utt{self.utterance_id}"

    @property
    def clip_name(self) -> str:
        return f"dia{self.dialogue_id}_utt{self.utterance_id}.mp4"


def parse_timestamp(s: str) -> float:
    """Seconds from an SRT-style ``h:mm:ss,ms`` or ``hh:mm:ss,ms`` time.

    The part after the comma is a decimal fraction of a second, so ",28" is 0.280 s, not 0.028 s. Three
    rows of MELD have two digits there (train dia437_utt2, test dia187_utt2 and dia233_utt8, all
    EndTime); reading them as a fraction matches the subtitle frame grid of their episodes (test
    "0:11:41,41" falls on a 23.976 fps frame boundary, "0:11:41,041" does not), and if a final digit was
    simply lost the error is under 10 ms instead of up to 900 ms. Raises ValueError on any other format.
    """
    match = _TIMESTAMP.fullmatch(s.strip())
    if match is None:
        raise ValueError(f"{_shown(s)} is not a time like 0:16:21,731 (h:mm:ss,ms)")
    hours, minutes, seconds, fraction = match.groups()
    if int(minutes) >= 60 or int(seconds) >= 60:
        raise ValueError(f"{s!r} has minutes or seconds above 59")
    millis = int(fraction.ljust(3, "0"))
    return (int(hours) * 3_600_000 + int(minutes) * 60_000 + int(seconds) * 1000 + millis) / 1000


def _shown(value: str) -> str:
    """``value`` quoted for a message, cut short: a field can be thousands of characters long."""
    return repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} characters)"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith(_UTF16_BOMS):  # Excel's "Unicode text" and pandas' utf-16; the BOM gives the byte order
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise MeldDataError(f"{path}: starts like UTF-16 but is not valid UTF-16 ({err.reason} at byte "
                                f"{err.start}); save it as a CSV in UTF-8") from None
    # Cut off for every encoding: a file saved with a BOM and later given a line in cp1252 is no longer
    # UTF-8, and decoded as cp1252 the mark would become "ï»¿" glued to the first column's name.
    data = data.removeprefix(codecs.BOM_UTF8)
    for encoding in _ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def _parse_int(value: str, column: str) -> int:
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise ValueError(f"{column} {_shown(value)} is not a non-negative whole number")
    if len(value.strip()) > _MAX_DIGITS:
        raise ValueError(f"{column} {_shown(value.strip())} is not a valid id: {len(value.strip())} digits, "
                         f"expected at most {_MAX_DIGITS}")
    return int(value)


def _header_not_split(path: Path, header: list[str]) -> MeldDataError | None:
    """The error for a header row that is not comma-separated columns (None if it is, columns missing or not).

    Signs: NUL characters (UTF-16 read without its byte-order mark), or one cell holding several column names.
    """
    text = ",".join(header)
    glued = any(cell not in COLUMNS and sum(column in cell for column in COLUMNS) > 1 for cell in header)
    if "\x00" not in text and not glued:
        return None
    separator = max(";\t|", key=text.count)
    if "\x00" in text:
        hint = "it has NUL characters: is it UTF-16 without a byte-order mark?"
    elif not text.count(separator):
        hint = "what separates them?"
    else:
        hint = "it looks tab-separated" if separator == "\t" else f"it looks {separator!r}-separated"
    return MeldDataError(f"{path}: the header row has {len(header)} column(s); expected comma-separated columns "
                         f"{', '.join(COLUMNS)} ({hint}; save it as a comma-separated CSV in UTF-8)")


def _rows(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each record; the csv module's own errors become one MeldDataError naming the line."""
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if "field limit" in str(err):
                raise MeldDataError(
                    f"{path}, line {start}: a field of over {csv.field_size_limit()} characters, far longer than "
                    "any MELD utterance (is a quote \" opened on this line never closed?)") from None
            raise MeldDataError(f"{path}, line {start}: not readable as CSV ({err})") from None
        yield start, fields


def _parse_row(row: dict[str, str], split: str) -> Utterance:
    ints = {column: _parse_int(row[column], column) for column in _INT_COLUMNS}
    times: dict[str, float] = {}
    for column in ("StartTime", "EndTime"):
        try:
            times[column] = parse_timestamp(row[column])
        except ValueError as err:
            raise ValueError(f"{column}: {err}") from None
    return Utterance(
        split=split,
        dialogue_id=ints["Dialogue_ID"],
        utterance_id=ints["Utterance_ID"],
        speaker=repair_text(row["Speaker"]),
        text=repair_text(row["Utterance"]),
        emotion=EMOTIONS[label_index("emotion", row["Emotion"])],
        sentiment=SENTIMENTS[label_index("sentiment", row["Sentiment"])],
        season=ints["Season"],
        episode=ints["Episode"],
        start_s=times["StartTime"],
        end_s=times["EndTime"],
        sr_no=ints["Sr No."],
    )


def read_split_csv(path: str | Path, split: str) -> list[Utterance]:
    """All rows of one split's CSV, in file order, with text repaired and every field validated.

    Accepts UTF-8 (with or without BOM), cp1252/Latin-1 bytes for files re-saved on Windows, and UTF-16
    with a byte-order mark. Extra columns are ignored. Raises MeldDataError naming the file, line and
    field of the first problem; a record's line is the one it starts on.
    """
    path = Path(path)
    if split not in SPLITS:
        raise MeldDataError(f"unknown split {split!r} for {path}; expected one of {', '.join(SPLITS)}")
    if not path.is_file():
        raise MeldDataError(f"{path}: file not found (expected the {split} split's CSV)")
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    rows = _rows(reader, path)
    header = [name.strip() for name in next(rows, (0, []))[1]]
    if not header:
        raise MeldDataError(f"{path}: the file is empty (expected a header row: {', '.join(COLUMNS)})")
    missing = [column for column in COLUMNS if column not in header]
    if missing:
        raise _header_not_split(path, header) or MeldDataError(
            f"{path}: missing column(s) {', '.join(missing)}; a MELD CSV has {', '.join(COLUMNS)}"
        )
    utterances: list[Utterance] = []
    line_of_key: dict[str, int] = {}
    for line, fields in rows:
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            # A quote left open swallows the lines after it into one field.
            hint = " (is a quote \" opened on this line never closed?)" if any("\n" in f for f in fields) else ""
            raise MeldDataError(f"{path}, line {line}: {len(fields)} fields, expected {len(header)}{hint}")
        try:
            utterance = _parse_row(dict(zip(header, fields)), split)
        except ValueError as err:
            raise MeldDataError(f"{path}, line {line}: {err}") from None
        if utterance.key in line_of_key:
            raise MeldDataError(
                f"{path}: lines {line_of_key[utterance.key]} and {line} both have Dialogue_ID "
                f"{utterance.dialogue_id}, Utterance_ID {utterance.utterance_id} ({utterance.key})"
            )
        line_of_key[utterance.key] = line
        utterances.append(utterance)
    return utterances


def load_splits(locations: Mapping[str, SplitLocation]) -> dict[str, list[Utterance]]:
    """``read_split_csv`` for each located split, e.g. the result of ``meld.layout.find_layout``."""
    return {split: read_split_csv(location.csv, location.split) for split, location in locations.items()}
