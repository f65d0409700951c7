"""AdamW parameter groups and the warmup + cosine-with-restarts schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clara.optim import WarmupCosineRestarts, adamw, lr_at, param_groups

REFERENCE = dict(lr=1e-4, min_lr=1e-6, warmup_steps=1000, cycle_steps=5000)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_split_matrices_from_vectors_and_skip_frozen():
    net = _Net()
    decay, no_decay = param_groups(net, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net.linear.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net.linear.bias), id(net.norm.weight), id(net.norm.bias), id(net.scale)}
    (everything,) = param_groups(net, 0.01, decay_1d=True)
    assert len(everything["params"]) == 5


def test_adamw_over_param_groups():
    optimizer = adamw(param_groups(_Net(), 0.1), 1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_reference_schedule_points():
    assert lr_at(0, **REFERENCE) == pytest.approx(1e-6)
    assert lr_at(500, **REFERENCE) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(1000, **REFERENCE) == pytest.approx(1e-4)  # the peak, after the warmup
    assert lr_at(3000, **REFERENCE) == pytest.approx((1e-4 + 1e-6) / 2)  # half way down the cosine
    assert lr_at(4999, **REFERENCE) == pytest.approx(1e-6, abs=1e-9)
    assert lr_at(5000, **REFERENCE) == pytest.approx(1e-6)  # restart: warm up again
    assert lr_at(6000, **REFERENCE) == pytest.approx(1e-4)
    assert lr_at(12345, **REFERENCE) == pytest.approx(lr_at(2345, **REFERENCE))


def test_schedule_is_monotone_within_phases():
    rates = [lr_at(step, **REFERENCE) for step in range(5000)]
    assert all(a < b for a, b in zip(rates[:1000], rates[1:1001]))
    assert all(a >= b for a, b in zip(rates[1000:-1], rates[1001:]))
    assert min(rates) >= 1e-6 and max(rates) <= 1e-4 + 1e-12


def test_scheduler_follows_lr_at_and_round_trips_state():
    net = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1.0)
    settings = dict(lr=1e-3, min_lr=1e-5, warmup_steps=3, cycle_steps=10)
    scheduler = WarmupCosineRestarts(optimizer, **settings)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, **settings) for s in range(7)])

    fresh_optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1.0)
    restored = WarmupCosineRestarts(fresh_optimizer, **settings)
    restored.load_state_dict(scheduler.state_dict())
    fresh_optimizer.param_groups[0]["lr"] = restored.get_last_lr()[0]
    fresh_optimizer.step()
    restored.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(8, **settings))


def test_scheduler_scales_each_group_by_its_lr_scale():
    net = _Net()
    optimizer = adamw([{"params": [net.linear.weight], "weight_decay": 0.1, "lr_scale": 0.25},
                       {"params": [net.linear.bias], "weight_decay": 0.0}], 1.0)
    settings = dict(lr=1e-3, min_lr=1e-5, warmup_steps=3, cycle_steps=10)
    scheduler = WarmupCosineRestarts(optimizer, **settings)
    for step in range(6):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * lr_at(step, **settings))
        assert optimizer.param_groups[1]["lr"] == pytest.approx(lr_at(step, **settings))  # no lr_scale: 1
        optimizer.step()
        scheduler.step()


def test_scheduler_rejects_warmup_longer_than_cycle():
    optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineRestarts(optimizer, lr=1e-3, min_lr=0.0, warmup_steps=10, cycle_steps=10)
