"""CLARA pretraining end to end: data sources, the CLI, learning, exact resume, TensorBoard, DDP."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from clara.checkpoint import load_checkpoint
from clara.config import ConfigError
from clara.demo_pairs import build_demo
from clara.model import Clara
from clara.pretrain import load_config, main, mixing_warning, run
from tests.clara.pretrain_helpers import interrupt_pretraining_at_step
from clara.pretrain_data import DataConfig, DataError, PairDataset, read_manifest
from clara.run_dir import OutDirError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHORT_RUN = (
    "train.steps=20", "train.batch_size=16", "train.lr=0.002", "train.warmup_steps=4", "train.log_every=5", "train.eval_every=10",
)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """48 training kinds once each, 48 held-out clips, 4 environmental sounds; half-second clips."""
    return build_demo(tmp_path_factory.mktemp("demo") / "pairs", train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.5)


def demo_config(demo, out_dir, *overrides):
    data = [f"data.train={demo.train}", f"data.eval={demo.eval}", f"data.env={demo.env}"]
    return load_config(None, [*data, f"train.out_dir={out_dir}", "train.device=cpu", *overrides])


@pytest.fixture(scope="module")
def short_run(demo, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("short-run")
    return run(demo_config(demo, out_dir, *SHORT_RUN)), out_dir


# -- data -------------------------------------------------------------------------------------


def test_demo_is_deterministic_and_reused(demo, tmp_path):
    again = build_demo(tmp_path / "again", train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.5)
    assert again.train.read_text() == demo.train.read_text()
    assert (again.root / "train" / "00007.wav").read_bytes() == (demo.root / "train" / "00007.wav").read_bytes()
    stamp = (demo.root / "demo.json").stat().st_mtime_ns
    build_demo(demo.root, train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.5)
    assert (demo.root / "demo.json").stat().st_mtime_ns == stamp  # an identical build is not redone
    captions = [record.caption for record in read_manifest(demo.eval)]
    assert len(set(captions)) == len(captions) == 48


def test_a_demo_dir_holding_other_files_is_refused_untouched(demo, tmp_path):
    """A rebuild replaces the folder as a whole: data.demo_dir=~/data used to delete the user's files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"^{mine}: a folder holding other files, not a demo build; give data.demo_dir"):
        build_demo(mine, train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.5)
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(ConfigError, match="file: not a folder, not a demo build"):
        build_demo(tmp_path / "file", train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.5)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (tmp_path / "file").read_text() == "keep me too"
    # An empty folder is built into, and a build with other settings (or a damaged stamp) is redone.
    (tmp_path / "empty").mkdir()
    build_demo(tmp_path / "empty", train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.5)
    (tmp_path / "empty" / "demo.json").write_text("{")
    paths = build_demo(tmp_path / "empty", train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.5)
    assert paths.train.read_text() == demo.train.read_text()


def test_a_demo_rebuild_interrupted_while_dropping_the_old_build_is_redone_next_time(tmp_path, monkeypatch):
    """Ctrl-C while the old build is deleted must not leave a folder without its demo.json, which the
    next build refuses as someone's files: the old build is set aside whole first, then deleted."""
    import shutil

    root = tmp_path / "pairs"
    small = dict(train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.25)
    build_demo(root, **small)
    rmtree, interrupted = shutil.rmtree, []

    def interrupted_rmtree(path, *args, **kwargs):
        if not interrupted and (Path(path) / "demo.json").is_file():
            interrupted.append(path)
            (Path(path) / "demo.json").unlink()  # rmtree got this far
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        build_demo(root, **small, seed=1)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    paths = build_demo(root, **small, seed=1)
    assert json.loads((paths.root / "demo.json").read_text())["seed"] == 1
    assert len(read_manifest(paths.train)) == 48 and (paths.root / "train" / "00047.wav").is_file()


