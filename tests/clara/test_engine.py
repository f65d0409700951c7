"""The training engine on a toy regression task: learning, exact resume, sampler, logging."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from clara import distributed
from clara.checkpoint import CheckpointError
from clara.config import ConfigError
from clara.pretrain_data import DataError
from clara.engine import (
    CHECKPOINT_FILE, METRICS_FILE, ResumableBatchSampler, TrainConfig, Trainer, check_device, move_to,
)

WEIGHTS = torch.tensor([1.5, -2.0, 0.5, 3.0])


@pytest.fixture(autouse=True)
def event_files_in_creation_order(monkeypatch):
    """TensorBoard reads a folder's event files in name order: "events.out.tfevents.<second>.<host>.
    <pid>.<counter>".  A run and its resume in one process within one second (only in tests) can then
    sort counter 10 before 9 and drop the first file's points as a restart's; zero-padded counters
    keep creation order."""
    from itertools import count

    from tensorboard.summary.writer import event_file_writer

    numbers = count()
    monkeypatch.setattr(event_file_writer, "_global_uid", type("Uid", (), {"get": lambda self: f"{next(numbers):06d}"})())


class ToyData(Dataset):
    """y = x · w plus per-(epoch, index) noise, like a dataset with its own augmentation."""

    def __init__(self, size: int = 48):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=generator)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int):
        noise = float(np.random.default_rng([self.epoch, index]).normal(0, 0.01))
        return {"x": self.x[index], "y": self.x[index] @ WEIGHTS + noise}


class ToyTask:
    """MSE with input jitter drawn from the global torch RNG (so resume must restore it)."""

    def __init__(self, interrupt_at_call: int | None = None):
        self.calls = 0
        self.interrupt_at_call = interrupt_at_call

    def training_step(self, model, batch):
        self.calls += 1
        if self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt
        x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
        loss = nn.functional.mse_loss(model(x).squeeze(-1), batch["y"])
        return loss, {"jitter": x.std()}

    def evaluate(self, model):
        x = torch.linspace(-1, 1, 16, device=next(model.parameters()).device)[:, None].repeat(1, 4)
        return {"mse": float(nn.functional.mse_loss(model(x).squeeze(-1).float(), x @ WEIGHTS.to(x.device)))}


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1), nn.Linear(16, 1))


def fit(out_dir, task=None, groups=None, **overrides):
    settings = dict(
        steps=10, batch_size=4, accumulation=2, lr=5e-2, min_lr=1e-3, warmup_steps=2, cycle_steps=12,
        log_every=1, eval_every=5, seed=7, out_dir=str(out_dir), device="cpu",
    )
    settings.update(overrides)
    model = toy_model()
    groups = groups(model) if groups is not None else None
    trainer = Trainer(TrainConfig(**settings), model, task or ToyTask(), ToyData(), groups=groups)
    return trainer.fit(), trainer


def losses(result) -> dict[int, float]:
    return {record["step"]: record["train/loss"] for record in result.history}


def test_training_reduces_the_loss(tmp_path):
    result, trainer = fit(tmp_path, steps=30, log_every=5)
    assert trainer.steps_per_epoch == 6  # 48 samples / (4 x 2)
    assert result.step == 30 and result.epoch == 5
    history = [record["train/loss"] for record in result.history]
    assert history[-1] < 0.5 * history[0]
    assert result.evaluations[-1]["eval/mse"] < result.evaluations[0]["eval/mse"]
    assert {"train/lr", "train/grad_norm", "train/samples_per_s", "train/jitter"} <= set(result.history[0])


def test_a_model_handed_over_in_eval_mode_trains_in_training_mode(tmp_path):
    # As a loaded checkpoint arrives: dropout must be on from the first step, not from the first evaluation.
    class ModeTask(ToyTask):
        def __init__(self):
            super().__init__()
            self.modes = []

        def training_step(self, model, batch):
            self.modes.append(all(module.training for module in model.modules()))
            return super().training_step(model, batch)

    task = ModeTask()
    settings = dict(steps=4, batch_size=4, accumulation=1, lr=1e-2, min_lr=1e-3, warmup_steps=1, cycle_steps=4,
                    eval_every=0, eval_at_start=False, seed=7, out_dir=str(tmp_path), device="cpu", progress=False)
    Trainer(TrainConfig(**settings), toy_model().eval(), task, ToyData()).fit()
    assert task.modes == [True] * 4


def test_stop_and_resume_gives_the_same_losses(tmp_path):
    full, full_trainer = fit(tmp_path / "full")
    first, _ = fit(tmp_path / "split", steps=4)  # stops mid-epoch (6 steps per epoch)
    second, second_trainer = fit(tmp_path / "split")  # resumes automatically from step 4
    assert second.resumed_from == 4
    assert losses(first) == pytest.approx({s: v for s, v in losses(full).items() if s <= 4}, abs=1e-7)
    assert losses(second) == pytest.approx({s: v for s, v in losses(full).items() if s > 4}, abs=1e-7)
    for a, b in zip(full_trainer.model.parameters(), second_trainer.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    # metrics.jsonl holds one train record per step, first run and resumed run together.
    records = [json.loads(line) for line in (tmp_path / "split" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 11))


def test_interrupt_saves_the_last_step_and_resume_is_exact(tmp_path):
    full, _ = fit(tmp_path / "full", num_workers=1)
    # Interrupted in the second micro-batch of step 8 (after the epoch boundary at 6).
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", task=ToyTask(interrupt_at_call=16), num_workers=1)
    state = torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (7, 1, 1)
    resumed, _ = fit(tmp_path / "cut", num_workers=1)
    assert losses(resumed) == pytest.approx({s: v for s, v in losses(full).items() if s > 7}, abs=1e-7)


def test_resume_flags(tmp_path):
    with pytest.raises(CheckpointError, match="resume=true"):
        fit(tmp_path, resume=True)
    fit(tmp_path, steps=2)
    fresh, _ = fit(tmp_path, steps=3, resume=False)
    assert fresh.resumed_from is None and [r["step"] for r in fresh.history] == [1, 2, 3]


def test_a_run_killed_after_resume_false_never_resumes_the_old_runs_checkpoint(tmp_path):
    """train.resume=false drops the old run's logs; its checkpoint stayed until the new run's first save,
    so a rerun after a kill before it resumed the old run's weights (at its step 10) under the new
    run's first records."""
    settings = dict(steps=6, lr=1e-2, log_every=2, print_logs=False)
    fit_counted(tmp_path / "full", CountingTask(), **settings)
    fit_counted(tmp_path / "cut", CountingTask())  # another run, finished: checkpoint at step 10
    with pytest.raises(Killed):  # in step 4, before any checkpoint of the new run
        fit_counted(tmp_path / "cut", StoppedTask(7, Killed), resume=False, **settings)
    rerun = fit_counted(tmp_path / "cut", CountingTask(), **settings)
    assert rerun.resumed_from is None
    assert logged(tmp_path / "cut") == logged(tmp_path / "full")


