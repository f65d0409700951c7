"""One training engine for CLARA pretraining and for fine-tuning.

A *task* says what one training step computes; the engine does everything around it: devices and
``torchrun`` process groups (DDP), mixed precision, AdamW with the warmup + cosine-restarts
schedule, gradient accumulation and clipping, TensorBoard and progress, periodic held-out
evaluation, atomic checkpoints and exact resume.

A task is any object with

* ``training_step(model, batch) -> (loss, logs)``: ``model`` is the (possibly DDP-wrapped) model,
  ``batch`` the collated batch already on the device; ``loss`` a scalar tensor; ``logs`` a
  ``dict[str, float | Tensor]`` of scalars to average and log (the same keys on every process);
* optionally ``evaluate(model) -> dict[str, float]``: run on the main process only, with the bare
  model in eval mode under ``torch.no_grad()``; the RNG states are restored afterwards, so how often
  one evaluates never changes training.

Exact resume: a checkpoint holds the model, optimiser, scheduler, grad scaler, step, epoch, the
position in the epoch, and every process's python / numpy / torch (and CUDA) RNG state and logs
summed since the last train record (the first record after a resume averages the steps an
uninterrupted run's would).  The data order is a pure function of (seed, epoch), so skipping the
batches already seen in the current epoch puts the loader where the interrupted run was; datasets
with their own per-sample randomness get ``set_epoch(epoch)`` before each epoch.  An evaluation counts as made once its record is in
``metrics.jsonl``: a resume runs one due at the checkpoint's step that a Ctrl-C cut short, and a
finished run given again repeats nothing (``fit`` returns the logged final evaluation).
"""

from __future__ import annotations

