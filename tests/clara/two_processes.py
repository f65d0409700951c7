"""Two spawned processes on one machine (gloo over localhost), for tests of what DDP promises."""

from __future__ import annotations

import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_two_processes(worker: Callable[..., None], *args: Any) -> list[Any]:
    """Run ``worker(rank, 2, port, *args, queue)`` in two spawned processes; each puts one result on
    the queue and exits 0.  Returns the results sorted (a result starting with its rank comes in rank
    order)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, 2, port, *args, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