def test_checkpoint_holds_the_training_state(tmp_path):
    fit(tmp_path, steps=3, checkpoint_every=2)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 3
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(state)
    assert {"python", "numpy", "torch"} <= set(state["rng"][0])
    assert not list(tmp_path.glob(".*.tmp"))  # no staging files left behind


def test_a_resume_deletes_what_a_run_killed_while_saving_left(tmp_path):
    """A kill during torch.save leaves the checkpoint's staging file; only a command line's own folder
    was cleared (run_dir.claim), not a fine-tune's seed-N folders or a folder a sweep hands over."""
    fit(tmp_path, steps=2)
    (tmp_path / ".checkpoint.pt.k2x_9abc.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".notes.tmp").write_text("mine")
    resumed, _ = fit(tmp_path, steps=4)
    assert resumed.resumed_from == 2
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".notes.tmp"]


def test_tensorboard_events_hold_the_logged_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path, steps=4, log_every=2)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/jitter", "eval/mse"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4]
    assert [event.step for event in events.Scalars("eval/mse")] == [0, 4]


@pytest.mark.parametrize("print_logs", [True, False])
def test_print_logs_only_silences_the_record_lines(tmp_path, capsys, print_logs):
    result, _ = fit(tmp_path, steps=4, log_every=2, print_logs=print_logs)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    expected = ["[eval step 0/4]", "[train step 2/4]", "[train step 4/4]", "[eval step 4/4]"] if print_logs else []
    assert [line.split("]")[0] + "]" for line in printed] == expected
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 2, 4, 4]  # the log files get every record either way
    assert len(result.history) == 2 and len(result.evaluations) == 2


def test_eval_every_epoch_evaluates_at_each_epoch_end_once(tmp_path):
    # 6 steps per epoch, 20 steps: epoch ends at 6, 12, 18; eval_every 6 lands on the same steps.
    result, _ = fit(tmp_path / "epochs", steps=20, eval_every_epoch=True, eval_every=0, eval_at_start=False)
    assert [record["step"] for record in result.evaluations] == [6, 12, 18, 20]  # 20: the end of training
    both, _ = fit(tmp_path / "both", steps=20, eval_every_epoch=True, eval_every=6, eval_at_start=False)
    assert [record["step"] for record in both.evaluations] == [6, 12, 18, 20]
    first, _ = fit(tmp_path / "resumed", steps=8, eval_every_epoch=True, eval_every=0, eval_at_start=False)
    second, _ = fit(tmp_path / "resumed", steps=20, eval_every_epoch=True, eval_every=0, eval_at_start=False)
    assert [r["step"] for r in first.evaluations + second.evaluations] == [6, 8, 12, 18, 20]


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_resume(tmp_path):
    """metrics.jsonl is appended to, so a run killed mid-write leaves a partial last line; resume used
    to stop on it with a JSONDecodeError traceback."""
    fit(tmp_path, steps=4)
    metrics = tmp_path / METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"step": 5, "train/lo')
    second, _ = fit(tmp_path, steps=6)
    assert second.resumed_from == 4
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # the partial line is gone
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


