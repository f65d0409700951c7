"""The engine and its collectives under two gloo processes: what only the main process does reaches the others."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from clara import distributed
from clara.engine import TrainConfig, Trainer
from tests.clara.two_processes import run_on_two_processes


class Pruned(Exception):
    """What a sweep's epoch callback raises inside the main process's evaluation."""


class PruningTask:
    def training_step(self, model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x).squeeze(-1), y), {}

    def evaluate(self, model):
        raise Pruned("pruned at step 2")


def _worker(rank, world, port, out_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    config = TrainConfig(steps=4, batch_size=2, warmup_steps=1, cycle_steps=0, eval_every=2, eval_at_start=False,
                         device="cpu", out_dir=out_dir, progress=False)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, generator=generator), torch.randn(16, generator=generator))
    torch.manual_seed(0)
    trainer = Trainer(config, nn.Linear(3, 1), PruningTask(), data)
    try:
        trainer.fit()
        outcome = "finished"
    except Pruned as err:
        outcome = f"Pruned: {err} at step {trainer.step}"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    means = distributed.all_reduce_mean({"loss": float(rank), "lr": 1.0, "accuracy": 2.0 * rank}, torch.device("cpu"))
    queue.put((rank, outcome, distributed.is_main(), means))
    queue.close()
    queue.join_thread()
    dist.barrier()  # both are past the failed evaluation: the group still works
    # Leave without gloo's C++ teardown, which can abort a process whose peer has already gone.
    os._exit(0)


def test_an_exception_in_the_main_process_evaluation_reaches_every_process(tmp_path):
    """Only the main process evaluates; its exception (a pruned trial) is raised in every process,
    which would otherwise wait at the barrier for good (gloo: fail when the main process leaves).
    The logged means come back in the caller's key order, as a single process logs them."""
    results = run_on_two_processes(_worker, str(tmp_path))
    assert [result[:3] for result in results] == [(0, "Pruned: pruned at step 2 at step 2", True),
                                                  (1, "Pruned: pruned at step 2 at step 2", False)]
    for *_, means in results:  # the means over both processes, in the order one process logs them
        assert list(means.items()) == [("loss", 0.5), ("lr", 1.0), ("accuracy", 1.0)]


def test_is_main_reads_torchrun_rank_without_a_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
    monkeypatch.delenv("RANK")
    assert distributed.is_main()


@pytest.mark.parametrize("rank, printed", [("0", "hello\n"), ("1", "")])
def test_main_print_prints_on_the_main_process_only(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    distributed.main_print("hello")
    assert capsys.readouterr().out == printed


def test_errors_in_the_settings_are_said_once_and_a_process_s_own_with_its_rank(monkeypatch, capsys):
    err = ValueError("data.train: shard.tar#k.wav: cannot decode audio")
    for rank, world, same, expected in [
        ("0", "1", False, "error: data.train: shard.tar#k.wav: cannot decode audio\n"),
        ("0", "2", True, "error: data.train: shard.tar#k.wav: cannot decode audio\n"),
        ("1", "2", True, ""),  # torchrun's other process met the same settings error: the main one said it
        ("1", "2", False, "error: (rank 1) data.train: shard.tar#k.wav: cannot decode audio\n"),
    ]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        distributed.print_error(err, same_everywhere=same)
        assert capsys.readouterr().err == expected, (rank, world, same)
