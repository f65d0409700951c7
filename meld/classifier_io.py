"""A fine-tuned classifier on disk: ``RUN/model/`` = ``model.safetensors`` + ``classifier.json`` (+ ``hf_text/``).

``classifier.json`` holds everything needed to rebuild the module without the original files: the
CLARA architecture, the head's shape, the inputs, the target and its class names, and the data
settings the model was trained with (audio front-end, context, token limit). The optional
transformers encoder's config and tokenizer are saved in ``hf_text/``. The directory is written
beside its final place and renamed into it, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from clara import config as config_lib
from clara.checkpoint import CheckpointError
from clara.io_utils import atomic_directory
from clara.model import Clara
from clara.model_config import ClaraConfig
from meld.classifier import MeldClassifier
from meld.fusion import FusionHead
from meld.hf_text import HFTextEncoder, load_hf_tokenizer
from meld.labels import TARGETS

FORMAT = "meld-clara-classifier/1"
SPEC_FILE = "classifier.json"
WEIGHTS_FILE = "model.safetensors"
HF_DIR = "hf_text"


def classifier_spec(classifier: MeldClassifier, *, target: str, class_names: tuple[str, ...], head: dict,
                    data: Any, hf_max_tokens: int = 512) -> dict:  # fmt: skip
    clara = config_lib.to_dict(classifier.clara.config) if classifier.clara is not None else None
    return {"format": FORMAT, "target": target, "class_names": list(class_names), "inputs": list(classifier.inputs),
            "features": classifier.features, "clara": clara, "head": head, "data": config_lib.to_dict(data),
            "hf_max_tokens": hf_max_tokens}


def save_classifier(path: Path, classifier: MeldClassifier, spec: dict, hf_tokenizer=None) -> Path:
    with atomic_directory(path) as staging:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in classifier.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        if classifier.hf_text is not None:
            classifier.hf_text.model.config.save_pretrained(staging / HF_DIR)
            hf_tokenizer.save_pretrained(staging / HF_DIR)
    return path


# What load_classifier reads from classifier.json: field -> (JSON types accepted, what is expected).
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "target": ((str,), "emotion or sentiment"),
    "class_names": ((list,), "a list of class names"),
    "inputs": ((list,), "a list of the inputs (audio, text, hf_text)"),
    "features": ((str,), "projected or pooled"),
    "clara": ((dict, type(None)), "the CLARA architecture (an object), or null"),
    "head": ((dict,), 'an object {"dims": {input: size} for each of the inputs, "options": {...}}'),
    "data": ((dict,), "the data settings (an object)"),
    "hf_max_tokens": ((int,), "a whole number"),
}
_INPUTS = ("audio", "text", "hf_text")
_FEATURES = ("projected", "pooled")


def _check_spec(spec: Any, spec_path: Path) -> None:
    """Raise CheckpointError naming ``spec_path`` and the first field that is missing or of the wrong shape."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"{spec_path}: expected a JSON object with the fields format, {', '.join(_FIELDS)}; "
                              f"got {type(spec).__name__}")
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{spec_path}: format {spec.get('format')!r}, expected {FORMAT!r}")
    for name, (types, expected) in _FIELDS.items():
        if name not in spec:
            raise CheckpointError(f"{spec_path}: field {name!r} is missing; expected {expected}")
        if not isinstance(spec[name], types) or isinstance(spec[name], bool):
            raise CheckpointError(f"{spec_path}: field {name!r} is {json.dumps(spec[name])[:60]}; expected {expected}")
    for name, choices in (("target", tuple(TARGETS)), ("features", _FEATURES)):
        if spec[name] not in choices:
            raise CheckpointError(f"{spec_path}: field {name!r} is {spec[name]!r}; expected {' or '.join(choices)}")
    inputs, names = spec["inputs"], spec["class_names"]
    if not inputs or not all(name in _INPUTS for name in inputs):
        raise CheckpointError(f"{spec_path}: field 'inputs' is {json.dumps(inputs)[:60]}; expected some of "
                              f"{', '.join(_INPUTS)}")
    if len(names) < 2 or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{spec_path}: field 'class_names' is {json.dumps(names)[:60]}; expected two or more "
                              "class names")
    if spec["clara"] is None and set(inputs) & {"audio", "text"}:
        raise CheckpointError(f"{spec_path}: field 'clara' is null, but the inputs {', '.join(inputs)} need CLARA's "
                              "architecture")
    head, dims = spec["head"], spec["head"].get("dims")
    if (not isinstance(dims, dict) or not isinstance(head.get("options"), dict) or set(dims) != set(inputs)
            or not all(isinstance(size, int) and size > 0 for size in dims.values())):
        raise CheckpointError(f"{spec_path}: field 'head' is {json.dumps(head)[:60]}; expected {_FIELDS['head'][1]}")


