from pathlib import Path

import pytest

from meld.errors import MeldDataError
from meld.layout import SplitLocation, find_layout, find_split

CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}


def make(root: Path, *relative: str) -> None:
    """Create files (names ending in .csv or .mp4) and folders (anything else) under root."""
    for rel in relative:
        path = root / rel
        if path.suffix in (".csv", ".mp4"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        else:
            path.mkdir(parents=True, exist_ok=True)


def expected(root: Path, csv_dir: dict[str, str], clips_dir: dict[str, str]) -> dict[str, SplitLocation]:
    return {
        split: SplitLocation(
            split, root / csv_dir[split] / f"{split}_sent_emo.csv", root / clips_dir[split] / CLIP_DIRS[split]
        )
        for split in CLIP_DIRS
    }


def test_official_tarball_layout(tmp_path):
    make(
        tmp_path,
        "MELD.Raw/train/train_sent_emo.csv", "MELD.Raw/train/train_splits/dia0_utt0.mp4",
        "MELD.Raw/dev_sent_emo.csv", "MELD.Raw/dev_splits_complete/dia0_utt0.mp4",
        "MELD.Raw/test_sent_emo.csv", "MELD.Raw/output_repeated_splits_test/dia0_utt0.mp4",
    )
    dirs = {"train": "MELD.Raw/train", "dev": "MELD.Raw", "test": "MELD.Raw"}
    assert find_layout(tmp_path) == expected(tmp_path, dirs, dirs)
    inner = {"train": "train", "dev": ".", "test": "."}
    assert find_layout(tmp_path / "MELD.Raw") == expected(tmp_path / "MELD.Raw", inner, inner)


def test_flat_layout(tmp_path):
    make(tmp_path, *(f"{split}_sent_emo.csv" for split in CLIP_DIRS), *CLIP_DIRS.values())
    top = dict.fromkeys(CLIP_DIRS, ".")
    assert find_layout(tmp_path) == expected(tmp_path, top, top)


def test_kaggle_layout(tmp_path):
    for split, clips in CLIP_DIRS.items():
        folder = f"MELD-RAW/MELD.Raw/{split}"
        make(tmp_path, f"{folder}/{split}_sent_emo.csv", f"{folder}/{clips}/dia0_utt0.mp4")
    nested = {split: f"MELD-RAW/MELD.Raw/{split}" for split in CLIP_DIRS}
    assert find_layout(tmp_path) == expected(tmp_path, nested, nested)


def test_csv_only_folder(tmp_path):
    make(tmp_path, *(f"{split}_sent_emo.csv" for split in CLIP_DIRS), "MELD_Dyadic/train_sent_emo_dya.csv")
    assert find_layout(tmp_path, need_clips=False) == {
        split: SplitLocation(split, tmp_path / f"{split}_sent_emo.csv", None) for split in CLIP_DIRS
    }
    with pytest.raises(MeldDataError) as err:
        find_layout(tmp_path)
    assert str(err.value) == (
        f"MELD train split not found: looked for folder train_splits/ under {tmp_path}, up to 4 levels deep "
        "(hidden folders and __MACOSX skipped)"
    )


def test_real_csv_folder(shared_meld_dir):
    location = find_split(shared_meld_dir, "dev", need_clips=False)
    assert location == SplitLocation("dev", shared_meld_dir / "dev_sent_emo.csv", None)


def test_not_found_message(tmp_path):
    make(tmp_path, "a/b/c/d/train_sent_emo.csv", "a/b/c/d/train_splits")  # 5 levels: too deep
    with pytest.raises(MeldDataError) as err:
        find_split(tmp_path, "train", need_clips=True)
    assert str(err.value) == (
        f"MELD train split not found: looked for file train_sent_emo.csv and folder train_splits/ under {tmp_path}, "
        "up to 4 levels deep (hidden folders and __MACOSX skipped)"
    )


def test_macos_stubs_and_hidden_folders_are_ignored(tmp_path):
    make(
        tmp_path,
        "._train_sent_emo.csv", ".Trash/train_sent_emo.csv", ".cache/train_splits",
        "__MACOSX/train_sent_emo.csv", "__MACOSX/MELD.Raw/train_splits/._dia1_utt0.mp4",
        "MELD.Raw/train_sent_emo.csv", "MELD.Raw/._train_splits.csv",
        "MELD.Raw/train_splits/dia1_utt0.mp4", "MELD.Raw/train_splits/._dia1_utt0.mp4",
    )
    assert find_split(tmp_path, "train", need_clips=True) == SplitLocation(
        "train", tmp_path / "MELD.Raw/train_sent_emo.csv", tmp_path / "MELD.Raw/train_splits"
    )


def test_shallowest_candidate_wins(tmp_path):
    make(tmp_path, "dev_sent_emo.csv", "backup/dev_sent_emo.csv", "x/dev_splits_complete", "x/y/dev_splits_complete")
    assert find_split(tmp_path, "dev", need_clips=True) == SplitLocation(
        "dev", tmp_path / "dev_sent_emo.csv", tmp_path / "x/dev_splits_complete"
    )


def test_equal_depth_candidates_are_ambiguous(tmp_path):
    make(tmp_path, "copy1/test_sent_emo.csv", "copy2/test_sent_emo.csv")
    with pytest.raises(MeldDataError) as err:
        find_split(tmp_path, "test", need_clips=False)
    assert str(err.value) == (
        f"test_sent_emo.csv is ambiguous under {tmp_path}: found at the same depth in "
        f"{tmp_path / 'copy1/test_sent_emo.csv'}, {tmp_path / 'copy2/test_sent_emo.csv'}"
    )


def test_a_file_is_not_a_clip_folder(tmp_path):
    make(tmp_path, "dev_sent_emo.csv")
    (tmp_path / "dev_splits_complete").write_text("")
    assert find_split(tmp_path, "dev", need_clips=False).clips is None


def test_subset_of_splits(tmp_path):
    make(tmp_path, "dev_sent_emo.csv")
    assert list(find_layout(tmp_path, ("dev",), need_clips=False)) == ["dev"]


def test_bad_root_and_split(tmp_path):
    with pytest.raises(MeldDataError, match=r"MELD root .*missing is not a folder"):
        find_layout(tmp_path / "missing")
    with pytest.raises(MeldDataError, match=r"unknown split 'val'; expected one of train, dev, test"):
        find_split(tmp_path, "val", need_clips=False)
