"""clara.precision: what each setting means per device, and the autocast it gives."""

from __future__ import annotations

import pytest
import torch

from clara.precision import PRECISIONS, autocast_for, resolve_precision


def test_a_cpu_always_runs_fp32():
    assert {resolve_precision(p, torch.device("cpu")) for p in PRECISIONS} == {"fp32"}


@pytest.mark.parametrize("bf16_supported, auto", [(True, "bf16"), (False, "fp16")])
def test_on_cuda_auto_is_the_fast_type_and_explicit_values_hold(monkeypatch, bf16_supported, auto):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == auto
    assert [resolve_precision(p, cuda) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision 'fp8': expected one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", torch.device("cpu"))


def test_autocast_for_enters_autocast_only_below_fp32():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast_for(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu") and layer(x).dtype == torch.float32
    with autocast_for(torch.device("cpu"), "bf16"):
        assert layer(x).dtype == torch.bfloat16
