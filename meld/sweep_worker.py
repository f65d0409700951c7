"""Sweep workers: each runs trials until the study has ``study.n_trials`` finished ones.

Any number of workers, in one process, in ``--workers`` processes or on other machines, share a study
through its storage. Counting the finished and running trials and creating the next one happen under
a file lock in the study folder, so local workers never overshoot the target. A worker that dies
leaves its trial RUNNING; once that trial's heartbeat (a user attribute its worker refreshes every
``study.heartbeat_interval`` seconds) is older than ``study.grace_period``, the next worker to look
marks it failed, and a new trial takes its place.
"""

from __future__ import annotations

import fcntl
import math
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from clara import config as config_lib
from clara.config import ConfigError
from meld.sweep_config import SweepConfig
from meld.sweep_study import (
    FINISHED, Backend, SweepError, metric_value, open_study, outputs_override, override, suggest, trial_config,
    trial_dir,
)

_POLL_S = 1.0  # how often a worker with nothing to start looks again at the other workers' trials
HEARTBEAT = "heartbeat"  # the trial user attribute a running trial's worker keeps fresh (time.time())
FAIL_REASON = "fail_reason"  # the trial user attribute saying why it failed
STALE_REASON = "its worker stopped"  # how FAIL_REASON starts for a trial whose worker went silent