def test_the_demo_is_as_readable_as_a_plain_mkdir_makes_it(tmp_path):
    # A shared MELD_CLARA_CACHE must be readable by the team; tempfile's folders are private (0o700).
    mask = os.umask(0o022)
    try:
        paths = build_demo(tmp_path / "pairs", train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.25)
    finally:
        os.umask(mask)
    assert paths.root.stat().st_mode & 0o777 == 0o755


def test_csv_manifest_and_tar_shards_give_the_same_pairs(demo, tmp_path):
    records = read_manifest(demo.eval)[:3]
    csv_path = tmp_path / "pairs.csv"
    lines = ["audio,caption,language"] + [f"{r.audio},\"{r.caption}\",en" for r in records]
    csv_path.write_text("\n".join(lines) + "\n")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i, record in enumerate(records):
            tar.add(record.audio, arcname=f"sample{i:03d}.wav")
            meta = json.dumps({"text": [record.caption], "original_data": {"language": "en"}}).encode()
            info = tarfile.TarInfo(f"sample{i:03d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    from_csv = PairDataset(str(csv_path))
    from_tar = PairDataset(str(tmp_path / "*.tar"))
    assert len(from_csv) == len(from_tar) == 3
    for i in range(3):
        assert from_csv[i]["caption"] == from_tar[i]["caption"] == records[i].caption
        assert from_tar[i]["language"] == "en"
        assert torch.equal(from_csv[i]["wave"], from_tar[i]["wave"])


def test_manifest_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "a.wav", "caption": "x"}\n{"audio": "b.wav"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a non-empty 'caption'"):
        read_manifest(bad)
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="matches no .tar shards"):
        PairDataset(str(tmp_path / "none-*.tar"))


