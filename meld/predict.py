"""Classify one utterance with a fine-tuned run: ``python -m meld.predict --run RUN_DIR ITEM``.

ITEM is an audio or video file (mp4, wav, flac, ...) for runs trained on audio, or a text (quote
it) for runs trained on text. A run on both takes the file and its transcript:
``--run RUN clip.mp4 --text "what was said"``. Prints the predicted label and every class's
probability, most likely first (``--json`` for one JSON object instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from clara.audio_io import AudioDecodeError, load_audio
from clara.checkpoint import CheckpointError
from clara.config import ConfigError, from_dict
from clara.tokenizer import Tokenizer
from meld.classifier_io import load_classifier
from meld.dataset import DataConfig
from meld.finetune_data import Collate

AUDIO_SUFFIXES = {".mp4", ".m4a", ".wav", ".flac", ".mp3", ".ogg", ".aac", ".webm", ".mkv", ".mov", ".opus"}


class PredictError(ValueError):
    """An item that does not fit the run (text for an audio model, a missing file, ...)."""


def _item(spec: dict, data: DataConfig, item: str, text: str | None, hf_tokenizer) -> dict:
    """One dataset-like item (mel, tokens, hf_ids as the run needs) for ``item`` and an optional transcript."""
    inputs = set(spec["inputs"])
    needs_audio, needs_text = "audio" in inputs, bool(inputs & {"text", "hf_text"})
    path = Path(item)
    is_audio = path.suffix.lower() in AUDIO_SUFFIXES or path.is_file()
    if is_audio and not path.is_file():
        raise PredictError(f"{path}: file not found")
    if needs_audio and not is_audio:
        raise PredictError(f"this run classifies audio ({'+'.join(spec['inputs'])}); give an mp4 or wav file, not text")
    if not needs_audio and is_audio:
        raise PredictError("this run classifies text; give the utterance as a quoted string, not a file")
    transcript = text if needs_audio else item
    if needs_text and transcript is None:
        raise PredictError("this run uses audio and text: add the transcript with --text \"...\"")
    out: dict = {"key": str(item), "emotion": 0, "sentiment": 0, "speaker": "", "dialogue_id": 0}
    if needs_audio:
        audio = data.audio
        wave = load_audio(path, max_seconds=audio.max_seconds, sample_rate=audio.sample_rate)
        if wave.numel() < max(1, int(audio.min_seconds * audio.sample_rate)):
            raise PredictError(f"{path}: {wave.numel() / audio.sample_rate:.3f} s of audio, under the "
                               f"{audio.min_seconds} s minimum the model was trained with")
        mel, _ = audio.log_mel()(wave)  # [n_mels, T]
        out["mel"] = mel
    if "text" in inputs:
        ids = Tokenizer(data.language).encode(transcript)[: data.max_tokens]
        out["tokens"] = torch.tensor(ids, dtype=torch.long)
    if "hf_text" in inputs:
        ids = hf_tokenizer(transcript, truncation=True, max_length=spec["hf_max_tokens"])["input_ids"]
        out["hf_ids"] = torch.tensor(ids)
    return out


def predict(run: str | Path, item: str, text: str | None = None) -> dict:
    """``{"label", "target", "probabilities": {class: p}}`` for one item, classified by the run's model."""
    classifier, spec, hf_tokenizer = load_classifier(run)
    data = from_dict(DataConfig, spec["data"], source="classifier.json data")
    batch = Collate(getattr(hf_tokenizer, "pad_token_id", 0) or 0)([_item(spec, data, item, text, hf_tokenizer)])
    with torch.no_grad():
        probabilities = classifier(batch).softmax(-1)[0]  # [C]
    names = spec["class_names"]
    ranked = sorted(zip(names, probabilities.tolist()), key=lambda pair: -pair[1])
    return {"label": ranked[0][0], "target": spec["target"], "probabilities": dict(ranked)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meld.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished `python -m meld.finetune` run directory (its --out)")
    parser.add_argument("item", help="an audio/video file, or a quoted text")
    parser.add_argument("--text", help="the transcript, for runs on audio and text")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = predict(args.run, args.item, args.text)
    except (PredictError, CheckpointError, ConfigError, AudioDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['target']}: {result['label']}")
    for name, p in result["probabilities"].items():
        print(f"  {name:<10} {p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