import errno
import json
import math
import pickle
import random
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from clara import config as config_lib
from clara import distributed
from clara.checkpoint import CheckpointError, fit_problems
from clara.compilation import Mode, Recompute, Scope, compile_model
from clara.io_utils import atomic_path, remove_leftovers
from clara.optim import WarmupCosineRestarts, adamw, param_groups
from clara.precision import Precision, autocast_for, resolve_precision

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 0  # optimiser steps; 0 = train for ``epochs``
    epochs: int = 120
    batch_size: int = 16  # per process and micro-batch
    accumulation: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 1000  # at the start of every cycle
    cycle_steps: int = 5000  # 0 = one cycle over the whole run
    weight_decay: float = 0.01
    decay_1d: bool = False  # also decay biases, norms and temperatures (the reference did)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: Precision = "auto"  # autocast on GPU only (clara.precision); CPU trains in fp32
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the start (if eval_at_start) and at the end
    eval_every_epoch: bool = False  # also at the end of every epoch (once, where eval_every lands there too)
    eval_at_start: bool = True
    checkpoint_every: int = 0  # 0 = only at the end
    seed: int = 1234
    out_dir: str = "runs/clara"
    num_workers: int = 0
    resume: bool | None = None  # None: resume when out_dir has a checkpoint; true: must; false: start over
    find_unused_parameters: bool = False  # DDP, for models whose steps leave some parameters unused
    progress: bool = True  # tqdm bar (shown only on a terminal, main process)
    print_logs: bool = True  # print each train and eval record as a line (metrics.jsonl and TensorBoard get them anyway)
    # torch.compile of the model (clara.compilation): "blocks" compiles each repeated block, a quick
    # cold start that tolerates varying shapes and any batch structure; "model" the whole forward.
    compile: Scope = "off"
    compile_mode: Mode = "default"
    # What the compiled backward recomputes instead of keeping (clara.compilation): "pointwise" keeps
    # about a quarter less activation memory (norm outputs and GEGLU products are recomputed).
    compile_recompute: Recompute = "default"
    # Inductor's coordinate-descent tuning of its generated GPU kernels (clara.compilation): a few
    # percent faster on an H200, more compile time.
    compile_tuning: bool = False

    def __post_init__(self) -> None:
        """Each setting on its own, and the warmup against a restart cycle; how settings fit the run
        (warmup against its length, batches against the data) is checked by the Trainer, as drivers
        adapt some of them to the data first."""
        positive = ("batch_size", "accumulation", "log_every")
        problems = [f"{name} must be at least 1, got {getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        # seed: numpy's generators (the batch order, pretraining's mixing) refuse a negative one, late.
        non_negative = ("steps", "epochs", "warmup_steps", "cycle_steps", "eval_every", "checkpoint_every", "num_workers",
                        "seed")
        problems += [f"{name} must be >= 0, got {getattr(self, name)}" for name in non_negative if getattr(self, name) < 0]
        if self.steps == 0 and self.epochs == 0:
            problems.append("set steps or epochs above 0")
        # torch's optimiser refuses a negative or nan lr only when a driver builds it, late, and takes
        # an infinite lr, a negative decay or min_lr silently.
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number, got {self.lr}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a number >= 0, got {value}")
        if not _DEVICE_FORM.fullmatch(self.device):
            problems.append(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.cycle_steps and self.warmup_steps >= self.cycle_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below cycle_steps ({self.cycle_steps})")
        if problems:
            raise config_lib.ConfigError("train: " + "; ".join(problems))


_DEVICE_FORM = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")


def available_devices() -> list[str]:
    """The devices this machine can train on, as ``train.device`` spells them."""
    devices = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | torch.device, field: str = "train.device") -> None:
    """Raise ConfigError, naming ``field`` and what this machine has, unless ``device`` is a device
    name (auto, cpu, cuda, cuda:N, mps) present here; torch would fail later, in the middle of a
    driver, with a traceback."""
    if str(device) == "auto":
        return
    if not _DEVICE_FORM.fullmatch(str(device)):
        raise config_lib.ConfigError(f"{field}: expected auto, cpu, cuda, cuda:N or mps, got {str(device)!r}")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        present = torch.cuda.is_available() and (resolved.index or 0) < torch.cuda.device_count()
    else:
        present = resolved.type == "cpu" or (resolved.type == "mps" and torch.backends.mps.is_available())
    if not present:
        raise config_lib.ConfigError(
            f"{field}: {str(device)!r} is not available on this machine; available: "
            f"{', '.join(available_devices())} (or auto)"
        )


def init_env(config: TrainConfig) -> distributed.DistEnv:
    """The process group and device for ``config`` (``distributed.init``), after ``check_device``."""
    check_device(config.device)
    return distributed.init(config.device)


class Task(Protocol):
    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]: ...


