"""``torch.compile`` for CLARA and the models built on it, in place, whole or block by block.

``compile_model(model, scope="model")`` compiles the whole forward (and so its backward) into one
graph: the most fusion, the longest cold start.  ``scope="blocks"`` compiles each repeated block
(every module whose class sets ``compile_unit = True``: the latent blocks, the text layers, the
cross-attention and its feed-forward) on its own; blocks of one class share their compiled code, so
the cold start is a few blocks' worth, and everything between blocks stays eager.

``mode`` is ``torch.compile``'s: ``"default"``, ``"reduce-overhead"`` (CUDA graphs: one launch per
graph replay instead of one per kernel), ``"max-autotune-no-cudagraphs"`` (matmul and kernel
configurations benchmarked at compile time: minutes of warm-up) or ``"max-autotune"`` (both).
Compiling is in place (``nn.Module.compile``), so parameter names, ``state_dict`` and checkpoints
are unchanged.

``recompute`` sets how much the compiler recomputes in the backward pass instead of keeping it from
the forward pass (its partitioner's choice, never a matmul, attention or reduction):

* ``"default"``: PyTorch's speed-first choice.  It keeps every elementwise result that a backward
  matmul reads: each norm's output and each GEGLU's a·GELU(g) product, beside the matmul outputs
  they come from.  CLARA medium (bf16 autocast and latent stream) keeps about 135 MiB per sample.
* ``"pointwise"``: such results are recomputed from what is kept anyway (a norm's input and
  statistics, the GEGLU's a and g), by one elementwise kernel in the backward pass; about 100 MiB
  per sample.  No block is run again: not activation checkpointing.
* ``"aggressive"``: PyTorch's ``aggressive_recomputation``: also longer elementwise chains and
  values used far apart; about 89 MiB per sample.

(The per-sample figures are ``bench/bench_memory.py``'s, on CPU.)

``tune=True`` turns on inductor's coordinate-descent tuning: each generated GPU kernel's launch
settings (block sizes, warps) are searched by timing it when it is compiled.  It costs compile time
(14-26 s more warm-up for training in the H200 runs, with compile caches already warm); as it only
picks launch settings, results change at most by rounding (not checked on a GPU); on the CPU it does
nothing.  On the H200 it made the medium step 2.3% faster (1,829 -> 1,871 samples/s, batch 64, CUDA
graphs, one run); inference ran at 5,921 samples/s with it (batch 256) against 5,683-5,891 without
it in other runs.

The partitioner and inductor read these settings when they compile, which happens lazily on the
first call and again on each new input shape, so ``compile_model`` sets them for the whole process:
the last call's choice holds.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch import nn

Scope = Literal["off", "model", "blocks"]
Mode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]
Recompute = Literal["default", "pointwise", "aggressive"]
SCOPES: tuple[str, ...] = get_args(Scope)
MODES: tuple[str, ...] = get_args(Mode)
RECOMPUTES: tuple[str, ...] = get_args(Recompute)


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules whose class declares ``compile_unit = True``, in module order."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if getattr(type(child), "compile_unit", False):
                units.append(child)
            else:
                visit(child)

    visit(model)
    return units


def set_recompute(recompute: Recompute) -> None:
    """Set the partitioner's recomputation level for every later compilation in this process."""
    if recompute not in RECOMPUTES:
        raise ValueError(f"compile recompute {recompute!r}: expected one of {', '.join(RECOMPUTES)}")
    functorch_config.ban_recompute_materialized_backward = recompute == "default"
    functorch_config.aggressive_recomputation = recompute == "aggressive"


def set_tuning(tune: bool) -> None:
    """Inductor's coordinate-descent kernel tuning on or off for every later compilation in this process."""
    inductor_config.coordinate_descent_tuning = bool(tune)


def compile_model(model: nn.Module, scope: Scope = "model", mode: Mode = "default", *, dynamic: bool | None = None,
                  recompute: Recompute = "default", tune: bool = False, backend: str | Callable = "inductor") -> nn.Module:  # fmt: skip
    """Compile ``model`` in place as ``scope`` says and return it.

    ``dynamic=None`` lets torch.compile specialise on the first shapes and recompile once with
    dynamic sizes when they change (variable clip and text lengths); ``True`` starts dynamic.
    ``recompute``, ``tune``: see the module docstring (with ``scope="off"`` they are ignored).
    ``backend``: torch.compile's, a name or a callable (a test's compile counter); another than
    ``"inductor"`` (``"aot_eager_decomp_partition"``: the same decompositions and partitioner, no
    generated kernels) takes no ``mode``.
    """
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r}: expected one of {', '.join(SCOPES)}")
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(MODES)}")
    if recompute not in RECOMPUTES:
        raise ValueError(f"compile recompute {recompute!r}: expected one of {', '.join(RECOMPUTES)}")
    if scope != "off":
        set_recompute(recompute)
        set_tuning(tune)
    options = {"mode": mode} if backend == "inductor" else {}
    if scope == "model":
        model.compile(backend=backend, dynamic=dynamic, **options)
    elif scope == "blocks":
        units = compile_units(model)
        if not units:
            raise ValueError(f"{type(model).__name__} has no blocks to compile (no module sets compile_unit = True)")
        for unit in units:
            unit.compile(backend=backend, dynamic=dynamic, **options)
    return model
