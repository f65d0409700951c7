"""Saving and loading CLARA weights.

Our format is a directory holding ``model.safetensors`` (tensors only, no code) and ``config.json``
(the resolved :class:`ClaraConfig`).  ``load_checkpoint`` also reads the reference's Lightning
``.ckpt`` (``state_dict`` under ``model.``, architecture in ``hyper_parameters``).  Pickle-based files
are read with PyTorch's weights-only unpickler, which refuses to run code; the only non-tensor class
allowed in is Lightning's ``AttributeDict`` (a dict with attribute access), read as a plain ``dict``
so Lightning need not be installed.  A file that needs more must be opted into with ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from clara import config as config_lib
from clara.io_utils import atomic_directory
from clara.model import Clara
from clara.model_config import ClaraConfig, from_reference_hparams
from clara.reference_keys import PREFIX, reference_key_map

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong kind, or does not fit the model."""


_LIGHTNING_DICT_NAMES = (
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)


def save_checkpoint(model: Clara, path: str | Path) -> Path:
    """Write ``model`` to the directory ``path`` (replaced atomically if it exists)."""
    path = Path(path)
    with atomic_directory(path) as staging:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "meld-clara"})
        (staging / CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(model.config), indent=2), encoding="utf-8")
    return path


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    if allow_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as err:
            # The full unpickler imports what the file names: a Lightning checkpoint's classes need
            # Lightning installed, which this kit does not require.
            raise CheckpointError(
                f"{path}: its pickled objects need the module {err.name!r}, which is not installed"
            ) from None
        except Exception as err:  # the same non-checkpoints as below, seen by the full unpickler
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    stand_ins = [(dict, name) for name in _LIGHTNING_DICT_NAMES]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch words every refusal the same way; the unpickler's own line says why: a class or
        # function outside the allowed set ("Unsupported global: ...") is a real pickled object,
        # anything else means the file is no pickle at all.
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), None)
        if reason is None:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.load cannot read it)") from None
        reason = reason.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
        raise CheckpointError(
            f"{path}: this checkpoint holds pickled Python objects beyond tensors and dicts "
            f"({reason}); only if you trust its source, load it with load_checkpoint(..., allow_pickle=True) "
            f"(meld.finetune: model.allow_pickle=true; clara.pretrain: init_allow_pickle=true; "
            f"meld.zeroshot: --allow-pickle)"
        ) from None
    except Exception as err:  # torch raises many types (RuntimeError, KeyError, EOFError) for non-checkpoints
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def fit_problems(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                 unexpected: Sequence[str] = ()) -> list[str]:
    """Why ``tensors`` do not load into a model whose ``state_dict()`` is ``expected``: its missing,
    unexpected (plus ``unexpected``, names already known unused) and mis-shaped tensors; [] when they fit."""
    missing = sorted(k for k in expected if k not in tensors)
    mis_shaped = sorted(
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    )
    extra = sorted(set(unexpected) | {k for k in tensors if k not in expected})
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensor(s): {'; '.join(mis_shaped)}")
    return problems


def _check_and_load(model: Clara, tensors: Mapping[str, torch.Tensor], unexpected: Sequence[str], source: Path) -> None:
    expected = model.state_dict()
    problems = fit_problems(expected, tensors, unexpected)
    if problems:
        raise CheckpointError(f"{source}: does not fit the model: " + " | ".join(problems))
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value)


def _stack(parts: Sequence[torch.Tensor], names: Sequence[str], key: str) -> torch.Tensor:
    """One reference tensor as it is, or several concatenated along dim 0 (to_q [H·d, D] then
    to_kv [2·H·d, D] -> qkv [3·H·d, D]); parts that disagree beyond dim 0 are a CheckpointError."""
    if len(parts) == 1:
        return parts[0]
    if len({tuple(part.shape[1:]) for part in parts}) > 1:
        shapes = ", ".join(f"{name} {tuple(part.shape)}" for name, part in zip(names, parts))
        raise CheckpointError(f"mis-shaped tensor(s): {shapes} cannot be stacked into {key}")
    return torch.cat(list(parts))