@dataclass
class FitResult:
    step: int
    epoch: int
    seconds: float
    resumed_from: int | None  # the checkpoint step this run started from, None for a fresh run
    history: list[dict[str, float]] = field(default_factory=list)  # one record per log: step + means
    evaluations: list[dict[str, float]] = field(default_factory=list)  # step + the task's metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` reads back."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, cached]}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt.

    Only where Python turns SIGINT into KeyboardInterrupt (the main thread, the default handler); a
    handler of the caller's, or another thread, is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def sorted_in_pools(order: torch.Tensor, lengths: torch.Tensor, pool: int) -> torch.Tensor:
    """``order`` [N] (sample indices) with each run of ``pool`` consecutive entries sorted by the
    samples' ``lengths``; stable, so equal lengths keep their order.  Cut into batches whose size
    divides ``pool``, every batch then holds samples of similar length (length bucketing)."""
    return torch.cat([chunk[lengths[chunk].argsort(stable=True)] for chunk in order.split(max(pool, 1))])


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices for one process, resumable mid-epoch.

    Each epoch shuffles all indices with a generator seeded by (seed, epoch) and cuts the order into
    global batches of ``batch_size x world_size``; process ``rank`` takes slice ``rank`` of each.
    Incomplete global batches are dropped (contrastive losses want full batches; DDP wants equal
    counts), and the count is cut to a multiple of ``multiple_of`` (the accumulation).
    ``set_epoch(epoch, skip)`` starts the next iteration after ``skip`` batches.

    With ``lengths`` (one per sample: clip frames, token count), batches are length-bucketed: the
    shuffled order is cut into pools of ``pool_batches`` global batches, each pool is sorted by
    length and cut into global batches, and the batches are shuffled, so a batch holds samples of
    similar length (little padding) while the epoch's order stays random.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, multiple_of: int = 1, lengths: Sequence[int] | None = None,
                 pool_batches: int = 50) -> None:  # fmt: skip
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.pool_batches = pool_batches
        global_batches = num_samples // (batch_size * world_size)
        self.batches_per_epoch = global_batches // multiple_of * multiple_of
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)

    def _global_batches(self) -> torch.Tensor:
        """This epoch's global batches, [batches_per_epoch, batch_size x world_size] indices."""
        global_batch = self.batch_size * self.world_size
        if not self.shuffle:
            return torch.arange(self.batches_per_epoch * global_batch).view(-1, global_batch)
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_samples, generator=generator)
        if self.lengths is None:
            return order[: self.batches_per_epoch * global_batch].view(-1, global_batch)
        # The incomplete global batch's samples leave the shuffled order before it is sorted: cut from
        # the sorted order, they would be the longest of the last pool, and long clips would be
        # dropped far more often than short ones.
        kept = order[: self.num_samples // global_batch * global_batch]
        batches = sorted_in_pools(kept, self.lengths, global_batch * self.pool_batches).view(-1, global_batch)
        return batches[torch.randperm(len(batches), generator=generator)][: self.batches_per_epoch]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        for index in range(self.skip, self.batches_per_epoch):
            yield batches[index, self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


def move_to(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor (inside dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


def _check(config: TrainConfig) -> None:
    """How the warmup fits the run (each setting alone, and against the cycle: ``TrainConfig.__post_init__``)."""
    if not config.cycle_steps and config.steps and config.warmup_steps >= config.steps:
        raise config_lib.ConfigError(f"train: warmup_steps ({config.warmup_steps}) must be below steps ({config.steps})")


class BatchDoesNotFit(config_lib.ConfigError):
    """The training set makes no full step of this batch: a setting that fails for this data only (a
    sweep fails that trial and searches on)."""


def check_fits(config: TrainConfig, train_size: int, world_size: int = 1) -> None:
    """Raise BatchDoesNotFit (a ConfigError) unless ``train_size`` samples make one full step (batch_size x accumulation
    x processes): the Trainer's own check, which a driver can run before it writes its run folder
    (a folder holding config.yaml would then refuse the corrected settings as another run's)."""
    if train_size < config.batch_size * config.accumulation * world_size:
        raise BatchDoesNotFit(
            f"train: {train_size} training samples make no full step of batch_size {config.batch_size} "
            f"x accumulation {config.accumulation} x {world_size} process(es); lower batch_size"
        )


def _load_failure(err: Exception) -> str:
    """What went wrong in ``torch.load``, in one sentence.  The weights-only unpickler's message (for
    a file that is not a pickle, or holds more than tensors) goes on to advise ``weights_only=False``
    or allowlisting classes, unsafe for a file nobody vouches for; only its reason is kept."""
    if isinstance(err, EOFError):
        return "the file is empty or cut short"
    if isinstance(err, OSError) and err.errno == errno.EINVAL:
        # What torch's zip reader says ("[Errno 22] Invalid argument") when the archive's index points
        # past the end of a file cut short (a copy stopped midway, a full disk).
        return "its zip archive is cut short or damaged"
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        text = text.partition("WeightsUnpickler error:")[2]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    sentence = lines[0].split(". ")[0].rstrip(".")
    return f"unpickling failed: {sentence}" if isinstance(err, pickle.UnpicklingError) else sentence


def _record_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line; None for a blank line or one cut short (records are
    appended, so a run killed mid-write leaves a partial last line, which resume drops)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _picklable(err: Exception | None) -> Exception | None:
    """``err``, or a RuntimeError with its type and message when it cannot be sent to other processes."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def worker_error(err: Exception) -> Exception:
    """``err`` as the DataLoader worker raised it, for the one-line error a driver prints.

    The main process re-raises a worker's exception as the same type with the worker's whole
    traceback as its message ("Caught DataError in DataLoader worker process 0. Original Traceback
    ..."), so with ``train.num_workers`` above 0 a data error (a clip that cannot be decoded) would
    print as a traceback.  Returns a new exception of that type holding the original message; any
    other ``err`` as it is."""
    text = str(err)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return err
    kind = type(err)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    start = text.rfind(f"\n{name}: ")
    if start < 0:
        return err
    try:
        return kind(text[start + len(name) + 3 :].rstrip("\n"))
    except Exception:  # a type whose constructor takes more than a message: left as torch raised it
        return err


_START_OVER = "delete it or set train.resume=false to start over"

# What load_state_dict and the RNG setters raise for an entry of a checkpoint that unpickled but holds
# another run's state (other parameter groups) or values a damaged file garbled (a wrong-size RNG state).
_UNFIT = (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError, AttributeError)


@contextmanager
def _restoring(path: Path, entry: str) -> Iterator[None]:
    """Turn what restoring ``entry`` of checkpoint ``path`` raises into one CheckpointError naming both."""
    try:
        yield
    except CheckpointError:
        raise
    except _UNFIT as err:
        reason = next(iter(str(err).strip().splitlines()), "")
        raise CheckpointError(f"{path}: its {entry} does not fit this run ({type(err).__name__}: {reason}); "
                              f"{_START_OVER}") from None


class Trainer:
    """Trains ``model`` on ``train_data`` with ``task``; ``fit()`` runs (or resumes) to the last step.

    ``groups``: AdamW parameter groups of the model's trainable parameters, each ``{"params",
    "weight_decay"}`` and optionally ``"lr_scale"`` (that group trains at lr_scale x the schedule's
    rate); default ``clara.optim.param_groups``: one rate, no decay on tensors of fewer than 2 dims.
    ``lengths``: one per training sample; batches are then length-bucketed (ResumableBatchSampler).
    """

    def __init__(self, config: TrainConfig, model: nn.Module, task: Task, train_data: Dataset, *,
                 collate_fn: Callable[[list[Any]], Any] | None = None, env: distributed.DistEnv | None = None,
                 groups: list[dict] | None = None, lengths: Sequence[int] | None = None) -> None:  # fmt: skip
        _check(config)
        self.config = config
        self.env = env or init_env(config)
        self.device = self.env.device
        if env is not None:
            check_device(self.device)  # an env from the caller, made without init_env
        self.task = task
        self.train_data = train_data
        self.out_dir = Path(config.out_dir)
        self.model = compile_model(model.to(self.device), config.compile, config.compile_mode,
                                   recompute=config.compile_recompute, tune=config.compile_tuning)

        check_fits(config, len(train_data), self.env.world_size)
        self.sampler = ResumableBatchSampler(
            len(train_data), config.batch_size, rank=self.env.rank, world_size=self.env.world_size,
            seed=config.seed, multiple_of=config.accumulation, lengths=lengths,
        )  # fmt: skip
        self.steps_per_epoch = self.sampler.batches_per_epoch // config.accumulation
        self.samples_per_step = config.batch_size * config.accumulation * self.env.world_size
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        # The loader draws worker seeds from its own generator, not from the global RNG, so creating
        # a loader mid-epoch on resume leaves the global RNG exactly where the first run had it.
        self.loader = DataLoader(
            train_data, batch_sampler=self.sampler, collate_fn=collate_fn, num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(config.seed),
        )  # fmt: skip

        if groups is None:
            groups = param_groups(self.model, config.weight_decay, decay_1d=config.decay_1d)
        self.optimizer = adamw(groups, config.lr)
        try:
            self.scheduler = WarmupCosineRestarts(
                self.optimizer, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                cycle_steps=config.cycle_steps or self.total_steps,
            )  # fmt: skip
        except ValueError as err:  # warmup longer than an epoch-based run
            raise config_lib.ConfigError(f"train: {err}") from None
        self.precision = self._resolve_precision()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.wrapped: nn.Module = self.model
        if self.env.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            unused = config.find_unused_parameters
            self.wrapped = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=unused)
        self.step = self.epoch = self.step_in_epoch = 0
        self.history: list[dict[str, float]] = []
        self.evaluations: list[dict[str, float]] = []
        self.logged_evaluations: list[dict[str, float]] = []  # metrics.jsonl's at the resumed step (_start)
        self.writer = None
        # This process's logs since the last train record: per-step values summed over window_steps
        # steps, seconds in those steps (busy, data loading included) and waiting for the loader.
        # A checkpoint holds them: a resumed run's first record then averages the steps an
        # uninterrupted run's would, not only those made after the resume.
        self.window: dict[str, Any] = {}
        self.window_steps = 0
        self.busy = self.data_wait = 0.0

    def _resolve_precision(self) -> str:
        requested = self.config.precision
        if self.device.type != "cuda" and requested in ("bf16", "fp16"):
            self._print(f"precision={requested} applies to GPUs; training in fp32 on {self.device}")
        return resolve_precision(requested, self.device)

    def _autocast(self):
        return autocast_for(self.device, self.precision)

    def _print(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message, file=sys.stdout)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, rng: dict[str, Any] | None = None) -> Path:
        """Write ``out_dir/checkpoint.pt`` atomically, with ``rng`` (default: the current RNG state)
        as this process's; every process must call it."""
        window = {"sums": {k: float(v) for k, v in self.window.items()}, "steps": self.window_steps,
                  "busy": self.busy, "data_wait": self.data_wait}  # fmt: skip
        states, windows = zip(*distributed.all_gather_object((rng if rng is not None else rng_state(), window)))
        path = self.out_dir / CHECKPOINT_FILE
        if self.env.is_main:
            payload = {
                "format": "meld-clara-train/1", "config": config_lib.to_dict(self.config),
                "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "samples_per_step": self.samples_per_step, "rng": list(states), "window": list(windows),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            }  # fmt: skip
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        distributed.barrier()
        return path

    def _resume(self) -> bool:
        path = self.out_dir / CHECKPOINT_FILE
        if self.config.resume is False or not path.is_file():
            if self.config.resume is True:
                raise CheckpointError(f"{path}: train.resume=true but there is no checkpoint to resume from")
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable training checkpoint ({_load_failure(err)}); {_START_OVER}") from None
        if not isinstance(state, dict) or state.get("format") != "meld-clara-train/1":
            raise CheckpointError(f"{path}: not a meld-clara training checkpoint; delete it or set train.resume=false")
        self._load_model(path, state)
        self._restore_optimisation(path, state)
        with _restoring(path, "position"):
            self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
            if state["samples_per_step"] != self.samples_per_step:
                # Another batch size or process count: continue from the same sample of the epoch, not exactly.
                self.step_in_epoch = min(self.step_in_epoch * state["samples_per_step"] // self.samples_per_step,
                                         self.steps_per_epoch)
                self._print(f"{path}: batch geometry changed since the checkpoint; resuming approximately")
        with _restoring(path, "RNG and log state"):
            self._restore_process_state(state)
        self._print(f"resumed from {path} at step {self.step} (epoch {self.epoch})")
        return True

    def _load_model(self, path: Path, state: Mapping[str, Any]) -> None:
        """The checkpoint's weights into the model; a CheckpointError listing what differs when they are
        another model's (torch's own error is a multi-line traceback that does not name the file)."""
        with _restoring(path, "model"):
            problems = fit_problems(self.model.state_dict(), state["model"])
        if problems:
            raise CheckpointError(f"{path}: written for another model: {' | '.join(problems)}; {_START_OVER}")
        with _restoring(path, "model"):
            self.model.load_state_dict(state["model"])

    def _restore_optimisation(self, path: Path, state: Mapping[str, Any]) -> None:
        """The optimiser, schedule and grad-scaler states, with every group's rate at the resumed step."""
        with _restoring(path, "optimizer state"):
            self.optimizer.load_state_dict(state["optimizer"])
        with _restoring(path, "schedule state"):
            # The step count from the checkpoint, the schedule's shape from this run's settings: a run
            # continued to more steps (cycle_steps 0: one cosine over the run) follows the longer run's
            # cosine from here, as if planned that long, instead of restarting a cycle of the old length.
            # For a plain resume the two are the same.
            shape = ("peak_lr", "min_lr", "warmup_steps", "cycle_steps")
            self.scheduler.load_state_dict({k: v for k, v in state["scheduler"].items() if k not in shape})
            rates = self.scheduler.get_lr()  # at the resumed step; the optimiser state held the old schedule's
            for group, rate in zip(self.optimizer.param_groups, rates):
                group["lr"] = rate
        with _restoring(path, "grad scaler state"):
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])

    def _restore_process_state(self, state: Mapping[str, Any]) -> None:
        """This process's RNG states and unrecorded logs, when the checkpoint has one per process; else a
        seed of its own for the step (another process count cannot continue the RNG streams exactly)."""
        if len(state["rng"]) != self.env.world_size:
            seed_everything(self.config.seed + self.env.rank + self.step)
            return
        set_rng_state(state["rng"][self.env.rank])
        if "window" in state:  # not in a checkpoint written before it was saved
            window = state["window"][self.env.rank]
            self.window, self.window_steps = dict(window["sums"]), window["steps"]
            self.busy, self.data_wait = window["busy"], window["data_wait"]

    # -- logging and evaluation ----------------------------------------------------------------

    def _record(self, prefix: str, values: dict[str, float]) -> None:
        record = {"step": self.step, **{f"{prefix}/{k}": v for k, v in values.items()}}
        (self.history if prefix == "train" else self.evaluations).append(record)
        if not self.env.is_main:
            return
        # Both logs take the record, or neither: a resume runs again an evaluation metrics.jsonl lacks,
        # so a Ctrl-C between the two writes would leave its point in TensorBoard twice.
        with _interrupts_deferred():
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, self.step)
            self.writer.flush()
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.config.print_logs:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            self._print(f"[{prefix} step {self.step}/{self.total_steps}] {shown}")

    def _trim_metrics(self, last_kept: int) -> list[dict[str, Any]]:
        """Keep only the ``metrics.jsonl`` records up to step ``last_kept``; returns the evaluation
        records kept at step ``last_kept`` (on the main process, which writes the file; [] elsewhere)."""
        path = self.out_dir / METRICS_FILE
        if not (self.env.is_main and path.is_file()):
            return []
        steps = [(line, _record_step(line)) for line in path.read_text(encoding="utf-8").splitlines()]
        kept = [line for line, step in steps if step is not None and step <= last_kept]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        records = (json.loads(line) for line, step in steps if step == last_kept)
        return [record for record in records if any(key.startswith("eval/") for key in record)]

    def _log_due(self) -> bool:
        """Whether a train record is due at the current step."""
        return self.step % self.config.log_every == 0 or self.step == self.total_steps

    def _log_window(self, progress: tqdm) -> None:
        """Record the means of the window's logs (over its steps and the processes), and start a new window."""
        steps = self.window_steps
        means = {k: float(v) / steps for k, v in self.window.items()}
        means["samples_per_s"] = steps * self.samples_per_step / max(self.busy, 1e-9)
        # Loader time against step time: a GPU-bound run waits ~0 s for its batches.
        means["step_s"] = self.busy / steps
        means["data_wait_s"] = self.data_wait / steps
        means = distributed.all_reduce_mean(means, self.device)
        progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
        # The record and the new window together: a Ctrl-C between the two would have the interrupted
        # run, which records a due window before it saves, record this one twice.
        with _interrupts_deferred():
            self._record("train", means)
            self.window, self.window_steps, self.busy, self.data_wait = {}, 0, 0.0, 0.0

    def _evaluation_due(self) -> bool:
        """Whether eval_every or eval_every_epoch asks for an evaluation at the current step."""
        every_steps = self.config.eval_every and self.step % self.config.eval_every == 0
        epoch_end = self.config.eval_every_epoch and self.step_in_epoch == self.steps_per_epoch
        return bool(every_steps or epoch_end)

    def evaluate(self) -> dict[str, float]:
        """The task's held-out metrics at the current step (empty if the task has no ``evaluate``, or
        none this run, such as pretraining without ``data.eval``: nothing is then logged)."""
        metrics: dict[str, float] = {}
        failure: Exception | None = None
        if hasattr(self.task, "evaluate") and self.env.is_main:
            try:
                self.model.eval()
                with preserved_rng(), torch.no_grad(), self._autocast():
                    metrics = {k: float(v) for k, v in self.task.evaluate(self.model).items()}
                self.model.train()
                if metrics:
                    self._record("eval", metrics)
            except Exception as err:  # a sweep pruning the trial, a full disk
                failure = err
        if self.env.world_size > 1:
            # The other processes wait for the main one here; an exception that left it alone would
            # leave them waiting (NCCL: until its timeout) while a caller that catches it goes on.
            # Every process raises it instead.
            shared = distributed.all_gather_object(_picklable(failure))[0]
            failure = failure if self.env.is_main else shared
        if failure is not None:
            raise failure
        return metrics

    # -- training ------------------------------------------------------------------------------

    def _train_step(self, batches: Iterator[Any]) -> dict[str, Any]:
        """The gradients of one optimiser step over ``accumulation`` micro-batches (clipped; ``_update``
        applies them); returns the summed logs."""
        accumulation = self.config.accumulation
        sums: dict[str, Any] = {}
        for micro in range(accumulation):
            tick = time.perf_counter()
            try:
                batch = next(batches)
            except Exception as err:
                original = worker_error(err)
                if original is err:
                    raise
                raise original from None
            self.data_wait += time.perf_counter() - tick
            batch = move_to(batch, self.device)
            # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
            last = micro == accumulation - 1
            sync = nullcontext() if last or self.env.world_size == 1 else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    loss, logs = self.task.training_step(self.wrapped, batch)
                scaled = loss / accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for key, value in {"loss": loss, **logs}.items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                sums[key] = sums.get(key, 0.0) + value / accumulation
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        limit = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit).detach().float()
        return sums

    def _update(self) -> float:
        """Apply the step's gradients and advance the schedule; returns the rate the step used (by the first group)."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]  # what this step used (the scheduler set it)
        self.scheduler.step()
        return lr

    def _start(self) -> int | None:
        """Resume or seed, and open the logs; returns the step resumed from (None for a fresh run)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.env.is_main:
            # A run killed while saving left its staging file, as large as a checkpoint. Only a command
            # line's own folder is cleared by run_dir.claim; not a fine-tune's seed-N folders, nor a
            # run folder a sweep or notebook hands over. No one else writes here before training starts.
            remove_leftovers(self.out_dir)
        resumed = self._resume()
        if not resumed:
            seed_everything(self.config.seed + self.env.rank)
            if self.env.is_main:
                # train.resume=false in a run's folder: its logs are dropped below, and its checkpoint
                # must go with them; left until this run's first save, a rerun after a kill (or a crash)
                # would resume the old run's weights under this run's first records.
                (self.out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        # Records past the checkpoint were written by the interrupted run; a fresh run drops them all.
        last_kept = self.step if resumed else -1
        # Those of an evaluation at the checkpoint's step say it finished (its record is written once the
        # task's evaluate returns); every process goes by the main one's file.
        self.logged_evaluations = distributed.all_gather_object(self._trim_metrics(last_kept))[0]
        if self.env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=last_kept + 1)
        self._print(
            f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch) on {self.device} in {self.precision}: "
            f"{self.config.batch_size} x {self.config.accumulation} x {self.env.world_size} samples per step; "
            f"output in {self.out_dir}"
        )
        if resumed and self.step >= self.total_steps:
            self._print(f"the checkpoint already holds all {self.total_steps} steps; train.resume=false starts over")
        return self.step if resumed else None

    def fit(self) -> FitResult:
        """Train from scratch or from ``out_dir``'s checkpoint to ``total_steps``; returns the logs."""
        resumed_from = self._start()
        started = time.perf_counter()
        if resumed_from is None and self.config.eval_at_start:
            self.evaluate()
        # Training mode from the first step: a loaded checkpoint comes in eval mode, and so does a model
        # its caller ran for inference first (the linear probe encodes).  Only an evaluation switched it
        # back, so the first epoch, the first after a resume, and all of a DDP process other than the
        # main one (it never evaluates) trained with dropout off.
        self.model.train()
        show = self.config.progress and self.env.is_main and sys.stderr.isatty()
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not show, dynamic_ncols=True, unit="step")
        step_start_rng = rng_state()  # what a checkpoint of the last finished step must hold
        try:
            # The evaluation due at the checkpoint's step, when the interrupted run saved that step while
            # evaluating (a Ctrl-C in a large held-out set): the loop goes on from the next step, so it
            # would never run, and a fine-tune would never weigh that epoch's weights as its best.
            if resumed_from is not None and self.step < self.total_steps and not self.logged_evaluations \
                    and self._evaluation_due():
                self.evaluate()
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * self.config.accumulation)
                if hasattr(self.train_data, "set_epoch"):
                    self.train_data.set_epoch(self.epoch)
                batches = iter(self.loader)
                while self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                    tick = time.perf_counter()
                    sums = self._train_step(batches)
                    # The weights, the step count and the window's logs change together: a Ctrl-C landing
                    # between them saved weights a step ahead of their step, which the resumed run then
                    # applied again (or a window lacking a step the resumed run does not make again).
                    with _interrupts_deferred():
                        sums["lr"] = self._update()
                        step_start_rng = rng_state()
                        self.step, self.step_in_epoch, self.window_steps = self.step + 1, self.step_in_epoch + 1, self.window_steps + 1
                        for key, value in sums.items():
                            self.window[key] = self.window.get(key, 0.0) + value
                    logs = self._log_due()
                    if logs and self.device.type == "cuda":
                        # Steps only queue GPU work; without this the window's last queued steps
                        # would be timed in no window, and step_s would read low (once per window).
                        torch.cuda.synchronize(self.device)
                    self.busy += time.perf_counter() - tick
                    progress.update(1)
                    if logs:
                        self._log_window(progress)
                    if self.step < self.total_steps:  # the last step is evaluated and saved below
                        if self._evaluation_due():
                            self.evaluate()
                        if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                            self.save()
                if self.step_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
            progress.close()
            if self.step == resumed_from and self.logged_evaluations:
                # A finished run given again: its final evaluation is logged (metrics.jsonl, TensorBoard,
                # and whatever the task kept, such as a fine-tune's best weights) and is not repeated,
                # so a rerun leaves the logs as they were; the caller gets the logged records.
                if self.env.is_main:
                    self.evaluations.extend(self.logged_evaluations)
            else:
                # Inside the handler: a Ctrl-C during the last evaluation (a large held-out set) used to
                # lose every step since the last checkpoint, the whole run where checkpoint_every is 0.
                self.evaluate()
            if self.step != resumed_from:  # else the checkpoint it resumed from holds this very state
                self.save()
        except KeyboardInterrupt:
            # Single process only (under DDP the others may be gone already), stored as if the
            # unfinished step had never started.
            if self.env.world_size == 1 and self.step > (resumed_from or 0):
                # Ctrl-C after the last finished step but before its due record: the resumed run starts
                # after that step, so only this run can record it.
                if self.window_steps and self._log_due():
                    self._log_window(progress)
                self._print(f"interrupted: saving step {self.step} to {self.save(step_start_rng)}")
            raise
        finally:
            progress.close()
        if self.writer is not None:
            self.writer.close()
        seconds = time.perf_counter() - started
        return FitResult(self.step, self.epoch, seconds, resumed_from, self.history, self.evaluations)