@contextmanager
def _heartbeat(trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Record the time in the trial's user attribute ``heartbeat`` every ``interval`` seconds while the block runs.

    Our own rather than Optuna's: journal storage has none, and RDB storage's ignores a trial whose
    worker died before its first beat, which then stays RUNNING forever.
    """
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                trial.set_user_attr(HEARTBEAT, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # another worker judged it dead (see _run_one)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"sweep-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study: optuna.Study, grace_period: float, on_stale: Callable[[int], None]) -> None:
    """Mark failed every RUNNING trial whose last heartbeat (or start) is older than ``grace_period`` seconds."""
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = max(trial.user_attrs.get(HEARTBEAT, 0.0), trial.datetime_start.timestamp())
        if now - last > grace_period:
            # Study has no public setter for another worker's trial; the storage's is what Trial uses.
            try:
                study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON,
                                                   f"{STALE_REASON}: no heartbeat for {grace_period} s")
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its worker finished it after all
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            on_stale(trial.number)


def _judged_dead(trial: FrozenTrial) -> bool:
    """Whether ``trial`` was failed by fail_stale_trials (another worker), not by its own worker."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_REASON, "").startswith(STALE_REASON)


class FileLock:
    """An exclusive flock on a file in the study folder; ``release`` may come before the block ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a")
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- one worker


class _Worker:
    """Runs trials until the study has ``n_trials`` finished ones; many may share one storage."""

    def __init__(self, config: SweepConfig, study_dir: Path, backend: Backend, log: Callable[[str], None],
                 extra: Sequence[str] = ()) -> None:
        self.config = config
        self.extra = list(extra)  # overrides for this worker's trials (its GPU, see worker_overrides)
        self.study_dir = study_dir
        self.backend = backend
        self.log = log
        self.study = open_study(config, study_dir, backend)
        self.failures = 0
        self.fatal: BaseException | None = None
        self.last_error = ""

    def run(self) -> None:
        # Count, then create the trial, under one lock: two workers never both take the last slot.
        lock = FileLock(self.study_dir / "ask.lock")
        waiting_said = False
        while True:
            with lock:
                fail_stale_trials(self.study, self.config.study.grace_period, self._on_stale)
                states = Counter(t.state for t in self.study.get_trials(deepcopy=False))
                finished = sum(states[s] for s in FINISHED)
                if finished >= self.config.study.n_trials:
                    return
                room = finished + states[TrialState.RUNNING] < self.config.study.n_trials
                if room:
                    self._run_one(lock)
            if self.fatal is not None:
                raise self.fatal
            if self.failures >= self.config.study.max_failures:
                raise SweepError(f"{self.failures} trials failed in this worker, the last with: {self.last_error}")
            if not room:
                if not waiting_said:
                    self.log(f"waiting for {states[TrialState.RUNNING]} running trial(s) of other workers "
                             f"(a dead worker's trial is failed after {self.config.study.grace_period} s)")
                    waiting_said = True
                time.sleep(_POLL_S)

    def _on_stale(self, number: int) -> None:
        self.log(f"trial {number}: its worker stopped (no heartbeat for {self.config.study.grace_period} s); "
                 "marked failed")

    def _run_one(self, lock: FileLock) -> None:
        started: list[optuna.Trial] = []

        def objective(trial: optuna.Trial) -> float:
            started.append(trial)
            lock.release()  # the trial is RUNNING in the storage now, so the others count it
            with _heartbeat(trial, self.config.study.heartbeat_interval):
                return self._objective(trial)

        try:
            # catch: a failed trial is recorded as FAIL and the worker goes on (see max_failures).
            self.study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[self._report])
        except (ValueError, AssertionError):
            # Optuna's tell refuses a trial another worker already failed ("Cannot tell a FAIL trial"), and
            # when the objective had returned a value its bookkeeping then asserts ("Should not reach").
            if not started or not _judged_dead(self.study._storage.get_trial(started[0]._trial_id)):
                raise
            self.log(f"a trial of this worker outlived study.grace_period ({self.config.study.grace_period} s) "
                     "without a heartbeat and was marked failed by another worker; its result is dropped")

    def _objective(self, trial: optuna.Trial) -> float:
        metric = self.config.objective.metric
        run_dir = trial_dir(self.study_dir, trial.number)
        trial.set_user_attr("run_dir", str(run_dir.relative_to(self.study_dir)))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        params = suggest(trial, self.config.space)
        try:
            finetune_config = trial_config(self.config, self.backend, params,
                                           [*outputs_override(self.backend, self.config.study.trial_outputs),
                                            *self.extra])
        except ConfigError as err:  # a combination the fine-tune rejects: this point fails, the search goes on
            self._failed(trial, str(err))
            raise

        def on_epoch(epoch: int, dev_metrics: Mapping) -> None:
            value = metric_value(dev_metrics, metric)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: dev {metric} {value:.4f}")

        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # The fine-tune's own progress lines go to the trial's folder; the terminal gets one line per trial.
            with open(run_dir / "stdout.log", "a", encoding="utf-8") as out, redirect_stdout(out):
                document = self.backend.run_finetune(finetune_config, out_dir=run_dir, epoch_callback=on_epoch)
            value = metric_value(document["dev"], metric)
        except optuna.TrialPruned:
            raise
        except self.backend.point_errors as err:  # this point's settings do not fit the data: it fails alone
            self._failed(trial, f"{type(err).__name__}: {err}")
            raise
        except self.backend.user_errors as err:
            self.fatal = err
            self._failed(trial, f"{type(err).__name__}: {err}")
            raise
        except Exception as err:
            self._failed(trial, f"{type(err).__name__}: {err}")
            raise
        except KeyboardInterrupt:  # Optuna fails the trial too; say why in the summary
            self._failed(trial, "interrupted (KeyboardInterrupt)")
            raise
        if not math.isfinite(value):
            # Optuna fails a trial whose value is NaN or infinite itself, saying why only in its log.
            self._failed(trial, f"dev {metric} is {value} (a run that diverged)")
        return value

    def _failed(self, trial: optuna.Trial, reason: str) -> None:
        # Optuna only logs why a trial failed; the storage keeps it for the summary and the other workers.
        self.last_error = reason
        trial.set_user_attr(FAIL_REASON, reason)

    def _report(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        params = " ".join(f"{key}={short(value)}" for key, value in trial.params.items())
        if trial.state == TrialState.COMPLETE:
            outcome = f"dev {self.config.objective.metric} {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned after epoch {trial.last_step}"
        else:
            self.failures += 1
            # From the trial's own record: Optuna may fail a trial without the objective saying why.
            self.last_error = trial.user_attrs.get(FAIL_REASON, "no reason recorded (see Optuna's log)")
            outcome = f"failed: {self.last_error}"
        self.log(f"trial {trial.number:4d} {outcome} ({seconds:.1f} s) {params}")


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def worker_device(index: int, device: str, cuda_devices: int) -> str | None:
    """The device for local worker ``index`` when its runs say ``device`` and the machine has ``cuda_devices``
    GPUs, or None to leave the runs' setting alone.

    Each worker is a process of its own, not a torchrun rank, so ``auto`` alone would put every worker
    on cuda:0 (LOCAL_RANK is 0) and leave the other GPUs idle: with several GPUs, worker i takes
    cuda:(i mod count). A device the user named is theirs to keep.
    """
    if device != "auto" or cuda_devices < 2:
        return None
    return f"cuda:{index % cuda_devices}"


def worker_overrides(config: SweepConfig, backend: Backend, workers: int) -> list[list[str]]:
    """Per local worker, the overrides its trials get on top of the sweep's: its GPU (worker_device)."""
    if not backend.device_key:
        return [[] for _ in range(workers)]
    import torch  # here: nothing else in the sweep machinery needs it

    device: Any = config_lib.to_dict(trial_config(config, backend, {}))
    for part in backend.device_key.split("."):
        device = device[part]
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    chosen = [worker_device(index, device, cuda_devices) for index in range(workers)]
    return [[override(backend.device_key, value)] if value else [] for value in chosen]


def _worker_process(config: SweepConfig, study_dir: Path, backend: Backend, index: int, threads: int,
                    extra: Sequence[str] = ()) -> None:
    """The body of one ``--workers`` process: exit 2 with one line on a user error, like the CLI."""
    if "torch" in sys.modules:  # the workers share the cores instead of each taking them all
        sys.modules["torch"].set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        _Worker(config, study_dir, backend, lambda line: print(f"[worker {index}] {line}", flush=True), extra).run()
    except (SweepError, *backend.user_errors) as err:
        print(f"error: [worker {index}] {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(config: SweepConfig, study_dir: Path, backend: Backend, log: Callable[[str], None]) -> None:
    """Run ``study.workers`` workers (processes when more than one) until the study is complete."""
    workers = config.study.workers
    if workers == 1:
        _Worker(config, study_dir, backend, log).run()
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    extras = worker_overrides(config, backend, workers)
    for index, extra in enumerate(extras):
        if extra:
            log(f"worker {index}: {' '.join(extra)}")
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and open DB handles
    processes = [context.Process(target=_worker_process, args=(config, study_dir, backend, i, threads, extras[i]),
                                 name=f"sweep-worker-{i}") for i in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    codes = [process.exitcode for process in processes]
    if any(codes):
        raise SweepError(f"worker exit codes {codes}; their errors are printed above")


