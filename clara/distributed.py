"""Process-group set-up from ``torchrun``'s environment, and the few collectives the engine needs.

Run under ``torchrun --nproc_per_node N``, every process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` and joins one group: NCCL when it drives a GPU, gloo on CPU.  Run as a plain
``python -m ...``, there is one process and nothing is initialised; every helper here then
degrades to the single-process answer.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer (set by torchrun)") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def init(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: the process group's, else torchrun's ``RANK``
    and ``WORLD_SIZE`` (before ``init``, after ``shutdown``), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """Whether this process is the main one (rank 0, or the only one): the one that prints and writes
    a driver's files.  Answers before ``init`` and after ``shutdown`` too, from torchrun's ``RANK``."""
    return _rank_and_world()[0] == 0


def main_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main process only: under torchrun every process runs the same driver."""
    if is_main():
        print(*args, **kwargs)


def print_error(err: BaseException, *, same_everywhere: bool) -> None:
    """A user error as one ``error:`` line on stderr.  Under torchrun every process meets an error in
    the settings (``same_everywhere``), so the main process alone says it; one that may be a single
    process's own (a clip in its shard that does not decode) is said by each process that meets it,
    with its rank."""
    if same_everywhere:
        main_print(f"error: {err}", file=sys.stderr)
        return
    rank, world = _rank_and_world()
    print(f"error: {f'(rank {rank}) ' if world > 1 else ''}{err}", file=sys.stderr)


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over processes (every process must pass the same keys)."""
    if not is_active() or not values:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    reduced = dict(zip(keys, stacked.tolist()))
    return {key: reduced[key] for key in values}  # in the caller's order, as one process logs them


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-item list without a process group)."""
    if not is_active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shutdown() -> None:
    """Leave the process group, and let it go (with its worker threads) while Python still runs.

    destroy_process_group drops only the registry's reference. A model wrapped in DDP keeps the group
    alive through its reducer, and the fine-tune Trainer and its task refer to each other, so the group
    lived on in a reference cycle until the collection at interpreter exit. There a gloo worker thread,
    releasing the last collective's tensors, needs the GIL, and a thread taking the GIL during
    finalization is ended mid-destructor: "terminate called without an active exception", an abort
    after the run had finished (seen in about 1 in 12 two-process runs on a loaded 2-core machine).
    Collecting here frees the cycle, and the group's destructor joins its threads first.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
