"""clara.run_dir: the checks every command makes on its output folder before writing into it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from clara import config as config_lib
from clara.io_utils import atomic_directory, atomic_path, is_leftover
from clara.run_dir import (OutDirError, check_folder_path, check_resumable, claim, differing_keys, exclusive_run, same_path,
                           saved_config, shared_run)


@dataclass(frozen=True)
class Train:
    lr: float = 0.1
    steps: int = 10
    progress: bool = True


@dataclass(frozen=True)
class Settings:
    data: str = "a"
    train: Train = field(default_factory=Train)


def test_differing_keys_are_dotted_sorted_and_leave_out_what_may_differ():
    saved = Settings()
    new = config_lib.replace(saved, ["data=b", "train.lr=0.5", "train.progress=false"])
    assert differing_keys(saved, new) == ["data", "train.lr", "train.progress"]
    assert differing_keys(saved, new, {"train.progress"}) == ["data", "train.lr"]
    assert differing_keys(saved, new, {"train", "data"}) == []  # a whole section may be exempt


def test_saved_config_reads_only_its_own_kind(tmp_path):
    assert saved_config(tmp_path, Settings) is None  # no config.yaml
    config_lib.save_yaml(config_lib.replace(Settings(), ["train.lr=0.5"]), tmp_path / "config.yaml")
    assert saved_config(tmp_path, Settings).train.lr == 0.5
    for text in ("model: tiny\n", "[not, a, mapping]\n", "data: [unclosed\n", "train: 3\n"):
        (tmp_path / "config.yaml").write_text(text)
        assert saved_config(tmp_path, Settings) is None, text


def test_files_in_the_way_are_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    check_folder_path(tmp_path / "new" / "deeper")  # nothing in the way
    for path, message in ((afile, f"{afile}: exists and is not a folder"),
                          (afile / "sub" / "run", f"{afile}: exists and is not a folder (in {afile / 'sub' / 'run'})"),
                          (tmp_path / "dangling", f"{tmp_path / 'dangling'}: exists and is not a folder")):
        with pytest.raises(OutDirError, match=re.escape(message)):
            check_folder_path(path)


def test_claim_takes_new_empty_or_own_folders_only(tmp_path):
    def never(path):
        raise AssertionError("an empty folder needs no look inside")

    assert claim(tmp_path / "new", "demo.kind", never) is False
    (tmp_path / "empty").mkdir()
    assert claim(tmp_path / "empty", "demo.kind", never) is False
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert claim(tmp_path / "full", "demo.kind", lambda path: True) is True
    with pytest.raises(OutDirError, match="full exists and is not a demo.kind run; give an empty or new folder"):
        claim(tmp_path / "full", "demo.kind", lambda path: False)


def test_claim_clears_what_a_killed_atomic_write_left_and_nothing_else(tmp_path, monkeypatch):
    """A SIGKILL during an atomic write leaves its temporary (as the writers name them); one left as
    a new folder's first file made the folder read as someone else's."""
    run = tmp_path / "run"
    with atomic_path(tmp_path / "config.yaml") as tmp:  # the names the writers give their temporaries
        staged_file = tmp.name
    with atomic_directory(tmp_path / "tensorboard") as staging:
        staged_folder = staging.name
    assert re.fullmatch(r"\.config\.yaml\.[a-z0-9_]{8}\.tmp", staged_file) and is_leftover(staged_folder)
    run.mkdir()
    (run / ".checkpoint.pt.k2x_9abc.tmp").write_bytes(b"half a checkpoint")
    (run / ".tensorboard.q1w2e3r4.tmp").mkdir()
    assert claim(run, "demo.kind", lambda path: False) is False and not any(run.iterdir())
    # The user's own dot-files are not taken for leftovers, and other processes of a torchrun leave them be.
    (run / ".notes.tmp").write_text("mine")
    (run / ".env").write_text("mine")
    with pytest.raises(OutDirError):
        claim(run, "demo.kind", lambda path: False)
    (run / ".config.yaml.abcdefgh.tmp").write_text("partial")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(OutDirError):
        claim(run, "demo.kind", lambda path: False)
    assert sorted(p.name for p in run.iterdir()) == [".config.yaml.abcdefgh.tmp", ".env", ".notes.tmp"]
    # A process other than the main one, looking before it has cleared them: leftovers alone are a new folder.
    (run / ".notes.tmp").unlink()
    (run / ".env").unlink()
    assert claim(run, "demo.kind", lambda path: False) is False
    assert [p.name for p in run.iterdir()] == [".config.yaml.abcdefgh.tmp"]  # left for the main process


def test_a_folder_a_command_runs_in_is_refused_to_another_and_its_writes_are_left_alone(tmp_path):
    """Run again in another terminal while the first still runs (taken for stopped), a second command
    resumed from the first's checkpoint and both wrote it and its logs; claim also deleted the first's
    atomic writes in progress."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("a run")
    (run / ".checkpoint.pt.k2x_9abc.tmp").write_bytes(b"a checkpoint being written")
    busy = f"{run}: another command is running in this folder; wait for it to end"
    with exclusive_run(run):  # a second descriptor of the folder, as another process's, is refused
        with pytest.raises(OutDirError, match=re.escape(busy)):
            claim(run, "demo.kind", lambda path: True)
        with pytest.raises(OutDirError, match=re.escape(busy)):
            with exclusive_run(run):
                pytest.fail("a second holder ran")
        assert sorted(p.name for p in run.iterdir()) == [".checkpoint.pt.k2x_9abc.tmp", "config.yaml"]
    # Released (at the end, or with a killed process), the folder is the next command's.
    assert claim(run, "demo.kind", lambda path: True) is True
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    with exclusive_run(run):
        pass