def test_cli_reports_user_mistakes_in_one_line(tmp_path, capsys):
    assert main([f"data.train={tmp_path / 'absent.jsonl'}", f"train.out_dir={tmp_path}"]) == 2
    assert main(["--config", str(REPO_ROOT / "configs" / "pretrain" / "reference.yaml")]) == 2
    assert main(["augment.mix.lam=[0.9, 0.1]", f"train.out_dir={tmp_path}"]) == 2
    assert main(["data.max_seconds=0", f"train.out_dir={tmp_path}"]) == 2
    assert main(["data.language=xx", f"train.out_dir={tmp_path}"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors)
    assert "absent.jsonl" in errors[0] and "data.train" in errors[1] and "mix.lam" in errors[2]
    assert "data: max_seconds must be a positive number" in errors[3] and "language" in errors[4]


def test_an_out_dir_the_os_refuses_is_one_clear_error(demo, tmp_path, capsys, monkeypatch):
    # Root may write anywhere, so the refusal (no permission, a read-only disk) is staged on mkdir.
    refused = tmp_path / "readonly" / "run"

    def mkdir(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    data = [f"data.train={demo.train}", f"data.eval={demo.eval}", f"data.env={demo.env}"]
    assert main([*data, f"train.out_dir={refused}", "train.device=cpu", *SHORT_RUN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and f"Permission denied: '{refused}'" in err, err


def test_a_run_folder_another_command_runs_in_is_one_clear_error(demo, tmp_path, capsys):
    from clara.run_dir import exclusive_run

    out = tmp_path / "run"
    out.mkdir()
    data = [f"data.train={demo.train}", f"data.eval={demo.eval}", f"data.env={demo.env}"]
    with exclusive_run(out):  # as a first command holds it while it runs
        assert main([*data, f"train.out_dir={out}", "train.device=cpu", *SHORT_RUN]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: another command is running in this folder") and len(err.splitlines()) == 1
    assert not any(out.iterdir())


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_a_device_the_machine_lacks_is_one_clear_error(tmp_path, capsys):
    assert main(["train.device=mps", f"train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.device: 'mps' is not available on this machine; available: cpu")
    assert len(err.splitlines()) == 1 and not (tmp_path / "config.yaml").exists()


def test_a_model_that_cannot_take_the_log_mels_or_token_ids_is_one_error(tmp_path, capsys):
    """80 mel bins and 50,373 token ids: a model built for others used to fail at its first batch."""
    overrides = "model_overrides=[audio.n_mels=64,text.vocab_size=1000]"
    assert main([overrides, "data.train=absent.jsonl", f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: model: audio.n_mels is 64, but pretraining's log-mels have 80 bins; text.vocab_size is 1000, "
                   "below the tokenizer's 50373 ids\n")
    assert not (tmp_path / "run").exists()


def test_reference_recipe_config_loads():
    config = load_config(REPO_ROOT / "configs" / "pretrain" / "reference.yaml", ["data.train=shards/*.tar"])
    assert (config.train.lr, config.train.min_lr, config.train.warmup_steps, config.train.cycle_steps) == (1e-4, 1e-6, 1000, 5000)
    assert (config.train.batch_size, config.train.accumulation, config.train.grad_clip, config.train.seed) == (16, 5, 1.0, 1234)
    assert config.augment.mix.lam == (0.01, 0.8)


def test_mixing_asked_for_without_environmental_sounds_is_warned_about():
    recipe = REPO_ROOT / "configs" / "pretrain" / "reference.yaml"
    unmixed = load_config(recipe, ["data.train=shards/*.tar"])  # the recipe's mix.p 0.3, its data.env ""
    assert mixing_warning(unmixed) == (
        "augment.mix.p is 0.3 but data.env is empty, so no environmental sounds are mixed in; set data.env to a "
        "manifest or shards of them, or augment.mix.p=0 to silence this")
    assert mixing_warning(load_config(recipe, ["data.train=shards/*.tar", "data.env=env/*.tar"])) is None
    assert mixing_warning(load_config(recipe, ["data.train=shards/*.tar", "augment.mix.p=0"])) is None


# -- training ---------------------------------------------------------------------------------


def test_short_pretraining_lowers_the_loss_and_writes_outputs(short_run):
    summary, out_dir = short_run
    assert summary["steps"] == 20
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["train/loss"] for record in history if "train/loss" in record]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model = load_checkpoint(out_dir / "model")
    assert model.encode_text(torch.tensor([[50259, 50372, 257]])).shape == (1, 32)
    assert (out_dir / "config.yaml").is_file() and (out_dir / "checkpoint.pt").is_file()


def test_tensorboard_holds_the_pretraining_tags(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out_dir = short_run
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    train = {"loss", "lr", "audio_scale", "text_scale", "a2t_top1", "t2a_top1", "samples_per_s", "grad_norm"}
    held_out = {f"{d}_R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)}
    assert {f"train/{t}" for t in train} | {f"eval/{t}" for t in held_out} <= tags
    assert [event.step for event in events.Scalars("eval/a2t_R@1")] == [0, 10, 20]


def test_stop_and_resume_match_an_uninterrupted_run(demo, tmp_path):
    # Every augmentation on, so resume must restore the torch RNG, the mixing draws and the data order.
    settings = (
        "train.steps=8", "train.batch_size=8", "train.log_every=1", "train.eval_at_start=false",
        "train.warmup_steps=2", "train.cycle_steps=10", "train.lr=0.002",
        "augment.pitch.p=0.5", "augment.reverb.p=0.5", "augment.clipping.p=0.5", "augment.masking.p=0.5", "augment.mix.p=0.5",
    )  # fmt: skip
    def losses(out_dir):
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        return [record["train/loss"] for record in records if "train/loss" in record]

    run(demo_config(demo, tmp_path / "full", *settings))
    run(demo_config(demo, tmp_path / "split", *settings, "train.steps=3"))  # 6 steps per epoch: mid-epoch
    resumed = run(demo_config(demo, tmp_path / "split", *settings))
    assert resumed["steps"] == 8
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "full"), abs=1e-5)


def test_ddp_two_processes_match_one_process_on_the_global_batch_and_resume(demo, tmp_path):
    """torchrun with 2 gloo processes of 4 pairs gathers negatives: every logged number (loss, both
    temperatures, in-batch top-1, gradient norm) equals one process of 8, also when the torchrun run
    stops after 2 steps and resumes; only the main process prints."""
    # No randomness inside a step (no dropout, token dropout or augmentation), so both runs see the
    # same computation; only the sum order of the gradient all-reduce differs.
    tiny = (REPO_ROOT / "configs" / "model" / "tiny.yaml").read_text()
    model_yaml = tmp_path / "tiny-deterministic.yaml"
    model_yaml.write_text(tiny.replace("token_keep: 0.5", "token_keep: 1.0").replace("dropout: 0.1", "dropout: 0.0"))
    settings = [
        f"model={model_yaml}", f"data.train={demo.train}", f"data.eval={demo.eval}", "train.device=cpu",
        "train.log_every=1", "train.eval_at_start=false", "train.warmup_steps=1", "train.lr=0.002", "train.progress=false",
        *(f"augment.{name}.p=0" for name in ("pitch", "reverb", "clipping", "masking", "mix")),
    ]  # fmt: skip
    single = tmp_path / "single"
    run(load_config(None, [*settings, "train.steps=4", "train.batch_size=8", f"train.out_dir={single}"]))
    double = tmp_path / "double"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    outputs = []
    for steps in (2, 4):  # the second run resumes from the first one's checkpoint
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                   "clara.pretrain", *settings, f"train.steps={steps}", "train.batch_size=4", f"train.out_dir={double}"]  # fmt: skip
        finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert finished.returncode == 0, finished.stderr[-3000:]
        outputs.append(finished.stdout)

    def logs(out_dir):
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        keys = ("loss", "audio_scale", "text_scale", "a2t_top1", "t2a_top1", "grad_norm", "lr")
        return [{key: record[f"train/{key}"] for key in keys} for record in records if "train/loss" in record]

    assert len(logs(double)) == 4
    for got, expected in zip(logs(double), logs(single)):
        assert got == pytest.approx(expected, abs=2e-4)
    assert "resumed from" in outputs[1]
    for output, steps in zip(outputs, (2, 4)):  # each line once: the other process prints nothing
        assert output.count(f"training {steps} steps") == output.count(f"pretrained {steps} steps") == 1, output
    state = torch.load(double / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and len(state["rng"]) == 2  # one RNG state per process
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # seeded apart: augmentations differ


@pytest.mark.slow
def test_demo_pretraining_lifts_held_out_retrieval_above_chance(tmp_path, monkeypatch):
    """The no-argument demo: the full synthetic set, the demo config, a few minutes on a CPU."""
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "cache"))
    summary = run(load_config(None, [f"train.out_dir={tmp_path / 'run'}", "train.device=cpu"]))
    first, last, chance = summary["eval_first"], summary["eval_last"], summary["chance"]
    for direction in ("a2t", "t2a"):
        assert first[f"eval/{direction}_R@1"] <= 2 * chance[f"{direction}_R@1"]
        assert last[f"eval/{direction}_R@1"] >= 3 * chance[f"{direction}_R@1"]
        assert last[f"eval/{direction}_R@5"] >= 3 * chance[f"{direction}_R@5"]


@pytest.mark.gpu
def test_gpu_pretraining_steps_with_every_augmentation(tmp_path):
    """Batched augmentations, log-mel and both towers on the GPU under bf16 autocast (synthetic data,
    so no audio decoder or tokenizer files are needed)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from clara.augment import AugmentConfig
    from clara.config import from_dict
    from clara.engine import TrainConfig, Trainer
    from clara.model import Clara
    from clara.model_config import load_model_config
    from clara.pretrain import ContrastiveTask

    generator = torch.Generator().manual_seed(0)
    items = [
        {"wave": torch.randn(int(torch.randint(24000, 48000, (1,), generator=generator)), generator=generator) * 0.1,
         "tokens": torch.randint(0, 50000, (int(torch.randint(4, 12, (1,), generator=generator)),), generator=generator)}
        for _ in range(32)
    ]  # fmt: skip

    def collate(batch):
        waves = torch.nn.utils.rnn.pad_sequence([item["wave"] for item in batch], batch_first=True)
        tokens = torch.nn.utils.rnn.pad_sequence([item["tokens"] for item in batch], batch_first=True)
        return {
            "wave": waves, "wave_lengths": torch.tensor([item["wave"].numel() for item in batch]),
            "tokens": tokens, "token_lengths": torch.tensor([item["tokens"].numel() for item in batch]),
        }  # fmt: skip

    augment = from_dict(AugmentConfig, {name: {"p": 0.5} for name in ("pitch", "reverb", "clipping", "masking")})
    config = TrainConfig(steps=6, batch_size=8, warmup_steps=1, lr=1e-3, log_every=1, eval_at_start=False, out_dir=str(tmp_path))
    task = ContrastiveTask(augment, torch.device("cuda"), gather=True)
    trainer = Trainer(config, Clara(load_model_config("tiny")), task, items, collate_fn=collate)
    result = trainer.fit()
    assert trainer.precision == "bf16" and trainer.device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(record["train/loss"])) for record in result.history)


# -- the output folder ------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli_args(demo, out_dir, *overrides):
    return [f"data.train={demo.train}", f"data.eval={demo.eval}", f"data.env={demo.env}", f"train.out_dir={out_dir}",
            "train.device=cpu", *SHORT_RUN, *overrides]


def test_an_out_dir_that_cannot_take_the_run_is_refused_untouched(demo, short_run, tmp_path, capsys):
    _, out_dir = short_run
    before = _snapshot(out_dir)
    user = tmp_path / "userdir"
    (user / "model").mkdir(parents=True)
    (user / "model" / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [(out_dir, ["model=small"], f"{out_dir} holds a run with other settings (model); use a new train.out_dir"),
             (out_dir, ["train.lr=0.5", "augment.pitch.p=0.5"], "other settings (augment.pitch.p, train.lr)"),
             (user, [], f"{user} exists and is not a clara.pretrain run; give an empty or new folder"),
             (afile, [], f"{afile}: exists and is not a folder"),
             (afile / "sub", [], f"{afile}: exists and is not a folder")]
    for folder, overrides, message in cases:
        assert main(_cli_args(demo, folder, *overrides)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert _snapshot(out_dir) == before and (user / "model" / "notes.txt").read_text() == "mine"
    # A fine-tune run's folder through the API too (its config.yaml is not a pretraining config).
    other = tmp_path / "finetune-run"
    other.mkdir()
    (other / "config.yaml").write_text("data_root: meld\ntarget: emotion\n")
    with pytest.raises(OutDirError, match="is not a clara.pretrain run"):
        run(demo_config(demo, other, *SHORT_RUN))
    assert _snapshot(other) == {"config.yaml": b"data_root: meld\ntarget: emotion\n"}


def test_ctrl_c_is_one_line_and_keeps_the_last_step(demo, tmp_path, capsys, monkeypatch):
    interrupt_pretraining_at_step(monkeypatch, 3)
    out_dir = tmp_path / "run"
    assert main(_cli_args(demo, out_dir, "train.eval_at_start=false", "train.progress=false")) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted: run the same command (train.out_dir={out_dir}) to resume\n"
    assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["step"] == 2


# -- model_overrides and init_allow_pickle ------------------------------------------------------


def test_model_overrides_reach_the_model_from_scratch_and_from_init(demo, short_run, tmp_path):
    switches = ("model_overrides=[attention=eager, activation_checkpointing=true, mask_padding=false]",)
    scratch = tmp_path / "scratch"
    run(demo_config(demo, scratch, "train.steps=2", "train.warmup_steps=1", "train.eval_every=0", "train.eval_at_start=false", *switches))
    _, init_from = short_run
    resumed = tmp_path / "from-init"
    run(demo_config(demo, resumed, f"init={init_from / 'model'}", "train.steps=2", "train.warmup_steps=1", "train.eval_every=0",
                    "train.eval_at_start=false", *switches))
    for out_dir in (scratch, resumed):  # the trained model's own config, saved with it
        config = load_checkpoint(out_dir / "model").config
        assert (config.attention, config.activation_checkpointing, config.mask_padding) == ("eager", True, False)
    assert load_checkpoint(init_from / "model").config.attention == "sdpa"  # the overrides are not the default


def test_model_overrides_that_change_shapes_or_do_not_parse_are_one_clear_error(demo, short_run, tmp_path, capsys):
    _, init_from = short_run
    assert main(_cli_args(demo, tmp_path / "a", f"init={init_from / 'model'}", "model_overrides=[audio.layers=1]")) == 2
    assert main(_cli_args(demo, tmp_path / "b", "model_overrides=[attention]")) == 2
    assert main(_cli_args(demo, tmp_path / "c", "model_overrides=[attention=fast]")) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "does not fit the model" in errors[0] and "unexpected" in errors[0]
    assert "with model_overrides ['audio.layers=1']" in errors[0]
    assert "model_overrides: override 'attention': expected key=value" in errors[1]
    assert "attention: 'fast' is not one of" in errors[2] and "model_overrides" in errors[2]


def test_init_allow_pickle_loads_a_trusted_reference_checkpoint(tmp_path):
    from clara.pretrain import build_model
    from tests.clara.test_checkpoint import Evil
    from tests.clara.test_model import write_reference_checkpoint

    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    payload["callbacks"] = Evil()
    torch.save(payload, path)
    config = load_config(None, [f"init={path}", "data.train=x.jsonl"])
    with pytest.raises(Exception, match="clara.pretrain: init_allow_pickle=true"):
        build_model(config)
    model = build_model(load_config(None, [f"init={path}", "data.train=x.jsonl", "init_allow_pickle=true"]))
    assert model.config.text.layers == 2 and model.training


def test_padding_multiples_reach_the_training_and_evaluation_batches(demo, tmp_path, monkeypatch):
    """data.frames_multiple / data.tokens_multiple pad what the training steps and the held-out
    evaluation see: mel frame counts (1 + samples // 512) and token widths are multiples, so compiled
    graphs meet a few shapes."""
    from clara import pretrain
    from clara.audio_frontend import num_frames

    seen, evaluated = [], []
    step, encode_audio, encode_text = pretrain.ContrastiveTask.training_step, Clara.encode_audio, Clara.encode_text

    def spy(self, model, batch):
        seen.append((num_frames(batch["wave"].shape[1]), batch["tokens"].shape[1]))
        return step(self, model, batch)

    def spy_audio(self, mel, *args, **kwargs):
        evaluated.append(("audio", mel.shape[-1]))
        return encode_audio(self, mel, *args, **kwargs)

    def spy_text(self, tokens, *args, **kwargs):
        evaluated.append(("text", tokens.shape[1]))
        return encode_text(self, tokens, *args, **kwargs)

    monkeypatch.setattr(pretrain.ContrastiveTask, "training_step", spy)
    monkeypatch.setattr(Clara, "encode_audio", spy_audio)
    monkeypatch.setattr(Clara, "encode_text", spy_text)
    run(demo_config(demo, tmp_path / "padded", "data.frames_multiple=64", "data.tokens_multiple=8", "train.steps=2",
                    "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0", "train.eval_at_start=true"))
    assert len(seen) == 2 and all(frames % 64 == 0 and width % 8 == 0 for frames, width in seen), seen
    assert {kind for kind, _ in evaluated} == {"audio", "text"}
    assert all(size % (64 if kind == "audio" else 8) == 0 for kind, size in evaluated), evaluated


def test_a_clip_too_long_for_the_audio_positions_is_refused_before_training(tmp_path, capsys):
    """ceil(frames / 2) positions after the stride-2 convolution: tiny's 2,048 hold 4,096 frames, about
    43.7 s. 43.6 s (4,088 frames) fits unpadded but not padded to 48 (4,128); 44 s fits neither."""
    from clara.pretrain import check_clip_fits

    check_clip_fits(DataConfig(max_seconds=43.6), 2048)
    check_clip_fits(DataConfig(max_seconds=10.0, frames_multiple=64), 4096)
    with pytest.raises(ConfigError, match=r"data.max_seconds \(43.6\) with data.frames_multiple \(48\) makes clips of up to 4128"):
        check_clip_fits(DataConfig(max_seconds=43.6, frames_multiple=48), 2048)
    assert main(["data.max_seconds=44", f"train.out_dir={tmp_path / 'long'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2048-position audio table holds (4096 frames)" in err, err


def test_held_out_captions_are_encoded_in_their_rows_language(demo, tmp_path):
    """Training encodes each caption in its row's language (``<|de|><|speech|> ...``). Held-out
    retrieval used to encode every caption in data.language, so a German row was scored against an
    ``<|en|>`` text the model never trained on, and one caption listed in two languages was one text."""
    from clara.augment import AugmentConfig
    from clara.pretrain import ContrastiveTask
    from clara.tokenizer import Tokenizer

    clips = sorted((demo.root / "eval").glob("*.wav"))[:4]
    manifest = tmp_path / "held-out.jsonl"
    rows = [("ein Ton", "de"), ("a tone", None), ("a tone", "fr"), ("ein Ton", "de")]
    manifest.write_text("".join(json.dumps({"audio": str(clip), "caption": caption, "language": language}) + "\n"
                                for clip, (caption, language) in zip(clips, rows)))  # fmt: skip
    tokenizer = Tokenizer(language="en")
    task = ContrastiveTask(AugmentConfig(), torch.device("cpu"), gather=False, eval_data=PairDataset(str(manifest)),
                           tokenizer=tokenizer)  # fmt: skip
    encoded = []

    class Recorder(torch.nn.Module):
        """Audio i and the text whose ids start with the language id ``50259 + i`` share an embedding."""

        def encode_audio(self, mel, lengths):
            return torch.eye(8)[[3, 0, 7, 3]]  # <|de|> 50262, <|en|> 50259, <|fr|> 50266, <|de|>

        def encode_text(self, tokens, lengths):
            encoded.extend(row[:length].tolist() for row, length in zip(tokens, lengths))
            return torch.eye(8)[tokens[:, 0] - 50259]

    metrics = task.evaluate(Recorder())
    # Three texts, sorted by (caption, language): ("a tone", "en"), ("a tone", "fr"), ("ein Ton", "de").
    assert encoded == [tokenizer.encode("a tone", "en"), tokenizer.encode("a tone", "fr"), tokenizer.encode("ein Ton", "de")]
    assert [ids[0] for ids in encoded] == [50259, 50266, 50262]
    assert task.text_of_audio.tolist() == [2, 0, 1, 2]
    assert metrics["a2t_R@1"] == metrics["t2a_R@1"] == 1.0
    assert task.chance["a2t_R@1"] == pytest.approx(1 / 3)


def test_a_caption_is_one_held_out_text_however_its_language_is_spelled(demo, tmp_path):
    """Held-out texts are grouped by (caption, language): "de", "DE" and "German" encode alike, so they
    must be one text, or retrieval scores a clip against duplicates of its own caption."""
    from clara.augment import AugmentConfig
    from clara.pretrain import ContrastiveTask
    from clara.tokenizer import Tokenizer

    clips = sorted((demo.root / "eval").glob("*.wav"))[:4]
    manifest = tmp_path / "held-out.jsonl"
    rows = [("ein Ton", "de"), ("ein Ton", "German"), ("ein Ton", "DE"), ("a tone", None)]
    manifest.write_text("".join(json.dumps({"audio": str(clip), "caption": caption, "language": language}) + "\n"
                                for clip, (caption, language) in zip(clips, rows)))  # fmt: skip
    task = ContrastiveTask(AugmentConfig(), torch.device("cpu"), gather=False,
                           eval_data=PairDataset(str(manifest), language="English"), tokenizer=Tokenizer())  # fmt: skip
    assert task.eval_texts == [("a tone", "en"), ("ein Ton", "de")]
    assert task.text_of_audio.tolist() == [1, 1, 1, 0]
    assert task.chance["a2t_R@1"] == pytest.approx(1 / 2)
