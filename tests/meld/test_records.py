from collections import Counter
from pathlib import Path

import pytest

from meld.errors import MeldDataError
from meld.layout import find_layout
from meld.records import COLUMNS, SPLITS, Utterance, load_splits, parse_timestamp, read_split_csv
from tests.meld.test_text_repair import misread_as_cp1252

HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
# Small but covers the quirks: quoted commas, every special punctuation mark, é, a 1-digit hour,
# a 2-digit ms, an Utterance_ID gap, a repeated Sr No., label case and spaces.
HAND_CSV = HEADER + (
    '1,"Oh, you’re kidding… “No” — ‘really’ – café",Monica,Surprise ,positive,0,0,1,1,"0:00:01,500","0:00:02,25"\n'
    "1,Fine.,Richard’s Date,neutral,NEUTRAL,0,2,1,1,\"00:10:00,000\",\"00:10:03,042\"\n"
    "3,What?,Joey,fear,negative,7,1,10,17,\"1:02:03,004\",\"1:02:04,100\"\n"
)
HAND_RECORDS = [
    Utterance("dev", 0, 0, "Monica", "Oh, you’re kidding… “No” — ‘really’ – café", "surprise", "positive",
              1, 1, 1.5, 2.25, 1),
    Utterance("dev", 0, 2, "Richard’s Date", "Fine.", "neutral", "neutral", 1, 1, 600.0, 603.042, 1),
    Utterance("dev", 7, 1, "Joey", "What?", "fear", "negative", 10, 17, 3723.004, 3724.1, 3),
]

SPLIT_SIZES = {"train": 9989, "dev": 1109, "test": 2610}
DIALOGUES = {"train": 1038, "dev": 114, "test": 280}
EMOTION_COUNTS = {
    "train": {
        "neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109, "sadness": 683, "disgust": 271, "fear": 268
    },
    "dev": {"neutral": 470, "joy": 163, "surprise": 150, "anger": 153, "sadness": 111, "disgust": 22, "fear": 40},
    "test": {"neutral": 1256, "joy": 402, "surprise": 281, "anger": 345, "sadness": 208, "disgust": 68, "fear": 50},
}


# Each variant turns clean UTF-8 CSV text into the bytes of one copy of MELD found in the wild.
def old_c1_csv(text: str) -> bytes:
    """Pre-2020 GitHub / MELD.Raw / Kaggle: cp1252 punctuation decoded as Latin-1, saved as UTF-8."""
    return "".join(ch.encode("cp1252").decode("latin-1") if ch in "’…—‘“”–" else ch for ch in text).encode("utf-8")


def misread_utf8_csv(text: str) -> bytes:
    """The UTF-8 file opened as cp1252 (undefined bytes passed through as Windows does) and saved again."""
    return misread_as_cp1252(text).encode("utf-8")


def cp1252_csv(text: str) -> bytes:
    """The file re-saved by Excel on Windows: cp1252 bytes, not valid UTF-8."""
    data = text.encode("cp1252")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    return data


def bom_crlf_csv(text: str) -> bytes:
    return ("\ufeff" + text.replace("\n", "\r\n")).encode("utf-8")


VARIANTS = [old_c1_csv, misread_utf8_csv, cp1252_csv, bom_crlf_csv]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_hand_written_csv(tmp_path):
    assert read_split_csv(write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV), "dev") == HAND_RECORDS
    assert HAND_RECORDS[0].key == "dev/dia0_utt0"
    assert HAND_RECORDS[2].clip_name == "dia7_utt1.mp4"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.__name__)
def test_hand_written_encoding_variants(tmp_path, variant):
    path = tmp_path / "dev_sent_emo.csv"
    path.write_bytes(variant(HAND_CSV))
    assert read_split_csv(path, "dev") == HAND_RECORDS


def test_extra_columns_and_blank_lines_are_ignored(tmp_path):
    text = HAND_CSV.replace("EndTime\n", "EndTime,Note\n").replace('25"\n', '25",x\n', 1)
    text = text.replace('"00:10:03,042"\n', '"00:10:03,042",\n\n')
    text = text.replace('"1:02:04,100"\n', '"1:02:04,100",y\n')
    assert read_split_csv(write_csv(tmp_path / "dev_sent_emo.csv", text), "dev") == HAND_RECORDS


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:16:21,731", 981.731),
        ("0:11:35,361", 695.361),
        ("1:02:03,004", 3723.004),
        (" 10:00:00,000 ", 36000.0),
        ("00:06:47,28", 407.28),  # 2-digit ms are a decimal fraction: 0.28 s
        ("00:05:11,82", 311.82),
        ("0:00:00,05", 0.05),
    ],
)
def test_parse_timestamp(text, seconds):
    assert parse_timestamp(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "00:06:47", "00:06:47.280", "0:6:47,280", "000:06:47,280", "00:06:47,2800", "00:06:47,2",
     "00:60:00,000", "00:00:60,000", "ab:cd:ef,ghi", "-0:00:01,000"],
)
def test_parse_timestamp_rejects(text):
    with pytest.raises(ValueError, match="h:mm:ss,ms|above 59"):
        parse_timestamp(text)