class BrokenData(ToyData):
    def __getitem__(self, index: int):
        if index == 5:
            raise DataError("pairs.jsonl:6: clip.wav: cannot decode audio\n(second line)")
        return super().__getitem__(index)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_data_error_in_a_loader_worker_keeps_its_own_message(tmp_path, num_workers):
    """A worker's exception reaches the main process with the worker's traceback as its message,
    which a driver would print as its one-line error."""
    config = TrainConfig(steps=2, batch_size=48, warmup_steps=0, cycle_steps=0, out_dir=str(tmp_path), device="cpu",
                         num_workers=num_workers, eval_at_start=False)  # fmt: skip
    trainer = Trainer(config, toy_model(), ToyTask(), BrokenData())
    with pytest.raises(DataError) as err:
        trainer.fit()
    assert str(err.value) == "pairs.jsonl:6: clip.wav: cannot decode audio\n(second line)"


def test_a_task_without_held_out_metrics_logs_no_empty_evaluations(tmp_path, capsys):
    class NoEval(ToyTask):
        def evaluate(self, model):
            return {}

    result, _ = fit(tmp_path, task=NoEval(), steps=2, warmup_steps=0)
    assert result.evaluations == [] and "[eval" not in capsys.readouterr().out
    assert all("train/loss" in json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines())


def test_parameter_groups_train_at_their_lr_scale(tmp_path):
    def groups(model):  # the first layer frozen by a zero rate (AdamW's decay is scaled by the rate too)
        return [{"params": list(model[2].parameters()), "weight_decay": 0.01},
                {"params": list(model[0].parameters()), "weight_decay": 0.01, "lr_scale": 0.0}]

    result, trainer = fit(tmp_path, groups=groups)
    start = toy_model()
    torch.testing.assert_close(trainer.model[0].weight, start[0].weight, rtol=0, atol=0)
    assert not torch.equal(trainer.model[2].weight, start[2].weight)
    assert [g["lr"] for g in trainer.optimizer.param_groups][1] == 0.0
    assert result.history[2]["train/lr"] == pytest.approx(5e-2)  # the first group's rate, after the warmup


def test_bad_settings_are_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="batch_size must be at least 1.*accumulation must be at least 1"):
        fit(tmp_path, batch_size=0, accumulation=0)
    with pytest.raises(ConfigError, match="warmup_steps .20. must be below cycle_steps .12."):
        fit(tmp_path, warmup_steps=20)
    with pytest.raises(ConfigError, match="no full step"):
        fit(tmp_path, batch_size=64)


@pytest.mark.parametrize("field, value, expected", [
    ("batch_size", 0, "batch_size must be at least 1, got 0"),
    ("accumulation", 0, "accumulation must be at least 1, got 0"),
    ("lr", -1.0, "lr must be a positive number, got -1.0"),
    ("lr", 0.0, "lr must be a positive number, got 0.0"),
    ("lr", float("nan"), "lr must be a positive number, got nan"),
    ("lr", float("inf"), "lr must be a positive number, got inf"),
    ("min_lr", -1.0, "min_lr must be a number >= 0, got -1.0"),
    ("seed", -1, "seed must be >= 0, got -1"),
    ("weight_decay", -1.0, "weight_decay must be a number >= 0, got -1.0"),
    ("grad_clip", float("nan"), "grad_clip must be a number >= 0, got nan"),
    ("device", "foo", "device must be auto, cpu, cuda, cuda:N or mps, got 'foo'"),
    ("device", "cuda:x", "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
])  # fmt: skip
def test_train_config_refuses_what_torch_would_fail_on_later(field, value, expected):
    # At construction, so a driver that loads its config stops before using any of it.
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value})
    assert str(err.value) == f"train: {expected}"


