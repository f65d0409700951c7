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


def _resume_worker(rank, world, port, out_dir, queue):
    from tests.clara.test_engine import ToyData, ToyTask, toy_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    config = dict(steps=10, batch_size=2, accumulation=2, lr=5e-2, min_lr=1e-3, warmup_steps=2, cycle_steps=12,
                  log_every=4, eval_every=5, checkpoint_every=3, seed=7, device="cpu", progress=False, print_logs=False)
    timings = ("train/samples_per_s", "train/step_s", "train/data_wait_s")
    runs = []
    # Uninterrupted; then stopped on both processes in step 7 (micro-batch calls 13 and 14) and resumed
    # from the checkpoint of step 6, in the window of steps 5-8 (6 steps of 2 x 2 x 2 samples per epoch).
    for folder, task in [("full", ToyTask()), ("split", ToyTask(interrupt_at_call=13)), ("split", ToyTask())]:
        trainer = Trainer(TrainConfig(out_dir=f"{out_dir}/{folder}", **config), toy_model(), task, ToyData())
        try:
            history = trainer.fit().history
        except KeyboardInterrupt:
            history = trainer.history
        weights = [value for p in trainer.model.parameters() for value in p.detach().flatten().tolist()]
        runs.append(([{k: v for k, v in record.items() if k not in timings} for record in history], weights))
    queue.put((rank, runs))
    queue.close()
    queue.join_thread()
    dist.barrier()
    os._exit(0)


def test_a_resumed_run_on_two_processes_makes_the_uninterrupted_runs_steps_and_records(tmp_path):
    """Each process's RNG and its logs since the last record are its own: the checkpoint holds them per
    process, so the resumed run's weights and its record at step 8 (averaged over steps 5-8 and both
    processes) are the uninterrupted run's."""
    results = run_on_two_processes(_resume_worker, str(tmp_path))
    for _, ((full, full_weights), (cut, _), (resumed, weights)) in results:
        assert [r["step"] for r in cut] == [4] and [r["step"] for r in resumed] == [8, 10]
        for record, expected in zip(cut + resumed, full, strict=True):
            assert record == pytest.approx(expected, abs=1e-7)
        assert weights == pytest.approx(full_weights, abs=1e-7)
    assert results[0][1][0] == results[1][1][0]  # one model and one record on both processes


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


SHUTDOWN_WITH_A_CYCLE = """
import os, sys
import torch
import torch.distributed as dist
from torch import nn
from clara import distributed

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(1)
nn.Linear(2, 1)(torch.ones(1, 2)).sum().backward()  # any threads of autograd's own exist before the count
before = threads()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
model(torch.ones(1, 2)).sum().backward()
holder = {"model": model}
holder["self"] = holder  # a reference cycle keeps the DDP model, and through its reducer the group
del model, holder
during = threads()
distributed.shutdown()
print(before, during, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_shutdown_ends_the_group_s_threads_even_when_a_cycle_holds_it(tmp_path):
    """A group held by a cycle (the fine-tune Trainer and its task, around the DDP model) outlived
    destroy_process_group to the collection at interpreter exit, where a gloo worker thread taking the GIL
    aborted the finished run ("terminate called without an active exception")."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SHUTDOWN_WITH_A_CYCLE, str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    before, during, after = map(int, done.stdout.split())
    assert during > before and after == before