def test_bad_timestamp_names_line_and_field(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV.replace('"00:10:03,042"', '"00:10:03"'))
    with pytest.raises(MeldDataError) as err:
        read_split_csv(path, "dev")
    assert str(err.value) == (
        f"{path}, line 3: EndTime: '00:10:03' is not a time like 0:16:21,731 (h:mm:ss,ms)"
    )


def test_unknown_emotion_names_line_value_and_allowed(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV.replace("fear,negative", "happy,negative"))
    with pytest.raises(MeldDataError) as err:
        read_split_csv(path, "dev")
    assert str(err.value) == (
        f"{path}, line 4: emotion 'happy' is not one of neutral, joy, surprise, anger, sadness, disgust, fear"
    )


def test_unknown_sentiment(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV.replace("NEUTRAL", "mixed"))
    with pytest.raises(MeldDataError, match=r", line 3: sentiment 'mixed' is not one of neutral, positive, negative"):
        read_split_csv(path, "dev")


@pytest.mark.parametrize(("old", "column"), [(",7,1,", ",x,1,"), (",7,1,", ",7,-1,"), (",10,17,", ",10,1.5,")])
def test_non_integer_id(tmp_path, old, column):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV.replace(old, column))
    with pytest.raises(MeldDataError, match=r", line 4: \w+ '[^']+' is not a non-negative whole number"):
        read_split_csv(path, "dev")


def test_missing_columns_are_named(tmp_path):
    text = HAND_CSV.replace("Speaker,", "Who,", 1).replace(",EndTime", ",End", 1)
    path = write_csv(tmp_path / "dev_sent_emo.csv", text)
    with pytest.raises(MeldDataError, match=rf"^{path}: missing column\(s\) Speaker, EndTime; a MELD CSV has Sr No\."):
        read_split_csv(path, "dev")


def test_duplicate_key_names_both_lines(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV.replace(",7,1,", ",0,0,"))
    with pytest.raises(MeldDataError) as err:
        read_split_csv(path, "dev")
    assert str(err.value) == f"{path}: lines 2 and 4 both have Dialogue_ID 0, Utterance_ID 0 (dev/dia0_utt0)"


def test_wrong_field_count(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV + "4,Short row,Ross\n")
    with pytest.raises(MeldDataError, match=r", line 5: 3 fields, expected 11$"):
        read_split_csv(path, "dev")


def test_a_field_over_the_csv_limit_names_its_line(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV.replace("Fine.", "x" * 131_073))
    with pytest.raises(MeldDataError) as err:
        read_split_csv(path, "dev")
    assert str(err.value).startswith(f"{path}, line 3: a field of over 131072 characters")


def test_a_quote_never_closed_names_the_line_it_opens_on(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV + '4,"Oh no,Ross\n5,Bye,Joey\n')
    with pytest.raises(MeldDataError, match=rf"^{path}, line 5: 2 fields, expected 11 \(is a quote \" opened on"):
        read_split_csv(path, "dev")


def test_a_5000_digit_id_is_an_invalid_integer_of_its_field(tmp_path):
    path = write_csv(tmp_path / "dev_sent_emo.csv", HAND_CSV.replace(",7,1,", f",{'1' * 5000},1,"))
    with pytest.raises(MeldDataError) as err:
        read_split_csv(path, "dev")
    assert str(err.value) == (f"{path}, line 4: Dialogue_ID '{'1' * 40}'... (5000 characters) is not a valid id: "
                              "5000 digits, expected at most 18")


