"""``meld.prepare`` on a small demo: the report, reruns, interruptions, workers, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import wave
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from clara.io_utils import STAGING_SUFFIX
from meld import clip_features
from meld import prepare as prepare_module
from meld.demo import make_demo
from meld.errors import MeldDataError
from meld.feature_cache import SILENT_OR_EMPTY, AudioSettings, SplitStore, audio_cache_dir, journal_files, read_journal, store_path
from meld.prepare import main, prepare, scan_clips
from meld.records import SPLITS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SIZE = 40  # rows; make_demo's minimum is 30
PROBLEM_KINDS = {"corrupt_clip": "undecodable", "missing_clip": "missing", "silent_clip": "silent_or_empty",
                 "short_clip": "silent_or_empty"}
EXTRA_KINDS = {"extra_clip", "resource_fork", "final_videos_copy"}


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo's MELD.Raw; built once per session (make_demo returns at once when it is complete)."""
    return make_demo(tmp_path_factory.getbasetemp() / "demo", size=DEMO_SIZE)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run: its audio-<key> folder and report."""
    report = prepare(demo, tmp_path_factory.mktemp("reference"), workers=1)
    return Path(report["cache_dir"]), report


def store_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {split: store_path(cache_dir, split).read_bytes() for split in SPLITS}


def journal_records(cache_dir: Path) -> int:
    return sum(1 for path in journal_files(cache_dir / "journal") for _ in read_journal(path, 80))


def test_report_counts_match_the_planted_defects(demo, reference):
    cache_dir, report = reference
    defects = json.loads((demo / "DEMO_DEFECTS.json").read_text())["defects"]
    expected = {(d["key"], PROBLEM_KINDS[d["kind"]], d["file"]) for d in defects if d["kind"] in PROBLEM_KINDS}
    assert {(p["key"], p["status"], p["file"]) for p in report["problems"]} == expected
    assert all(p["reason"] for p in report["problems"])
    assert {e["file"] for e in report["extra_files"]} == {d["file"] for d in defects if d["kind"] in EXTRA_KINDS}

    counts = report["counts"]
    assert sum(counts[split]["rows"] for split in SPLITS) == DEMO_SIZE
    for split in SPLITS:
        split_defects = [d for d in defects if d["split"] == split]
        c = counts[split]
        for status in ("missing", "undecodable", "silent_or_empty"):
            assert c[status] == sum(PROBLEM_KINDS.get(d["kind"]) == status for d in split_defects), (split, status)
        assert c["extra_files"] == sum(d["kind"] in EXTRA_KINDS for d in split_defects)
        assert c["truncated"] == 0  # the demo's longest clips are far under 30 s
        assert c["ok"] == c["cached"] == c["rows"] - sum(d["kind"] in PROBLEM_KINDS for d in split_defects)
        assert [r.key for r in SplitStore(store_path(cache_dir, split)).records if r.cached] != []
    assert counts["total"]["rows"] == DEMO_SIZE
    assert report["run"] == {**report["run"], "decoded": DEMO_SIZE - 1, "reused": 0}  # all but the missing clip
    assert json.loads((cache_dir / "prepare_report.json").read_text()) == report
    assert not journal_files(cache_dir / "journal")


def test_rerun_decodes_nothing_and_rewrites_nothing(demo, reference, capsys):
    cache_dir, first = reference
    stamps = {split: store_path(cache_dir, split).stat().st_mtime_ns for split in SPLITS}
    assert main(["--data", str(demo), "--cache", str(cache_dir.parent), "--workers", "2", "--no-progress"]) == 0
    report = json.loads((cache_dir / "prepare_report.json").read_text())
    assert report["run"]["decoded"] == 0 and report["run"]["reused"] == DEMO_SIZE - 1
    assert report["counts"] == first["counts"] and report["problems"] == first["problems"]
    assert {split: store_path(cache_dir, split).stat().st_mtime_ns for split in SPLITS} == stamps
    out = capsys.readouterr().out
    assert "nothing to decode" in out and "undecodable" in out and "._dia" in out


def test_a_damaged_store_is_rebuilt_from_its_clips(demo, reference, tmp_path, capsys):
    cache_dir, _ = reference
    data = tmp_path / "MELD.Raw"
    shutil.copytree(demo, data)  # copy2 keeps the files' mtimes, so the cache still matches
    copy = tmp_path / "cache" / cache_dir.name
    shutil.copytree(cache_dir, copy)
    dev_rows = len(SplitStore(store_path(cache_dir, "dev")).records)
    store_path(copy, "dev").write_bytes(b"garbage")
    with pytest.raises(MeldDataError, match="not a readable feature store.*run meld.prepare again"):
        SplitStore(store_path(copy, "dev"))  # a reader's error, whose advice is the repair below
    report = prepare(data, tmp_path / "cache", workers=1)
    assert 0 < report["run"]["decoded"] <= dev_rows and report["run"]["decoded"] < DEMO_SIZE - dev_rows
    assert "dev.safetensors: not a readable feature store" in capsys.readouterr().out
    assert store_bytes(copy) == store_bytes(cache_dir)  # every split as an uninterrupted run wrote it


def test_a_store_without_a_checksum_is_rewritten_with_one_without_decoding(demo, reference, tmp_path):
    # Stores prepared before they had a CRC32 are read unchecked; the next prepare run adds one from the
    # store's own frames, giving the bytes a fresh run writes.
    cache_dir, _ = reference
    data = tmp_path / "MELD.Raw"
    shutil.copytree(demo, data)  # copy2 keeps the files' mtimes, so the cache still matches
    copy = tmp_path / "cache" / cache_dir.name
    shutil.copytree(cache_dir, copy)
    with safe_open(str(store_path(copy, "dev")), framework="np") as handle:
        meta, mel = json.loads(handle.metadata()["meld_clara"]), handle.get_tensor("mel")
    del meta["mel_crc32"]
    save_file({"mel": mel}, str(store_path(copy, "dev")), metadata={"meld_clara": json.dumps(meta, sort_keys=True)})
    assert not SplitStore(store_path(copy, "dev")).checked
    report = prepare(data, tmp_path / "cache", workers=1)
    assert report["run"]["decoded"] == 0
    assert SplitStore(store_path(copy, "dev")).checked
    assert store_bytes(copy) == store_bytes(cache_dir)


def test_a_changed_clip_is_decoded_again(demo, reference, tmp_path):
    cache_dir, _ = reference
    data = tmp_path / "MELD.Raw"
    shutil.copytree(demo, data)  # copy2 keeps the files' mtimes, so the cache still matches
    shutil.copytree(cache_dir, tmp_path / "cache" / cache_dir.name)
    clip = next((data / "dev_splits_complete").glob("dia*.mp4"))
    clip.touch()
    report = prepare(data, tmp_path / "cache", workers=1)
    assert report["run"]["decoded"] == 1
    before, after = SplitStore(store_path(cache_dir, "dev")), SplitStore(store_path(Path(report["cache_dir"]), "dev"))
    changed = [(old.key, old.mtime_ns != new.mtime_ns) for old, new in zip(before.records, after.records) if old != new]
    assert changed == [(f"dev/{clip.stem}", True)]
    assert all((before.frames(r.key) == after.frames(r.key)).all() for r in before.records if r.cached)


def test_features_of_a_clip_changed_since_prepare_are_refused_until_it_runs_again(demo, reference, tmp_path):
    # Readers took features by split and utterance only: a clip replaced after prepare, or another MELD copy
    # prepared into a shared --cache, was read silently as the wrong audio.
    from meld.dataset import DataConfig, build_datasets

    cache_dir, _ = reference
    data = tmp_path / "MELD.Raw"
    shutil.copytree(demo, data)  # copy2 keeps the files' mtimes: the same clips
    shutil.copytree(cache_dir, tmp_path / "cache" / cache_dir.name)
    config = DataConfig(modality="audio")
    assert len(build_datasets(data, config, cache_root=tmp_path / "cache")["dev"]) > 0
    clip = next((data / "dev_splits_complete").glob("dia*.mp4"))
    clip.touch()
    with pytest.raises(MeldDataError) as caught:
        build_datasets(data, config, cache_root=tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith(f"1 clip(s) of the dev split of {data} are not the files their features")
    assert f"(first: dev_splits_complete/{clip.name};" in message
    assert f"python -m meld.prepare --data {data} --cache {tmp_path / 'cache'}`" in message
    prepare(data, tmp_path / "cache", workers=1)
    assert len(build_datasets(data, config, cache_root=tmp_path / "cache")["dev"]) > 0
    clip.unlink()  # features are read without their clips: a clip not there is not checked
    assert len(build_datasets(data, config, cache_root=tmp_path / "cache")["dev"]) > 0


def test_a_link_to_a_clip_not_there_is_a_missing_clip(demo, reference, tmp_path):
    # Clips linked from a disk that is not mounted: the link's stat() failed and stopped the whole run.
    cache_dir, _ = reference
    data = tmp_path / "MELD.Raw"
    shutil.copytree(demo, data)  # copy2 keeps the files' mtimes, so the cache still matches
    shutil.copytree(cache_dir, tmp_path / "cache" / cache_dir.name)
    record = next(record for record in SplitStore(store_path(cache_dir, "dev")).records if record.cached)
    clip = data / record.file
    clip.unlink()
    clip.symlink_to(tmp_path / "unmounted" / clip.name)
    report = prepare(data, tmp_path / "cache", workers=1)
    assert {"split": "dev", "key": record.key, "file": record.file, "status": "missing",
            "reason": "no such file in the clip folder"} in report["problems"]
    assert report["run"]["decoded"] == 0


def test_interrupted_run_resumes_to_the_same_cache(demo, reference, tmp_path, monkeypatch, capsys):
    real, calls = clip_features.process_clip, []

    def ctrl_c_after_ten(task):
        calls.append(task.key)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(clip_features, "process_clip", ctrl_c_after_ten)
    assert main(["--data", str(demo), "--cache", str(tmp_path), "--workers", "1", "--no-progress"]) == 130
    assert "run the same command again" in capsys.readouterr().err
    cache_dir = audio_cache_dir(tmp_path, AudioSettings())
    assert journal_records(cache_dir) == 10 and not store_path(cache_dir, "train").exists()
    monkeypatch.undo()

    report = prepare(demo, tmp_path, workers=1)
    assert report["run"]["decoded"] == DEMO_SIZE - 1 - 10
    assert store_bytes(cache_dir) == store_bytes(reference[0])
    assert not journal_files(cache_dir / "journal")


def test_killed_run_resumes_to_the_same_cache(demo, reference, tmp_path):
    # prepare's CLI in a child process with each clip slowed down, killed with SIGKILL mid-run.
    script = textwrap.dedent("""
        import sys, time
        from meld import clip_features, prepare
        real = clip_features.process_clip
        def slow(task):
            time.sleep(0.05)
            return real(task)
        clip_features.process_clip = slow
        sys.exit(prepare.main(sys.argv[1:]))
    """)
    args = ["--data", str(demo), "--cache", str(tmp_path), "--workers", "1", "--no-progress"]
    child = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache_dir = audio_cache_dir(tmp_path, AudioSettings())
    deadline = time.monotonic() + 60
    while journal_records(cache_dir) < 8:
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child wrote no journal"
        time.sleep(0.01)
    child.kill()
    child.wait()
    child.stderr.close()
    done = journal_records(cache_dir)
    assert 8 <= done < DEMO_SIZE - 1 and not store_path(cache_dir, "train").exists()

    report = prepare(demo, tmp_path, workers=1)
    assert report["run"]["decoded"] == DEMO_SIZE - 1 - done
    assert store_bytes(cache_dir) == store_bytes(reference[0])


def _die_on_the_third_clip(task: clip_features.ClipTask):
    """Run in a pool worker: the process ends without an answer, as one killed for memory does."""
    if task.key == "train/dia0_utt2":
        os._exit(9)
    return clip_features.process_clip(task)


def test_a_store_half_written_by_a_killed_run_is_removed_by_the_next(demo, reference, tmp_path):
    # kill -9 (or the OOM killer) while a split store is written leaves atomic_path's temporary, as large
    # as the store and hidden; nothing removed it, and every such kill left another.
    cache_dir, _ = reference
    copy = tmp_path / cache_dir.name
    shutil.copytree(cache_dir, copy)
    fd, name = tempfile.mkstemp(prefix=".train.safetensors.", suffix=STAGING_SUFFIX, dir=copy)
    os.write(fd, store_path(cache_dir, "train").read_bytes()[:1000])
    os.close(fd)
    report = prepare(demo, tmp_path, workers=1)
    assert report["run"]["decoded"] == 0 and not Path(name).exists()
    assert store_bytes(copy) == store_bytes(cache_dir)


def test_a_dead_worker_is_one_clear_error_and_finished_clips_are_kept(demo, tmp_path):
    clips = sorted(next(demo.rglob("train_splits")).glob("dia0_utt*.mp4"))[:4]  # dia0_utt0 .. dia0_utt3
    tasks = [clip_features.ClipTask(f"train/{clip.stem}", str(clip), clip.name, clip.stat().st_size,
                                    clip.stat().st_mtime_ns, 1.0, AudioSettings()) for clip in clips]  # fmt: skip
    assert "train/dia0_utt2" in [task.key for task in tasks]
    finished = []
    with pytest.raises(clip_features.WorkerDied, match=r"a decoding process died .* of \d+ clips unfinished; the finished"):
        clip_features.run_clips(tasks, 2, lambda record, mel: finished.append(record.key), work=_die_on_the_third_clip)
    assert "train/dia0_utt2" not in finished and len(set(finished)) == len(finished)


def process_group(pgid: int) -> list[int]:
    """Live processes in a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            # /proc/PID/stat: "pid (name) state ppid pgrp ..."; the name may hold spaces.
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return members


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_workers_exit_when_prepare_is_killed():
    # A parent killed with SIGKILL must not leave its pool workers (each with torch loaded) behind.
    script = textwrap.dedent("""
        import os, signal
        from concurrent.futures import ProcessPoolExecutor
        from meld.clip_features import _worker_init, worker_context
        pool = ProcessPoolExecutor(2, mp_context=worker_context(), initializer=_worker_init)
        list(pool.map(abs, [1, 2]))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, start_new_session=True,
                             stderr=subprocess.DEVNULL)
    try:
        assert child.wait(timeout=60) == -9
        deadline = time.monotonic() + 20
        while process_group(child.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_group(child.pid) == []
    finally:
        if process_group(child.pid):  # only when failing: do not leave the test's own processes behind
            os.killpg(child.pid, signal.SIGKILL)


def test_worker_processes_give_the_same_cache(demo, reference, tmp_path):
    report = prepare(demo, tmp_path, workers=2)
    assert report["run"]["workers"] == 2 and report["run"]["decoded"] == DEMO_SIZE - 1
    assert store_bytes(Path(report["cache_dir"])) == store_bytes(reference[0])


def test_long_clips_are_capped_under_a_new_key(demo, reference, tmp_path):
    cap = AudioSettings(max_seconds=2.0)
    report = prepare(demo, tmp_path, cap, workers=1)
    assert Path(report["cache_dir"]).name == f"audio-{cap.key()}" != reference[0].name
    longer = {r.key for split in SPLITS for r in SplitStore(store_path(reference[0], split)).records
              if r.cached and r.samples > 96_000}
    assert longer  # the demo has clips over 2 s
    truncated = [p for p in report["problems"] if p["status"] == "truncated"]
    assert {p["key"] for p in truncated} == longer
    assert all("kept the first 2 s" in p["reason"] for p in truncated)
    for split in SPLITS:
        for record in SplitStore(store_path(Path(report["cache_dir"]), split)).records:
            if record.key in longer:
                assert (record.samples, record.frames) == (96_000, 1 + 96_000 // 512)


def test_a_clip_without_samples_is_reported_empty_even_with_no_minimum_length(tmp_path):
    # min_seconds 0 is allowed; an empty clip then reached the silence check, whose max() of no samples
    # raised and stopped the whole run.
    path = tmp_path / "dia155_utt3.wav"
    with wave.open(str(path), "wb") as header_only:
        header_only.setnchannels(2)
        header_only.setsampwidth(2)
        header_only.setframerate(48_000)
    stat = path.stat()
    task = clip_features.ClipTask("test/dia155_utt3", str(path), path.name, stat.st_size, stat.st_mtime_ns, 0.0,
                                  AudioSettings(min_seconds=0.0))
    record, mel = clip_features.process_clip(task)
    assert (record.status, record.reason, record.samples, record.frames, mel) == (
        SILENT_OR_EMPTY, "no audio samples", 0, 0, None)


def test_names_that_are_not_utf8_are_reported_not_a_traceback(demo, tmp_path, capsys):
    # An old archive unpacked on Linux can leave names in Latin-1 or cp437: Python holds their bytes as
    # surrogates, which the cache folder's hash, the JSON report and a strict UTF-8 stdout refused.
    try:
        data = tmp_path / os.fsdecode(b"Fr\xe9d") / "MELD.Raw"
        shutil.copytree(demo, data)
    except OSError:
        pytest.skip("this file system takes only UTF-8 names")
    stray = data / "dev_splits_complete" / os.fsdecode(b"notes-\xe9t\xe9.txt")
    stray.write_bytes(b"")
    assert main(["--data", str(data), "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dev_splits_complete/notes-\\udce9t\\udce9.txt: not named like a MELD clip" in out
    report_path = Path(out.rsplit("report: ", 1)[1].strip())
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["data_root"] == str(data.resolve())
    reason = "not named like a MELD clip (dia{D}_utt{U}.mp4)"
    assert {"split": "dev", "file": os.path.relpath(stray, data), "reason": reason} in report["extra_files"]


def test_scan_sorts_out_files_without_a_row(tmp_path):
    folder = tmp_path / "dev_splits_complete"
    folder.mkdir()
    for name in ("dia0_utt0.mp4", "dia0_utt9.mp4", "._dia0_utt0.mp4", ".DS_Store", "final_videos_testdia0_utt0.mp4",
                 "notes.txt"):
        (folder / name).write_bytes(b"")
    (folder / "sub").mkdir()
    clips, extras = scan_clips(tmp_path, "dev", folder, {"dia0_utt0.mp4", "dia0_utt1.mp4"})
    assert clips == {"dia0_utt0.mp4": folder / "dia0_utt0.mp4"}
    reasons = {extra.file: extra.reason for extra in extras}
    ignored = ("dia0_utt9.mp4", "._dia0_utt0.mp4", ".DS_Store", "final_videos_testdia0_utt0.mp4", "notes.txt")
    assert set(reasons) == {f"dev_splits_complete/{name}" for name in ignored}
    assert "no row" in reasons["dev_splits_complete/dia0_utt9.mp4"]
    assert "resource fork" in reasons["dev_splits_complete/._dia0_utt0.mp4"]
    assert "copy of dia0_utt0.mp4" in reasons["dev_splits_complete/final_videos_testdia0_utt0.mp4"]


def test_without_data_it_prepares_the_demo(demo, reference, monkeypatch, capsys):
    monkeypatch.setattr(prepare_module, "ensure_demo", lambda log=None: demo)
    assert main(["--cache", str(reference[0].parent), "--no-progress"]) == 0
    assert f"MELD at {demo.resolve()}" in capsys.readouterr().out


def write_csv_only(root: Path) -> None:
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    for split in SPLITS:
        row = '1,Hi.,Joey,joy,positive,0,0,1,1,"0:00:01,000","0:00:02,000"\n'
        (root / f"{split}_sent_emo.csv").write_text(header + row)


@pytest.mark.parametrize("case, args, message", [
    ("no such folder", ["--data", "{tmp}/nowhere"], "is not a folder"),
    ("no CSVs", ["--data", "{tmp}/empty"], "looked for file train_sent_emo.csv"),
    ("CSVs only", ["--data", "{tmp}/csv-only"], "text-only"),
    ("bad override", ["--data", "{tmp}/empty", "--set", "audio.n_mel=64"], "unknown key(s) n_mel"),
    # The rest of the data config is the fine-tune's: it was read and then ignored here.
    ("not an audio setting", ["--data", "{tmp}/empty", "--set", "modality=text"],
     "--set modality=text: only audio.* settings apply here"),
    ("bad workers", ["--data", "{tmp}/empty", "--workers", "0"], "--workers must be at least 1"),
    # Only 0 means no cap; these read as no cap or overflowed before.
    ("negative cap", ["--data", "{tmp}/empty", "--max-seconds", "-5"], "--max-seconds must be a number of seconds >= 0"),
    ("nan cap", ["--data", "{tmp}/empty", "--max-seconds", "nan"], "(0: no cap), got nan"),
    ("infinite cap", ["--data", "{tmp}/empty", "--max-seconds", "inf"], "(0: no cap), got inf"),
    ("infinite cap in the config", ["--data", "{tmp}/empty", "--set", "audio.max_seconds=.inf"],
     "audio.max_seconds: expected a finite number, got inf"),
    ("binary config", ["--data", "{tmp}/empty", "--config", "{tmp}/binary.yaml"], "binary.yaml: not UTF-8 text"),
    ("cache is a file", ["--data", "{tmp}/empty", "--cache", "{tmp}/binary.yaml"], "binary.yaml: exists and is not a folder"),
])
def test_user_errors_are_one_clear_line(tmp_path, capsys, case, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "csv-only").mkdir()
    write_csv_only(tmp_path / "csv-only")
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_a_script_that_prepares_at_its_top_level_fails_instead_of_hanging(tmp_path):
    """prepare's workers (forkserver) run the top level of the script that started them: a script without
    `if __name__ == "__main__":` had each start a prepare of its own and wait for its parent's lock, forever."""
    import subprocess
    import sys

    from meld.demo import MIN_SIZE, make_demo

    root = make_demo(tmp_path / "demo", size=MIN_SIZE)
    script = tmp_path / "prepare_all.py"
    script.write_text("import sys\nfrom meld.prepare import prepare\nprepare(sys.argv[1], sys.argv[2], workers=2)\n")
    result = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "cache")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "meld.prepare.prepare was called while a worker process was starting" in result.stderr

