"""Shared by the pretraining tests and the zero-shot tests that pretrain a demo CLARA."""

from __future__ import annotations

from clara.pretrain import ContrastiveTask


def interrupt_pretraining_at_step(patch, step: int) -> None:
    """Make ``ContrastiveTask.training_step`` raise KeyboardInterrupt (Ctrl-C) at its ``step``-th call,
    after the earlier steps trained normally; ``patch`` is a pytest monkeypatch (or its context)."""
    calls = []
    original = ContrastiveTask.training_step

    def training_step(self, model, batch):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return original(self, model, batch)

    patch.setattr(ContrastiveTask, "training_step", training_step)
