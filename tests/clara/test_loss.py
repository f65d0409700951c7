"""The contrastive loss against a naive per-row statement, alone and gathered across processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from clara.loss import ContrastiveLoss
from tests.clara.two_processes import run_on_two_processes


def naive_loss(audio, text, audio_scale, text_scale):
    """The seed's formula written out row by row with plain Python sums."""
    n = audio.shape[0]
    total = 0.0
    for k in range(n):
        a_logits = [audio_scale * float(audio[k] @ text[j]) for j in range(n)]
        t_logits = [text_scale * float(text[k] @ audio[j]) for j in range(n)]
        total += -(a_logits[k] - math.log(sum(math.exp(x) for x in a_logits)))
        total += -(t_logits[k] - math.log(sum(math.exp(x) for x in t_logits)))
    return total / (2 * n)


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_loss_equals_naive_per_row_statement():
    audio, text = unit(6, 8, 1), unit(6, 8, 2)
    loss = ContrastiveLoss()(audio, text, torch.tensor(14.0, dtype=torch.float64), torch.tensor(9.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(naive_loss(audio, text, 14.0, 9.0), rel=1e-12)


def test_separate_temperatures_matter_and_perfect_pairs_give_low_loss():
    audio = unit(4, 8, 3)
    loss = ContrastiveLoss()
    assert loss(audio, audio, torch.tensor(100.0), torch.tensor(100.0)) < 1e-3
    a = loss(audio, unit(4, 8, 4), torch.tensor(10.0), torch.tensor(1.0))
    b = loss(audio, unit(4, 8, 4), torch.tensor(1.0), torch.tensor(10.0))
    assert a.item() != pytest.approx(b.item())


def _worker(rank, world, port, audio, text, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    per = audio.shape[0] // world
    local_audio = audio[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    local_text = text[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    loss = ContrastiveLoss(gather=True)(local_audio, local_text, torch.tensor(12.0), torch.tensor(7.0))
    loss.backward()
    queue.put((rank, loss.item(), local_audio.grad.tolist()))  # plain lists: no shared memory
    queue.close()
    queue.join_thread()
    dist.barrier()
    # Leave without running gloo's C++ teardown, which can abort a process whose peer has already
    # gone; the results are delivered and both processes are past their last collective.
    os._exit(0)


def test_gathered_loss_on_two_processes_equals_single_process_loss():
    audio, text = unit(8, 16, 5).float(), unit(8, 16, 6).float()
    full_audio = audio.clone().requires_grad_(True)
    expected = ContrastiveLoss()(full_audio, text, torch.tensor(12.0), torch.tensor(7.0))
    expected.backward()
    results = run_on_two_processes(_worker, audio, text)
    for rank, value, grad in results:
        assert value == pytest.approx(expected.item(), abs=1e-6)
        # Each process holds the full loss; DDP averages gradients over the 2 processes, and the
        # gather's backward sums both processes' contributions: together the single-process gradient.
        assert torch.allclose(torch.tensor(grad) / 2, full_audio.grad[rank * 4:(rank + 1) * 4], atol=1e-6)