def test_a_byte_order_mark_on_a_file_that_is_not_all_utf8_is_not_part_of_the_header(tmp_path):
    # Saved as "CSV UTF-8" (with a BOM), then one word typed in cp1252: decoded as cp1252 or Latin-1,
    # the BOM was "ï»¿Sr No." and the file was refused for a missing column Sr No.
    data = ("\ufeff" + HAND_CSV).encode("utf-8").replace("café".encode("utf-8"), "café".encode("cp1252"))
    path = tmp_path / "dev_sent_emo.csv"
    path.write_bytes(data)
    assert read_split_csv(path, "dev") == HAND_RECORDS


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_with_a_byte_order_mark_is_read(tmp_path, encoding):
    path = tmp_path / "dev_sent_emo.csv"
    path.write_bytes(HAND_CSV.encode(encoding) if encoding == "utf-16" else ("\ufeff" + HAND_CSV).encode(encoding))
    assert path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    assert read_split_csv(path, "dev") == HAND_RECORDS


@pytest.mark.parametrize(("encode", "hint"), [
    (lambda text: text.replace(",", ";").encode("utf-8"), "it looks ';'-separated"),
    # Excel's "Unicode text": UTF-16 with a byte-order mark, tab-separated.
    (lambda text: text.replace(",", "\t").encode("utf-16"), "it looks tab-separated"),
    (lambda text: text.encode("utf-16-le"), "it has NUL characters: is it UTF-16 without a byte-order mark?"),
], ids=["semicolons", "excel-unicode-text", "utf16-without-bom"])
def test_a_header_not_split_into_columns_says_why(tmp_path, encode, hint):
    path = tmp_path / "dev_sent_emo.csv"
    path.write_bytes(encode(HAND_CSV))
    with pytest.raises(MeldDataError) as err:
        read_split_csv(path, "dev")
    message = str(err.value)
    assert message.startswith(f"{path}: the header row has ") and "missing column" not in message
    assert f"expected comma-separated columns {', '.join(COLUMNS)} ({hint}" in message


def test_empty_missing_file_and_unknown_split(tmp_path):
    empty = write_csv(tmp_path / "dev_sent_emo.csv", "")
    with pytest.raises(MeldDataError, match="the file is empty"):
        read_split_csv(empty, "dev")
    with pytest.raises(MeldDataError, match="file not found"):
        read_split_csv(tmp_path / "nope.csv", "dev")
    with pytest.raises(MeldDataError, match="unknown split 'validation'"):
        read_split_csv(empty, "validation")


def test_real_csvs_sizes_and_classes(shared_meld_dir):
    splits = load_splits(find_layout(shared_meld_dir, need_clips=False))
    assert list(splits) == list(SPLITS)
    for split, utterances in splits.items():
        assert len(utterances) == SPLIT_SIZES[split]
        assert len({u.dialogue_id for u in utterances}) == DIALOGUES[split]
        assert Counter(u.emotion for u in utterances) == EMOTION_COUNTS[split]
        assert {u.split for u in utterances} == {split}
    train = splits["train"]
    assert 60 not in {u.dialogue_id for u in train}
    assert len({u.sr_no for u in train}) < len(train)  # Sr No. repeats in train: never a key
    first = train[0]
    assert (first.key, first.speaker, first.season, first.episode, first.start_s, first.end_s) == (
        "train/dia0_utt0", "Chandler", 8, 21, 976.059, 981.731)
    assert first.text == "also I was the point person on my company’s transition from the KL-5 to GR-6 system."
    by_key = {u.key: u for split in splits.values() for u in split}
    assert by_key["train/dia437_utt2"].end_s == 407.28
    assert by_key["test/dia155_utt3"].start_s == by_key["test/dia155_utt3"].end_s
    assert by_key["train/dia438_utt2"].speaker == "Richard’s Date"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.__name__)
def test_real_encoding_variants_parse_identically(shared_meld_dir, tmp_path, variant):
    source = shared_meld_dir / "train_sent_emo.csv"
    path = tmp_path / "train_sent_emo.csv"
    path.write_bytes(variant(source.read_text(encoding="utf-8")))
    assert path.read_bytes() != source.read_bytes()
    assert read_split_csv(path, "train") == read_split_csv(source, "train")


def test_kaggle_layout_with_old_csvs(shared_meld_dir, tmp_path):
    base = tmp_path / "MELD-RAW" / "MELD.Raw"
    clip_dirs = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
    for split in SPLITS:
        folder = base / split
        (folder / clip_dirs[split]).mkdir(parents=True)
        text = (shared_meld_dir / f"{split}_sent_emo.csv").read_text(encoding="utf-8")
        (folder / f"{split}_sent_emo.csv").write_bytes(old_c1_csv(text))
    loaded = load_splits(find_layout(tmp_path))
    expected = load_splits(find_layout(shared_meld_dir, need_clips=False))
    assert loaded == expected
