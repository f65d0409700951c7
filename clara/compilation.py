"""``torch.compile`` for CLARA and the models built on it, in place, whole or block by block.

``compile_model(model, scope="model")`` compiles the whole forward (and so its backward) into one
graph: the most fusion, the longest cold start.  ``scope="blocks"`` compiles each repeated block
(every module whose class sets ``compile_unit = True``: the latent blocks, the text layers, the
cross-attention and its feed-forward) on its own; blocks of one class share their compiled code, so
the cold start is a few blocks' worth, and everything between blocks stays eager.

``mode`` is ``torch.compile``'s: ``"default"``, ``"reduce-overhead"`` (CUDA graphs: one launch per
graph replay instead of one per kernel) or ``"max-autotune-no-cudagraphs"``.  Compiling is in place
(``nn.Module.compile``), so parameter names, ``state_dict`` and checkpoints are unchanged.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

Scope = Literal["off", "model", "blocks"]
Mode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]
SCOPES: tuple[str, ...] = get_args(Scope)
MODES: tuple[str, ...] = get_args(Mode)


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


def compile_model(model: nn.Module, scope: Scope = "model", mode: Mode = "default", *, dynamic: bool | None = None) -> nn.Module:
    """Compile ``model`` in place as ``scope`` says and return it.

    ``dynamic=None`` lets torch.compile specialise on the first shapes and recompile once with
    dynamic sizes when they change (variable clip and text lengths); ``True`` starts dynamic.
    """
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r}: expected one of {', '.join(SCOPES)}")
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(MODES)}")
    if scope == "model":
        model.compile(mode=mode, dynamic=dynamic)
    elif scope == "blocks":
        units = compile_units(model)
        if not units:
            raise ValueError(f"{type(model).__name__} has no blocks to compile (no module sets compile_unit = True)")
        for unit in units:
            unit.compile(mode=mode, dynamic=dynamic)
    return model