def reference_to_state_dict(
    reference: Mapping[str, torch.Tensor], config: ClaraConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a reference ``state_dict`` (keys with ``model.``) to ours; also return the unused keys."""
    # Only the ``model.`` entries are the CLARA module's: any other entry of the Lightning state_dict
    # is unused under its own name, neither loaded as a model tensor nor reported as ``model.<key>``.
    stripped = {k[len(PREFIX):]: v for k, v in reference.items() if k.startswith(PREFIX)}
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, sources in reference_key_map(config).items():
        if all(s in stripped for s in sources):
            ours[key] = _stack([stripped[s] for s in sources], [PREFIX + s for s in sources], key)
            used.update(sources)
    unused = sorted([k for k in reference if not k.startswith(PREFIX)] + [PREFIX + k for k in stripped if k not in used])
    return ours, unused


def to_reference_state_dict(model: Clara) -> dict[str, torch.Tensor]:
    """Our weights under the reference's key names (the inverse of ``reference_to_state_dict``)."""
    state = model.state_dict()
    reference: dict[str, torch.Tensor] = {}
    for key, sources in reference_key_map(model.config).items():
        value = state[key].detach().clone()
        # The only fused tensor is the latent qkv: to_q (H·d rows) followed by to_kv (2·H·d rows).
        parts = (value[: value.shape[0] // 3], value[value.shape[0] // 3 :]) if len(sources) > 1 else (value,)
        for source, part in zip(sources, parts):
            reference[PREFIX + source] = part.contiguous()
    return reference


def _reference_parts(path: Path, payload: Mapping[str, Any]) -> tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]:
    """The ``state_dict`` (str -> tensor) and ``hyper_parameters`` (a mapping) of a Lightning
    checkpoint, or a CheckpointError naming the file and the entry that is neither."""
    state = payload["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' must map names to tensors, got a {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state_dict key {key!r} is a {type(key).__name__}, not a name")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    if not any(key.startswith(PREFIX) for key in state):
        raise CheckpointError(f"{path}: its state_dict has no '{PREFIX}' keys: not a CLARA model checkpoint")
    if "hyper_parameters" not in payload:
        raise CheckpointError(f"{path}: a reference checkpoint must carry 'hyper_parameters' (the architecture)")
    hparams = payload["hyper_parameters"]
    if not isinstance(hparams, Mapping):
        raise CheckpointError(f"{path}: 'hyper_parameters' must be a mapping of settings, got a {type(hparams).__name__}")
    return state, hparams


def _load_reference(path: Path, payload: Mapping[str, Any], overrides: Sequence[str]) -> Clara:
    state, hparams = _reference_parts(path, payload)
    try:
        config = from_reference_hparams(dict(hparams), source=f"{path}: hyper_parameters")
    except config_lib.ConfigError as err:
        raise CheckpointError(str(err)) from None
    try:
        # As for our own format: the error names the checkpoint the overrides were applied to.
        config = config_lib.from_dict(ClaraConfig, config_lib.apply_overrides(config_lib.to_dict(config), overrides))
    except config_lib.ConfigError as err:
        raise CheckpointError(f"{path} + overrides: {err}") from None
    model = Clara(config)
    try:
        tensors, unused = reference_to_state_dict(state, config)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: does not fit the model: {err}") from None
    _check_and_load(model, tensors, unused, path)
    return model


def _load_ours(directory: Path, overrides: Sequence[str]) -> Clara:
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            if (directory / "model" / CONFIG_FILE).is_file():  # the folder of a pretraining run
                raise CheckpointError(f"{directory}: a run's folder, not a checkpoint (no {needed.name}); its weights "
                                      f"are the checkpoint {directory / 'model'}")
            raise CheckpointError(f"{directory}: not a meld-clara checkpoint (no {needed.name})")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: not JSON text ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object of model settings, got {type(data).__name__}")
    try:
        config = config_lib.from_dict(ClaraConfig, config_lib.apply_overrides(data, overrides))
    except config_lib.ConfigError as err:
        raise CheckpointError(f"{config_path}{' + overrides' if overrides else ''}: {err}") from None
    model = Clara(config)
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err})") from None
    _check_and_load(model, tensors, (), weights_path)
    return model


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False, overrides: Sequence[str] = ()) -> Clara:
    """Load a CLARA model (in eval mode) from our directory format or a reference Lightning ``.ckpt``.

    ``overrides`` are ``key=value`` settings applied to the stored config, e.g. ``mask_padding=false``
    or ``attention=eager``; they must not change tensor shapes.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        model = _load_ours(path, overrides)
    elif path.suffix == ".safetensors":
        if path.name != WEIGHTS_FILE:
            # _load_ours reads <dir>/model.safetensors: another name would load a different file.
            raise CheckpointError(
                f"{path}: a meld-clara checkpoint is a directory holding {WEIGHTS_FILE} and {CONFIG_FILE}; "
                f"pass that directory (this file is not named {WEIGHTS_FILE})"
            )
        model = _load_ours(path.parent, overrides)
    else:
        payload = _torch_load(path, allow_pickle)
        if not isinstance(payload, Mapping) or "state_dict" not in payload:
            raise CheckpointError(
                f"{path}: not a CLARA checkpoint (expected a Lightning .ckpt with 'state_dict' and "
                f"'hyper_parameters', or a meld-clara checkpoint directory)"
            )
        model = _load_reference(path, payload, overrides)
    return model.eval()
