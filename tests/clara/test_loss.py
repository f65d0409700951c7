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


def test_logits_stay_fp32_under_autocast():
    """Under bf16 autocast the similarity matmul ran in bf16: its entries were off by up to 1.4e-3
    and, at scale 100, the loss of these pairs by 9e-3.  Now the similarity is fp32 (the products of
    the inputs as given, also of bf16 ones) and the loss is the naive float64 one within 1e-5."""
    audio, text = unit(8, 32, 8).float(), unit(8, 32, 9).float()
    loss_fn = ContrastiveLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        similarity = loss_fn.similarity(audio, text)  # [8, 8]
        from_bf16 = loss_fn.similarity(audio.bfloat16(), text.bfloat16())
        loss = loss_fn(audio, text, torch.tensor(100.0), torch.tensor(100.0))
    assert similarity.dtype == from_bf16.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(similarity, audio @ text.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_bf16, audio.bfloat16().float() @ text.bfloat16().float().T, rtol=0, atol=1e-6)
    assert loss.item() == pytest.approx(naive_loss(audio.double(), text.double(), 100.0, 100.0), abs=1e-5)


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


def naive_loss_tensor(audio, text, audio_scale, text_scale):
    """``naive_loss`` in torch ops, element by element, so that autograd gives reference gradients."""
    n = audio.shape[0]
    total = 0.0
    for k in range(n):
        a_logits = torch.stack([audio_scale * (audio[k] * text[j]).sum() for j in range(n)])
        t_logits = torch.stack([text_scale * (text[k] * audio[j]).sum() for j in range(n)])
        total = total - (a_logits[k] - torch.logsumexp(a_logits, 0)) - (t_logits[k] - torch.logsumexp(t_logits, 0))
    return total / (2 * n)


class Towers(torch.nn.Module):
    """Two linear towers to unit-norm embeddings and one log-temperature per modality, as in Clara."""

    def __init__(self):
        super().__init__()
        self.audio = torch.nn.Linear(5, 4, dtype=torch.float64)
        self.text = torch.nn.Linear(6, 4, dtype=torch.float64)
        generator = torch.Generator().manual_seed(0)  # the same weights in every process and the reference
        with torch.no_grad():
            for p in (*self.audio.parameters(), *self.text.parameters()):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
        self.audio_log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.text_log_scale = torch.nn.Parameter(torch.tensor(math.log(4.0), dtype=torch.float64))

    def forward(self, x_audio, x_text):
        return (F.normalize(self.audio(x_audio), dim=-1), F.normalize(self.text(x_text), dim=-1),
                self.audio_log_scale.exp(), self.text_log_scale.exp())


def _ddp_worker(rank, world, port, x_audio, x_text, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    per = x_audio.shape[0] // world
    ddp = torch.nn.parallel.DistributedDataParallel(Towers())
    loss_fn = ContrastiveLoss(gather=True)
    local = (x_audio[rank * per:(rank + 1) * per], x_text[rank * per:(rank + 1) * per])
    # This process's own gradient of the temperatures (no all-reduce): from the full gathered matrix.
    with ddp.no_sync():
        loss_fn(*ddp(*local)).backward()
    own_scales = [ddp.module.audio_log_scale.grad.item(), ddp.module.text_log_scale.grad.item()]
    ddp.zero_grad()
    audio, text, audio_scale, text_scale = ddp(*local)
    similarity = loss_fn.similarity(audio, text)
    loss = loss_fn.from_similarity(similarity, audio_scale, text_scale)
    loss.backward()  # DDP all-reduces (averages) the gradients here
    grads = {name: p.grad.tolist() for name, p in ddp.module.named_parameters()}
    queue.put((rank, loss.item(), similarity.tolist(), own_scales, grads))  # plain lists: no shared memory
    queue.close()
    queue.join_thread()
    dist.barrier()
    os._exit(0)  # as in _worker: no gloo teardown after the peer may have gone


def test_ddp_with_gathered_negatives_gives_the_global_batch_gradients_of_every_parameter():
    """Two DDP processes of 4 pairs each against one naive computation on the 8 pairs: every
    parameter's gradient, both towers and both temperatures, after DDP's averaging; each process's
    own temperature gradients (before it) are the global ones already, so the average keeps them."""
    generator = torch.Generator().manual_seed(7)
    x_audio = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    x_text = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    reference = Towers()
    audio, text, audio_scale, text_scale = reference(x_audio, x_text)
    expected = naive_loss_tensor(audio, text, audio_scale, text_scale)
    expected.backward()
    results = run_on_two_processes(_ddp_worker, x_audio, x_text)
    assert results[0][4] == results[1][4]  # the same gradients in both processes, to the bit
    for rank, value, similarity, own_scales, grads in results:
        assert value == pytest.approx(expected.item(), rel=1e-12)
        assert torch.allclose(torch.tensor(similarity, dtype=torch.float64), audio.detach() @ text.detach().T, atol=1e-12)
        assert own_scales == pytest.approx([reference.audio_log_scale.grad.item(), reference.text_log_scale.grad.item()],
                                           rel=1e-10)
        for name, p in reference.named_parameters():
            assert torch.allclose(torch.tensor(grads[name], dtype=torch.float64), p.grad, rtol=1e-10, atol=1e-12), name
