"""Per-clip work of ``meld.prepare``: decode one clip, check it, compute its log-mel; and the worker pool.

This module is what the worker processes import, so it stays small: no CSV parsing, no reporting.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from clara.audio_io import AudioDecodeError, load_audio
from meld.errors import MeldDataError
from meld.feature_cache import OK, SILENT_OR_EMPTY, TRUNCATED, UNDECODABLE, AudioSettings, ClipRecord


@dataclass(frozen=True)
class ClipTask:
    """One clip to decode; everything a worker process needs (it is pickled)."""

    key: str
    path: str  # absolute
    file: str  # relative to the data root, as recorded
    size: int
    mtime_ns: int
    csv_seconds: float  # EndTime - StartTime, for the truncation reason
    settings: AudioSettings

    @property
    def source(self) -> tuple[str, int, int]:
        return self.file, self.size, self.mtime_ns


_LOG_MELS: dict[AudioSettings, torch.nn.Module] = {}  # one LogMel per process and settings


def silence(wave: torch.Tensor, silence_dbfs: float) -> str:
    """Why prepare leaves ``wave`` out as silent ("silent: peak -93.2 dBFS, at or under -80 dBFS"); "" if it is not.

    meld.predict asks the same question of the clip it classifies, so both read "silent" alike.
    """
    peak = float(wave.abs().max())
    if peak > 10 ** (silence_dbfs / 20):
        return ""
    level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.1f} dBFS"
    return f"silent: {level}, at or under {silence_dbfs:g} dBFS"


def process_clip(task: ClipTask) -> tuple[ClipRecord, np.ndarray | None]:
    """Decode one clip and compute its log-mel: its record and float16 [T, n_mels] (None if not cached)."""
    s = task.settings
    source = {"key": task.key, "file": task.file, "size": task.size, "mtime_ns": task.mtime_ns}
    cap = s.max_samples
    try:
        # One sample past the cap tells a clip longer than the cap from one exactly as long.
        limit = None if cap is None else (cap + 1) / s.sample_rate
        wave = load_audio(task.path, max_seconds=limit, sample_rate=s.sample_rate)  # [N]
    except AudioDecodeError as err:
        # The message names the file; the record has it already.
        reason = str(err).removeprefix(f"{task.path}: ").replace(f": '{task.path}'", "")
        return ClipRecord(**source, status=UNDECODABLE, reason=reason), None
    except Exception as err:  # noqa: BLE001 - a failure load_audio did not foresee must not stop a 13,000-clip run
        reason = f"cannot decode audio ({type(err).__name__}: {err})"
        return ClipRecord(**source, status=UNDECODABLE, reason=reason), None
    truncated = cap is not None and wave.shape[0] > cap
    wave = wave[:cap] if truncated else wave
    n = wave.shape[0]
    # n == 0 on its own: with min_seconds 0 an empty clip would otherwise reach the silence check,
    # whose max() fails on no samples and stops the whole run.
    if n == 0 or n < s.min_seconds * s.sample_rate:
        reason = f"{n / s.sample_rate:.3f} s of audio, under the {s.min_seconds:g} s minimum"
        reason = reason if n else "no audio samples"
        return ClipRecord(**source, status=SILENT_OR_EMPTY, reason=reason, samples=n), None
    reason = silence(wave, s.silence_dbfs)
    if reason:
        return ClipRecord(**source, status=SILENT_OR_EMPTY, reason=reason, samples=n), None
    if s not in _LOG_MELS:
        _LOG_MELS[s] = s.log_mel()
    with torch.inference_mode():
        mel, frames = _LOG_MELS[s](wave)  # [n_mels, T], 0-d
    status, reason = OK, ""
    if truncated:
        status = TRUNCATED
        reason = (f"longer than {s.max_seconds:g} s (CSV span {task.csv_seconds:.1f} s); "
                  f"kept the first {s.max_seconds:g} s")
    record = ClipRecord(**source, status=status, reason=reason, samples=n, frames=int(frames))
    return record, mel.T.numpy().astype(np.float16)


def _exit_when_parent_dies(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent alone handles it and stops the pool. One torch
    # thread per worker, as the workers already use every core.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    # A pool worker outlives a parent killed with SIGKILL, blocked on its task queue for good (and the
    # forkserver with it); this thread ends the worker as soon as the parent is gone.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_parent_dies, args=(parent.sentinel,), daemon=True).start()


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Inline runs compute like a worker (one thread), so the cache does not depend on ``--workers``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one: the server imports this module (torch included) once and forks
    each worker from that clean process, which is quick and safe. Forking the parent instead could
    deadlock torch's thread pools; spawning would import torch in every worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "av"])
    return context


class WorkerDied(MeldDataError):
    """A decoding process ended without an answer (killed, out of memory, a crash inside the decoder)."""


def run_clips(tasks: Sequence[ClipTask], workers: int, done: Callable[[ClipRecord, np.ndarray | None], None],
              work: Callable[[ClipTask], tuple[ClipRecord, np.ndarray | None]] | None = None) -> None:  # fmt: skip
    """``work`` (default ``process_clip``; a module-level function, as it is pickled) for every task,
    ``done`` called in this process as each finishes (any order).  Raises WorkerDied, after handing over
    every finished clip, when a worker process dies."""
    work = work or process_clip  # looked up per call, so a patched process_clip is the one used
    if workers <= 1 or len(tasks) <= 1:
        with _one_torch_thread():
            for task in tasks:
                done(*work(task))
        return
    pool = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_worker_init)
    futures = [pool.submit(work, task) for task in tasks]
    waiting = set(futures)

    def hand_over_finished() -> None:
        # Drop the queued clips, let the running ones finish, and hand over every result that came
        # back: an interruption or a dead worker loses no finished clip.
        pool.shutdown(wait=True, cancel_futures=True)
        for future in waiting:
            if future.done() and not future.cancelled() and future.exception() is None:
                done(*future.result())

    try:
        for future in as_completed(futures):
            waiting.discard(future)
            done(*future.result())
    except KeyboardInterrupt:
        hand_over_finished()
        raise
    except BrokenProcessPool:
        hand_over_finished()
        unfinished = sum(1 for future in futures if not future.done() or future.exception() is not None)
        raise WorkerDied(
            f"a decoding process died (killed, out of memory, or a crash inside the decoder) with {unfinished} of "
            f"{len(tasks)} clips unfinished; the finished ones are kept: run the same command again to go on, with "
            "--workers 1 to decode one clip at a time") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