def test_a_device_this_machine_lacks_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    expected = "train.device: {!r} is not available on this machine; available: {} (or auto)"
    for device in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ConfigError) as err:
            fit(tmp_path, device=device)
        assert str(err.value) == expected.format(device, "cpu")
    # A driver's own process group and device (distributed.init does not check) is checked too.
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("mps"))
    with pytest.raises(ConfigError, match="'mps' is not available"):
        Trainer(TrainConfig(device="mps", out_dir=str(tmp_path)), toy_model(), ToyTask(), ToyData(), env=env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as err:
        check_device("cuda:1")
    assert str(err.value) == expected.format("cuda:1", "cpu, cuda:0")
    check_device("cuda:0")
    check_device("auto")
    # Another driver's flag is named as that driver spells it, and a misspelt device is refused too.
    with pytest.raises(ConfigError) as err:
        check_device("gpu", field="--device")
    assert str(err.value) == "--device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"


@pytest.mark.parametrize("content, reason", [
    (b"garbage\n", r"unpickling failed: Unsupported operand 103"),
    (b"", r"\(the file is empty or cut short\)"),
])  # fmt: skip
def test_a_damaged_checkpoint_is_named_without_unsafe_advice(tmp_path, content, reason):
    fit(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        fit(tmp_path, steps=4)
    message = str(err.value)
    assert message.startswith(f"{path}: not a readable training checkpoint (") and "\n" not in message
    assert re.search(reason, message) and message.endswith("delete it or set train.resume=false to start over")
    assert "weights_only" not in message


def test_a_checkpoint_cut_short_is_named_as_such(tmp_path):
    """torch's zip reader says only "[Errno 22] Invalid argument" for a file cut short past its header."""
    fit(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        fit(tmp_path, steps=4)
    assert str(err.value) == (f"{path}: not a readable training checkpoint (its zip archive is cut short or damaged); "
                              "delete it or set train.resume=false to start over")


def test_a_checkpoint_of_another_model_is_one_error_listing_what_differs(tmp_path):
    """torch's load_state_dict raised a multi-line RuntimeError naming neither the file nor what to do."""
    fit(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_FILE
    settings = dict(steps=4, batch_size=4, accumulation=2, lr=5e-2, min_lr=1e-3, warmup_steps=2, cycle_steps=12,
                    seed=7, out_dir=str(tmp_path), device="cpu", progress=False)
    narrower = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1))
    with pytest.raises(CheckpointError) as err:
        Trainer(TrainConfig(**settings), narrower, ToyTask(), ToyData()).fit()
    assert str(err.value) == (
        f"{path}: written for another model: mis-shaped tensor(s): 0.bias (checkpoint (16,), model (8,)); "
        "0.weight (checkpoint (16, 4), model (8, 4)); 2.weight (checkpoint (1, 16), model (1, 8)); "
        "delete it or set train.resume=false to start over"
    )
    # The same model trained in other parameter groups (one instead of decay + no-decay).
    model = toy_model()
    with pytest.raises(CheckpointError) as err:
        Trainer(TrainConfig(**settings), model, ToyTask(), ToyData(), groups=[{"params": list(model.parameters())}]).fit()
    assert str(err.value) == (
        f"{path}: its optimizer state does not fit this run (ValueError: loaded state dict has a different number "
        "of parameter groups); delete it or set train.resume=false to start over"
    )


def test_a_garbled_state_that_still_unpickles_is_one_error_naming_the_entry(tmp_path):
    """A damaged file can unpickle into a wrong-size RNG state: numpy's ValueError came with a traceback."""
    fit(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    version, internal, gauss = state["rng"][0]["python"]
    state["rng"][0]["python"] = (version, internal[:100], gauss)  # 100 of the Mersenne Twister's 625 words
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        fit(tmp_path, steps=4)
    assert str(err.value) == (f"{path}: its RNG and log state does not fit this run (ValueError: state vector is the "
                              "wrong size); delete it or set train.resume=false to start over")


def test_a_checkpoint_holding_code_or_no_dict_is_refused(tmp_path):
    fit(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_FILE
    torch.save(ToyTask(), path)  # an object the weights-only unpickler refuses to build
    with pytest.raises(CheckpointError) as err:
        fit(tmp_path, steps=4)
    assert "not a readable training checkpoint (unpickling failed: Unsupported global: GLOBAL " in str(err.value)
    assert "weights_only" not in str(err.value) and "safe_globals" not in str(err.value)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not a meld-clara training checkpoint"):
        fit(tmp_path, steps=4)


def test_sampler_shards_are_disjoint_and_resumable():
    ranks = [ResumableBatchSampler(50, 4, rank=r, world_size=2, seed=1) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    batches = [list(sampler) for sampler in ranks]
    assert len(batches[0]) == len(batches[1]) == 6  # 50 // 8 global batches
    seen = [i for rank in batches for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 48
    ranks[0].set_epoch(3, skip=4)
    assert list(ranks[0]) == batches[0][4:]
    ranks[0].set_epoch(4)
    assert list(ranks[0]) != batches[0]
    assert ResumableBatchSampler(50, 4, multiple_of=4).batches_per_epoch == 12


def test_sampler_without_lengths_keeps_its_batches():
    """The plain shuffle is the permutation cut into global batches (runs and resumes made before
    bucketing existed draw the same batches)."""
    sampler = ResumableBatchSampler(50, 4, rank=1, world_size=2, seed=1)
    sampler.set_epoch(3)
    seed = int(np.random.SeedSequence([1, 3]).generate_state(1)[0])
    order = torch.randperm(50, generator=torch.Generator().manual_seed(seed)).tolist()
    assert list(sampler) == [order[i * 8 + 4 : i * 8 + 8] for i in range(6)]


def test_length_bucketed_sampler_pads_less_and_stays_resumable():
    lengths = torch.randint(10, 1000, (403,), generator=torch.Generator().manual_seed(0)).tolist()

    def padded(batches):  # frames a batch padded to its longest costs
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = ResumableBatchSampler(403, 8, seed=2)
    ranks = [ResumableBatchSampler(403, 4, rank=r, world_size=2, seed=2, lengths=lengths, pool_batches=10) for r in range(2)]
    for sampler in (plain, *ranks):
        sampler.set_epoch(1)
    bucketed = [list(sampler) for sampler in ranks]
    assert len(bucketed[0]) == len(bucketed[1]) == 50  # 403 // 8 global batches, the rest dropped
    seen = [i for rank in bucketed for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 400
    global_batches = [a + b for a, b in zip(*bucketed)]
    real = sum(lengths[i] for i in seen)
    assert padded(global_batches) < 1.1 * real and padded(list(plain)) > 1.5 * real
    # Sorted within pools, then shuffled: not one long ascending run.
    longest = [max(lengths[i] for i in batch) for batch in global_batches]
    assert longest != sorted(longest)
    ranks[1].set_epoch(1, skip=7)
    assert list(ranks[1]) == bucketed[1][7:]
    ranks[1].set_epoch(2)
    assert list(ranks[1]) != bucketed[1]
    with pytest.raises(ValueError, match="3 lengths for 4 samples"):
        ResumableBatchSampler(4, 2, lengths=[1, 2, 3])


def test_length_bucketed_sampler_drops_random_samples_not_the_longest():
    """The samples an epoch leaves out (437 = 54 global batches of 8, and 5) are the shuffled order's
    last 5, as without lengths, whatever their length.  Cut after sorting, they were the longest 5 of
    the last pool (37 samples), so the longest tenth of the samples took ~90% of the drops."""
    lengths = torch.randperm(437, generator=torch.Generator().manual_seed(0)).tolist()  # length = rank
    dropped = []
    for epoch in range(200):
        ranks = [ResumableBatchSampler(437, 4, rank=r, world_size=2, seed=2, lengths=lengths, pool_batches=10)
                 for r in range(2)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        left_out = set(range(437)) - {i for sampler in ranks for batch in sampler for i in batch}
        seed = int(np.random.SeedSequence([2, epoch]).generate_state(1)[0])
        order = torch.randperm(437, generator=torch.Generator().manual_seed(seed)).tolist()
        assert left_out == set(order[432:])
        dropped += [lengths[i] for i in left_out]
    # A uniform draw of 1000 ranks out of 0..436: mean 218, standard error ~4 (before: ~400).
    assert abs(np.mean(dropped) - 218) < 25


def test_move_to_walks_containers():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), "text"], "c": (torch.ones(1),)}
    moved = move_to(batch, torch.device("cpu"))
    assert moved["b"][1] == "text" and isinstance(moved["c"], tuple)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_mixed_precision_and_exact_resume(tmp_path, precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

    class DtypeTask(ToyTask):
        def training_step(self, model, batch):
            loss, logs = super().training_step(model, batch)
            self.dtype = model[0](batch["x"]).dtype  # under the engine's autocast
            return loss, logs

    settings = dict(device="cuda", precision=precision)
    task = DtypeTask()
    full, trainer = fit(tmp_path / "full", task=task, **settings)
    assert trainer.precision == precision and (trainer.scaler is not None) == (precision == "fp16")
    assert task.dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    assert trainer.optimizer.defaults["fused"]
    fit(tmp_path / "split", task=DtypeTask(), steps=4, **settings)
    resumed, _ = fit(tmp_path / "split", task=DtypeTask(), **settings)  # restores the CUDA RNG too
    assert losses(resumed) == pytest.approx({s: v for s, v in losses(full).items() if s > 4}, abs=1e-6)


# -- accumulation, clipping and logged loss against hand-computed references ------------------------
#
# The engine only builds AdamW, whose first step is lr * g / (|g| + eps) ~ lr * sign(g): blind to
# the gradient's scale, so it cannot show a missing 1/accumulation or a missing clip.  These tests
# swap in plain SGD (p <- p - lr * g, exact to check by hand) through the same factory the engine
# calls; everything else (sampler, accumulation loop, clipping, logging) is the engine's own.
# The model has no dropout and the task no jitter, so one step is a pure function of the weights
# and the 8 examples it sees.


class RecordingMSETask:
    """Deterministic MSE that records each micro-batch it is given (the step's examples, in order)."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []

    def training_step(self, model, batch):
        self.batches.append({key: value.clone() for key, value in batch.items()})
        loss = nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])
        return loss, {"target_mean": batch["y"].mean()}


def deterministic_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def one_sgd_step(out_dir, monkeypatch, **overrides):
    """One optimiser step of the engine with SGD; returns (weights before, trainer, task, result)."""
    monkeypatch.setattr("clara.engine.adamw", lambda groups, lr: torch.optim.SGD(groups, lr=lr))
    settings = dict(
        steps=1, batch_size=4, accumulation=2, lr=0.1, min_lr=0.0, warmup_steps=0, cycle_steps=0,
        weight_decay=0.0, grad_clip=0.0, log_every=1, eval_at_start=False, seed=7, out_dir=str(out_dir),
        device="cpu", progress=False,
    )
    settings.update(overrides)
    model = deterministic_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    task = RecordingMSETask()
    trainer = Trainer(TrainConfig(**settings), model, task, ToyData())
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    result = trainer.fit()
    return before, trainer, task, result


def reference_gradient(batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Plain autograd: the gradient of the MSE over all the step's examples at the initial weights,
    and that MSE."""
    model = deterministic_model()
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, loss.detach()


def test_accumulated_step_equals_one_big_batch_step(tmp_path, monkeypatch):
    """4 x accumulation 2 must be the same SGD step as 8 x 1 on the same 8 examples: the engine
    divides each micro-batch loss by the accumulation count, so the summed gradients are the mean."""
    _, accumulated, acc_task, _ = one_sgd_step(tmp_path / "acc", monkeypatch, batch_size=4, accumulation=2)
    _, single, one_task, _ = one_sgd_step(tmp_path / "one", monkeypatch, batch_size=8, accumulation=1)
    # Same seed and dataset size: the sampler's permutation is the same, so the first global batch
    # of 8 is the two micro-batches of 4 (it was cut at 4 and at 8 from the same order).
    assert len(acc_task.batches) == 2 and len(one_task.batches) == 1
    torch.testing.assert_close(torch.cat([b["x"] for b in acc_task.batches]), one_task.batches[0]["x"], rtol=0, atol=0)
    for (name, a), (_, b) in zip(accumulated.model.named_parameters(), single.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # And it is the plain SGD step on the mean gradient (not only the two runs agreeing).
    grads, _ = reference_gradient(one_task.batches)
    start = dict(deterministic_model().named_parameters())
    for name, p in accumulated.model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name].detach() - 0.1 * grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_clipping_applies_lr_times_the_clipped_gradient(tmp_path, monkeypatch):
    """With a limit far below the gradient norm the update is lr * g * limit / ||g|| (the global norm
    over all parameters, of the accumulated gradient), so the applied gradient's norm is the limit;
    the logged grad_norm is the norm before clipping."""
    limit, lr = 1e-3, 1.0  # lr 1: the update (~1e-4 per weight) stays far above fp32 rounding of the weights
    before, trainer, task, result = one_sgd_step(tmp_path, monkeypatch, grad_clip=limit, lr=lr)
    grads, _ = reference_gradient(task.batches)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    assert norm > 1000 * limit  # the limit really bites
    factor = limit / (norm.item() + 1e-6)  # torch.nn.utils.clip_grad_norm_'s scale
    applied_sq = 0.0
    for name, p in trainer.model.named_parameters():
        expected = before[name] - lr * factor * grads[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-7, msg=name)
        applied_sq += (((before[name] - p.detach()).double() / lr) ** 2).sum().item()
    assert applied_sq**0.5 == pytest.approx(limit, rel=1e-3)  # the gradient applied has norm = limit
    assert result.history[0]["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-5)


def test_logged_loss_of_an_accumulated_step_is_the_mean_over_micro_batches(tmp_path, monkeypatch):
    """The engine documents logs as averaged: the step's loss (and the task's own logs) is the mean of
    the micro-batch values, which for equal micro-batches is the MSE over the whole step's batch."""
    _, _, task, result = one_sgd_step(tmp_path, monkeypatch, batch_size=4, accumulation=2)
    model = deterministic_model()
    with torch.no_grad():
        micro = [nn.functional.mse_loss(model(b["x"]).squeeze(-1), b["y"]).item() for b in task.batches]
    _, full_batch_loss = reference_gradient(task.batches)
    record = result.history[0]
    assert record["step"] == 1
    assert micro[0] != pytest.approx(micro[1], rel=1e-3)  # a sum or a single micro-batch would show
    assert record["train/loss"] == pytest.approx(sum(micro) / 2, rel=1e-6)
    assert record["train/loss"] == pytest.approx(full_batch_loss.item(), rel=1e-6)
    expected_mean_target = sum(b["y"].mean().item() for b in task.batches) / 2
    assert record["train/target_mean"] == pytest.approx(expected_mean_target, rel=1e-6, abs=1e-7)


def test_ctrl_c_during_the_optimiser_update_is_held_until_the_step_is_counted(tmp_path, monkeypatch):
    """SIGINT lands anywhere: right after optimizer.step() it used to save the updated weights as the
    step before, so the resumed run applied that step twice."""
    import os
    import signal

    full, full_trainer = fit(tmp_path / "full")
    step = torch.optim.AdamW.step
    calls = []

    def step_then_ctrl_c(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at once, here
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut")
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["step"] == 6
    resumed, resumed_trainer = fit(tmp_path / "cut")
    assert losses(resumed) == pytest.approx({s: v for s, v in losses(full).items() if s > 6}, abs=1e-7)
    for a, b in zip(full_trainer.model.parameters(), resumed_trainer.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


class InterruptedEvaluationTask(ToyTask):
    """Ctrl-C during the evaluation at ``step`` (the run's last: its final evaluation)."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.trainer = step, None

    def evaluate(self, model):
        if self.trainer.step == self.step:
            raise KeyboardInterrupt
        return super().evaluate(model)


def test_ctrl_c_during_the_final_evaluation_keeps_the_trained_steps(tmp_path):
    """checkpoint_every=0 (the demos) saves only at the end; a Ctrl-C in the final evaluation used
    to save nothing, so the rerun started over."""
    full, full_trainer = fit(tmp_path / "full", eval_every=0)
    task = InterruptedEvaluationTask(step=10)
    model = toy_model()
    config = TrainConfig(steps=10, batch_size=4, accumulation=2, lr=5e-2, min_lr=1e-3, warmup_steps=2, cycle_steps=12,
                         log_every=1, eval_every=0, seed=7, out_dir=str(tmp_path / "cut"), device="cpu")
    trainer = task.trainer = Trainer(config, model, task, ToyData())
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["step"] == 10
    resumed, resumed_trainer = fit(tmp_path / "cut", eval_every=0)
    assert resumed.resumed_from == 10 and resumed.evaluations  # the final evaluation, run again
    for a, b in zip(full_trainer.model.parameters(), resumed_trainer.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_a_run_continued_to_more_steps_follows_the_longer_runs_schedule(tmp_path):
    """cycle_steps 0 is one cosine over the run: continued from 4 to 10 steps, steps 5-10 take the
    rates of a run planned for 10 (the old checkpoint's schedule restarted a 4-step cycle instead)."""
    short, _ = fit(tmp_path / "continued", steps=4, cycle_steps=0, warmup_steps=1, eval_every=0)
    continued, _ = fit(tmp_path / "continued", steps=10, cycle_steps=0, warmup_steps=1, eval_every=0)
    straight, _ = fit(tmp_path / "straight", steps=10, cycle_steps=0, warmup_steps=1, eval_every=0)
    rates = {r["step"]: r["train/lr"] for r in straight.history}
    assert continued.resumed_from == 4
    assert [r["train/lr"] for r in continued.history] == pytest.approx([rates[s] for s in range(5, 11)])
    assert [r["train/lr"] for r in short.history] != pytest.approx([rates[s] for s in range(1, 5)])  # its own shorter cosine


# -- rerunning a finished run, and evaluations a Ctrl-C cut short ------------------------------------


TIMINGS = ("train/samples_per_s", "train/step_s", "train/data_wait_s")  # differ between two runs of the same steps


def logged(out_dir) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """metrics.jsonl's records and TensorBoard's scalars (tag -> [(step, value)]) as read back, timings left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = (out_dir / METRICS_FILE).read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"]) - set(TIMINGS)
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags}
    return records, scalars


class CountingTask(ToyTask):
    def __init__(self):
        super().__init__()
        self.evaluated_at: list[int] = []
        self.trainer = None

    def evaluate(self, model):
        self.evaluated_at.append(self.trainer.step)
        return super().evaluate(model)


def fit_counted(out_dir, task, **overrides):
    settings = dict(steps=10, batch_size=4, accumulation=2, lr=5e-2, min_lr=1e-3, warmup_steps=2, cycle_steps=12,
                    log_every=1, eval_every=5, seed=7, out_dir=str(out_dir), device="cpu", progress=False)
    settings.update(overrides)
    trainer = task.trainer = Trainer(TrainConfig(**settings), toy_model(), task, ToyData())
    return trainer.fit()


def test_rerunning_a_finished_run_leaves_its_logs_as_they_were(tmp_path):
    """The checkpoint holds every step: the rerun used to evaluate the last step again and log it a
    second time (metrics.jsonl and TensorBoard). The caller still gets the final evaluation's record."""
    first = fit_counted(tmp_path, CountingTask())
    records, scalars = logged(tmp_path)
    assert [r["step"] for r in records if "eval/mse" in r] == [0, 5, 10]
    saved = (tmp_path / CHECKPOINT_FILE).stat().st_mtime_ns
    task = CountingTask()
    again = fit_counted(tmp_path, task)
    assert (tmp_path / CHECKPOINT_FILE).stat().st_mtime_ns == saved  # nothing trained: not written again
    assert task.evaluated_at == [] and task.calls == 0
    assert again.resumed_from == 10 and again.step == 10 and again.history == []
    assert again.evaluations == [first.evaluations[-1]] == [records[-1]]
    assert logged(tmp_path) == (records, scalars)


def test_a_rerun_after_a_ctrl_c_in_the_final_evaluation_runs_it_once(tmp_path):
    """The checkpoint then holds every step but the final evaluation never finished: it runs, once."""
    full = fit_counted(tmp_path / "full", CountingTask())
    with pytest.raises(KeyboardInterrupt):
        fit_counted(tmp_path / "cut", InterruptedEvaluationTask(step=10))
    task = CountingTask()
    resumed = fit_counted(tmp_path / "cut", task)
    assert task.evaluated_at == [10] and task.calls == 0
    assert resumed.evaluations == [full.evaluations[-1]]
    fit_counted(tmp_path / "cut", CountingTask())  # finished now: nothing more
    assert logged(tmp_path / "cut") == logged(tmp_path / "full")


def test_an_evaluation_a_ctrl_c_cut_short_runs_on_resume(tmp_path):
    """Saved at step 5 during its evaluation, the run resumed at step 6: the evaluation at 5 was
    never made (a fine-tune never weighed that epoch's weights as its best)."""
    fit_counted(tmp_path / "full", CountingTask())
    with pytest.raises(KeyboardInterrupt):
        fit_counted(tmp_path / "cut", InterruptedEvaluationTask(step=5))
    assert torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["step"] == 5
    task = CountingTask()
    resumed = fit_counted(tmp_path / "cut", task)
    assert task.evaluated_at == [5, 10] and [r["step"] for r in resumed.evaluations] == [5, 10]
    assert logged(tmp_path / "cut") == logged(tmp_path / "full")
    # A run resumed from a step whose evaluation finished does not repeat it.
    fit_counted(tmp_path / "long", CountingTask(), steps=5, cycle_steps=0)
    task = CountingTask()
    fit_counted(tmp_path / "long", task, steps=10, cycle_steps=0)
    assert task.evaluated_at == [10]
    assert [r["step"] for r in logged(tmp_path / "long")[0] if "eval/mse" in r] == [0, 5, 10]


def test_a_ctrl_c_while_a_record_is_written_leaves_it_in_both_logs_or_neither(tmp_path, monkeypatch):
    """TensorBoard is written before metrics.jsonl; a Ctrl-C between the two left the final evaluation
    in TensorBoard only, and the rerun, finding no record in metrics.jsonl, logged it there again."""
    import os
    import signal

    from torch.utils.tensorboard import SummaryWriter

    task = CountingTask()
    flush = SummaryWriter.flush

    def flush_then_ctrl_c(self):
        flush(self)
        if task.evaluated_at[-1:] == [10]:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(SummaryWriter, "flush", flush_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        fit_counted(tmp_path / "cut", task)
    monkeypatch.setattr(SummaryWriter, "flush", flush)
    fit_counted(tmp_path / "full", CountingTask())
    rerun = CountingTask()
    fit_counted(tmp_path / "cut", rerun)
    assert rerun.evaluated_at == []
    assert logged(tmp_path / "cut") == logged(tmp_path / "full")


# -- the train records around a resume ----------------------------------------------------------------


class Killed(BaseException):
    """A kill (SIGKILL, the out-of-memory killer): the run saves nothing, its rerun resumes from the last checkpoint."""


class StoppedTask(CountingTask):
    """Stopped in micro-batch call ``at`` by ``stop`` (KeyboardInterrupt: the run saves its last finished step)."""

    def __init__(self, at: int, stop: type[BaseException]):
        super().__init__()
        self.at, self.stop = at, stop

    def training_step(self, model, batch):
        if self.calls + 1 == self.at:
            raise self.stop
        return super().training_step(model, batch)


@pytest.mark.parametrize("stop, at, saved", [
    (Killed, 11, 3),  # in step 6: resumes from the periodic checkpoint of step 3, in the window of steps 1-4
    (KeyboardInterrupt, 14, 6),  # in step 7's second micro-batch: saved at 6, in the window of steps 5-8
])  # fmt: skip
def test_the_train_record_after_a_resume_averages_the_whole_window(tmp_path, stop, at, saved):
    """Train records average log_every steps (4 here: records at 4, 8 and 10).  The steps of the window
    made before the checkpoint were lost with the interrupted run, so the first record after a resume
    averaged only the steps made after it: another loss, grad_norm and lr than the uninterrupted run's."""
    settings = dict(log_every=4, checkpoint_every=3)
    fit_counted(tmp_path / "full", CountingTask(), **settings)
    with pytest.raises(stop):
        fit_counted(tmp_path / "cut", StoppedTask(at, stop), **settings)
    assert torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["step"] == saved
    resumed = fit_counted(tmp_path / "cut", CountingTask(), **settings)
    assert resumed.resumed_from == saved
    assert logged(tmp_path / "cut") == logged(tmp_path / "full")


@pytest.mark.parametrize("where", ["before the record", "while the record is written"])
def test_a_ctrl_c_at_a_log_step_leaves_its_record_once(tmp_path, monkeypatch, where):
    """A Ctrl-C after step 8 but before its record (the means are being reduced) saved step 8 without
    the record, which the resumed run, starting at step 9, never wrote; one while the record is being
    written must not have it written twice."""
    import os
    import signal

    from torch.utils.tensorboard import SummaryWriter

    settings = dict(log_every=4, checkpoint_every=3)
    fit_counted(tmp_path / "full", CountingTask(), **settings)
    task = CountingTask()
    reduce, flush = distributed.all_reduce_mean, SummaryWriter.flush
    stopped = []

    def reduce_then_ctrl_c(values, device):
        if task.trainer.step == 8 and "loss" in values and not stopped:
            stopped.append(True)
            raise KeyboardInterrupt
        return reduce(values, device)

    def flush_then_ctrl_c(self):
        flush(self)
        if task.trainer.step == 8 and not stopped:
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    if where == "before the record":
        monkeypatch.setattr(distributed, "all_reduce_mean", reduce_then_ctrl_c)
    else:
        monkeypatch.setattr(SummaryWriter, "flush", flush_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        fit_counted(tmp_path / "cut", task, **settings)
    monkeypatch.setattr(distributed, "all_reduce_mean", reduce)
    monkeypatch.setattr(SummaryWriter, "flush", flush)
    assert stopped and torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["step"] == 8
    fit_counted(tmp_path / "cut", CountingTask(), **settings)
    assert logged(tmp_path / "cut") == logged(tmp_path / "full")
