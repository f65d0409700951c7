"""A refusal for work asked of a worker process while it is still starting.

The demo build and ``meld.prepare`` run their workers as spawned (or forkserver) processes, and each
such process first runs the top level of the script that started it (as ``__mp_main__``). A script
that builds the demo or prepares features at its top level, not under ``if __name__ == "__main__":``,
then had every worker start the same job and wait for the lock its parent held: both waited forever.
"""

from __future__ import annotations

import multiprocessing


def refuse_in_a_starting_worker(what: str) -> None:
    """Raise RuntimeError naming ``what`` (e.g. "meld.prepare.prepare") when called while this
    process is a worker still importing its parent's script."""
    # multiprocessing's own test for "started a process while bootstrapping" (spawn._check_not_importing_main).
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"{what} was called while a worker process was starting: a script that calls it must "
                           "do so under `if __name__ == \"__main__\":`, as its worker processes run the script's "
                           "top level")
