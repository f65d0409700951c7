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


def is_classifier_dir(path: Path) -> bool:
    return (path / SPEC_FILE).is_file() or (path / "model" / SPEC_FILE).is_file()


def load_classifier(path: str | Path) -> tuple[MeldClassifier, dict, Any]:
    """(classifier in eval mode, its spec, the transformers tokenizer or None) from a run or its model/ folder."""
    path = Path(path)
    folder = path / "model" if (path / "model" / SPEC_FILE).is_file() else path
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{path}: not a fine-tune run directory (no model/{SPEC_FILE}); "
                              "give the --out folder of a finished `python -m meld.finetune`")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{spec_path}: not valid JSON ({err})") from None
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{spec_path}: format {spec.get('format')!r}, expected {FORMAT!r}")
    clara = Clara(config_lib.from_dict(ClaraConfig, spec["clara"], source=f"{spec_path}: clara")) if spec["clara"] else None
    hf_text = hf_tokenizer = None
    if "hf_text" in spec["inputs"]:
        hf_text = HFTextEncoder.from_config_folder(folder / HF_DIR)
        hf_tokenizer = load_hf_tokenizer(folder / HF_DIR)
    head = FusionHead(spec["head"]["dims"], len(spec["class_names"]), **spec["head"]["options"])
    classifier = MeldClassifier(clara, head, inputs=tuple(spec["inputs"]), features=spec["features"], hf_text=hf_text)
    try:
        classifier.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except Exception as err:  # safetensors' own errors for corrupt files, RuntimeError for mismatched keys
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: does not fit {SPEC_FILE} ({type(err).__name__}: {err})") from None
    return classifier.eval(), spec, hf_tokenizer