def is_classifier_dir(path: Path) -> bool:
    return (path / SPEC_FILE).is_file() or (path / "model" / SPEC_FILE).is_file()


def spec_file(path: str | Path) -> Path:
    """Where the spec of a run (or of its model/ folder) ``path`` is, whether or not it exists."""
    path = Path(path)
    return path / "model" / SPEC_FILE if (path / "model" / SPEC_FILE).is_file() else path / SPEC_FILE


def load_classifier(path: str | Path) -> tuple[MeldClassifier, dict, Any]:
    """(classifier in eval mode, its spec, the transformers tokenizer or None) from a run or its model/ folder."""
    path = Path(path)
    spec_path = spec_file(path)
    folder = spec_path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; give the --out folder of a finished `python -m meld.finetune`")
    if not spec_path.is_file():
        raise CheckpointError(f"{path}: not a fine-tune run directory (no model/{SPEC_FILE}); "
                              "give the --out folder of a finished `python -m meld.finetune`")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{spec_path}: not valid JSON ({err})") from None
    _check_spec(spec, spec_path)
    clara = Clara(config_lib.from_dict(ClaraConfig, spec["clara"], source=f"{spec_path}: clara")) if spec["clara"] else None
    hf_text = hf_tokenizer = None
    if "hf_text" in spec["inputs"]:
        # Checked first: for a missing folder transformers complains about a Hub repo id instead.
        if not (folder / HF_DIR).is_dir():
            raise CheckpointError(f"{folder / HF_DIR}: missing; {SPEC_FILE} has an hf_text input, whose "
                                  "transformers config and tokenizer a finished run keeps there")
        try:
            hf_text = HFTextEncoder.from_config_folder(folder / HF_DIR)
            hf_tokenizer = load_hf_tokenizer(folder / HF_DIR)
        except (OSError, ValueError) as err:  # transformers' errors for a missing or damaged folder span lines
            raise CheckpointError(f"{folder / HF_DIR}: cannot load the transformers text encoder's config and "
                                  f"tokenizer that {SPEC_FILE} needs ({' '.join(str(err).split())})") from None
    try:
        head = FusionHead(spec["head"]["dims"], len(spec["class_names"]), **spec["head"]["options"])
    except (TypeError, ValueError, KeyError) as err:  # unknown options, dims that are not sizes of the inputs
        raise CheckpointError(f"{spec_path}: field 'head' does not describe a head ({type(err).__name__}: {err})") from None
    classifier = MeldClassifier(clara, head, inputs=tuple(spec["inputs"]), features=spec["features"], hf_text=hf_text)
    weights = folder / WEIGHTS_FILE
    # A missing or unreadable file is told apart from one that reads but holds another model's tensors:
    # the fixes differ (copy the run's model/ again, or pair it with its own classifier.json).
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; a finished run's model/ holds {WEIGHTS_FILE} beside {SPEC_FILE}")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types (and OSError) for a damaged file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    try:
        classifier.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors, in PyTorch's message of several lines
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{weights}: does not fit {SPEC_FILE} ({detail})") from None
    return classifier.eval(), spec, hf_tokenizer