def test_a_shared_folder_takes_more_commands_and_keeps_their_writes_in_progress(tmp_path):
    """A sweep's study folder: a second sweep command joins the first, and its claim must not delete the
    first one's atomic writes in progress (a summary being written)."""
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.db").write_text("a study")
    (study / ".summary.md.k2x_9abc.tmp").write_text("a summary being written")
    with shared_run(study):
        assert claim(study, "demo.sweep", lambda path: True, shared=True) is True
        with shared_run(study):  # the second command joins
            assert (study / ".summary.md.k2x_9abc.tmp").exists()
        with pytest.raises(OutDirError, match="another command is running in this folder"):
            claim(study, "demo.sweep", lambda path: True)
        with pytest.raises(OutDirError, match="another command is running in this folder"):
            with exclusive_run(study):
                pytest.fail("an exclusive run in a shared folder")
    assert claim(study, "demo.sweep", lambda path: True, shared=True) is True
    assert [p.name for p in study.iterdir()] == ["study.db"]  # with no command in it, leftovers go


def test_check_resumable_takes_new_folders_and_the_same_run_and_names_what_differs(tmp_path):
    check_resumable(tmp_path / "new", Settings(), "demo", (), "--out")  # nothing there yet
    run = tmp_path / "run"
    run.mkdir()
    config_lib.save_yaml(Settings(), run / "config.yaml")
    check_resumable(run, config_lib.replace(Settings(), ["train.progress=false"]), "demo", {"train.progress"}, "--out")
    with pytest.raises(OutDirError, match=re.escape(f"{run} holds a run with other settings (data, train.lr); "
                                                    "use a new --out, or the same settings to resume")):
        check_resumable(run, config_lib.replace(Settings(), ["data=b", "train.lr=1.0"]), "demo", (), "--out")
    (run / "config.yaml").write_text("model: tiny\n")  # another command's run
    with pytest.raises(OutDirError, match="is not a demo run"):
        check_resumable(run, Settings(), "demo", (), "--out")
    with pytest.raises(OutDirError, match="exists and is not a folder"):
        check_resumable(run / "config.yaml", Settings(), "demo", (), "--out")


def test_resume_compares_path_settings_as_paths(tmp_path, monkeypatch):
    """./runs//a/ and runs/a are one folder, so a resume that spells it differently is the same run;
    another folder is still another setting."""
    monkeypatch.chdir(tmp_path)  # where none of these exists: compared as spelt
    assert (same_path("./data/"), same_path("a/./b, ./c,"), same_path(""), same_path(3)) == ("data", "a/b,c", "", 3)
    run = tmp_path / "run"
    run.mkdir()
    config_lib.save_yaml(Settings(data="runs/a"), run / "config.yaml")
    check_resumable(run, Settings(data="./runs//a/"), "demo", (), "--out", {"data": same_path})
    with pytest.raises(OutDirError, match=re.escape("other settings (data)")):
        check_resumable(run, Settings(data="./runs//a/"), "demo", (), "--out")  # compared as typed
    with pytest.raises(OutDirError, match=re.escape("other settings (data)")):
        check_resumable(run, Settings(data="runs/b"), "demo", (), "--out", {"data": same_path})


def test_spellings_of_one_existing_folder_are_one_path_setting(tmp_path, monkeypatch):
    """A symlink, ``a/../b`` and the absolute path of an existing folder name that folder; compared as
    spelt, each was another setting, and the resume was refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    (tmp_path / "elsewhere" / "inner").mkdir(parents=True)
    (tmp_path / "elsewhere" / "data").mkdir()
    (tmp_path / "away").symlink_to(tmp_path / "elsewhere" / "inner")
    spellings = ("data", "./data/", "link", "other/../data", str(tmp_path / "data"), f"{tmp_path}/link/")
    assert len({same_path(spelling) for spelling in spellings}) == 1
    assert same_path("data,other") == same_path(f"link, {tmp_path}/other,") != same_path("other,data")
    assert same_path("other") != same_path("data")
    # away/.. is elsewhere/, not this folder: its data is another folder (normpath would say "data").
    assert same_path("away/../data") == same_path("elsewhere/data") != same_path("data")
    # A part that does not exist (yet) still compares by spelling, and never equals an existing one.
    assert (same_path("./new/"), same_path("data,./new")) == ("new", f"{same_path('data')},new")
    run = tmp_path / "run"
    run.mkdir()
    config_lib.save_yaml(Settings(data="data"), run / "config.yaml")
    check_resumable(run, Settings(data=str(tmp_path / "link")), "demo", (), "--out", {"data": same_path})
    with pytest.raises(OutDirError, match=re.escape("other settings (data)")):
        check_resumable(run, Settings(data="other"), "demo", (), "--out", {"data": same_path})


def test_model_overrides_may_change_their_execution_switches_only():
    from clara.model_config import result_overrides

    @dataclass(frozen=True)
    class WithOverrides:
        data: str = "a"
        overrides: tuple[str, ...] = ()

    saved = WithOverrides(overrides=("mask_padding=false", "attention=eager"))
    faster = WithOverrides(overrides=("selective_recompute=true", "mask_padding=false", "attention=sdpa_cudnn",
                                      "audio.latent_qkv=split"))
    compare = {"overrides": result_overrides}
    assert differing_keys(saved, faster, (), compare) == []  # speed and memory switches, in any order
    assert differing_keys(saved, WithOverrides(overrides=("attention=eager",)), (), compare) == ["overrides"]
    assert differing_keys(saved, WithOverrides(overrides=("mask_padding=true",)), (), compare) == ["overrides"]
    assert differing_keys(saved, faster) == ["overrides"]  # compared as written without the projection
