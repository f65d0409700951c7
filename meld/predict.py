"""Classify one utterance with a fine-tuned run: ``python -m meld.predict --run RUN_DIR ITEM``.

ITEM is an audio or video file (mp4, wav, flac, ...) for runs trained on audio, or a text (quote
it) for runs trained on text. A run on both takes the file and its transcript:
``--run RUN clip.mp4 --text "what was said"``. Prints the predicted label and every class's
probability, most likely first (``--json`` for one JSON object instead). A silent clip (the run's
``audio.silence_dbfs``), which prepare leaves out of training, is still classified, with a warning;
so is a clip longer than the run's ``audio.max_seconds``, on its first ``max_seconds`` as in training.

A run trained with dialogue context (``data.context_turns`` > 0) read each utterance after its
previous turns: give them, oldest first, as ``--context "Monica: text" --context "Joey: text"`` with
the utterance's own ``--speaker``, which such a run needs: it read every utterance as ``Speaker: text``.
With ``--speaker`` alone the utterance is read as a dialogue's first turn, as the run read those.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from clara.audio_io import AudioDecodeError, load_audio
from clara.checkpoint import CheckpointError
from clara.cli import describe
from clara.config import ConfigError, from_dict
from clara.tokenizer import Tokenizer
from meld.classifier_io import load_classifier, spec_file
from meld.clip_features import silence
from meld.dataset import DataConfig, encode_with_context
from meld.finetune_data import Collate, hf_ids_with_context
from meld.records import Utterance

AUDIO_SUFFIXES = {".mp4", ".m4a", ".wav", ".flac", ".mp3", ".ogg", ".aac", ".webm", ".mkv", ".mov", ".opus"}


# A file name rather than an utterance: a path separator, or no spaces and a short extension ("clip.avi").
_PATH_LIKE = re.compile(r".*[/\\].*|\S+\.[A-Za-z0-9]{1,5}")


class PredictError(ValueError):
    """An item that does not fit the run (text for an audio model, a missing file, ...)."""


def parse_turn(text: str) -> tuple[str, str]:
    """``"Monica: I know!"`` -> ("Monica", "I know!"): one context turn as the CLI takes it."""
    speaker, sep, said = text.partition(":")
    if not sep or not speaker.strip() or not said.strip():
        raise PredictError(f"--context {text!r}: expected \"Speaker: what they said\"")
    return speaker.strip(), said.strip()


def _path_is(path: Path, test: Callable[[Path], bool]) -> bool:
    """``test(path)`` (Path.is_file, Path.is_dir); False where the OS refuses the name: an utterance
    longer than a file name may be (ENAMETOOLONG) names no file."""
    try:
        return test(path)
    except OSError:
        return False


def _check_context(data: DataConfig, context: Sequence[tuple[str, str]], speaker: str | None) -> None:
    needs_text = data.modality != "audio"
    flags = " and ".join(flag for flag, given in (("--context", context), ("--speaker", speaker)) if given)
    if flags and not needs_text:
        raise PredictError(f"this run classifies audio only; dialogue context ({flags}) is for runs on text")
    if flags and not data.context_turns:
        raise PredictError(f"this run was trained without dialogue context (data.context_turns 0); leave out {flags}")
    if needs_text and data.context_turns and not (speaker or "").strip():
        raise PredictError("this run was trained with dialogue context (data.context_turns "
                           f"{data.context_turns}) and read every utterance as \"Speaker: text\": give the "
                           "utterance's speaker (--speaker NAME), and its previous turns with --context")


def _item(spec: dict, data: DataConfig, item: str, text: str | None, hf_tokenizer, warnings: list[str],
          context: Sequence[tuple[str, str]] = (), speaker: str | None = None) -> dict:  # fmt: skip
    """One dataset-like item (mel, tokens, hf_ids as the run needs) for ``item`` and an optional transcript.

    ``context``: the (speaker, text) of previous turns, oldest first; the run's last
    ``data.context_turns`` of them precede the transcript, formatted as in training.
    ``warnings``: gets a line for an input the run can classify but did not train on (a silent clip), or
    only in part (a clip longer than the run's cap).
    """
    inputs = set(spec["inputs"])
    needs_audio, needs_text = "audio" in inputs, bool(inputs & {"text", "hf_text"})
    # Path("") is the current folder: an empty item is refused here, before it is read as a path.
    if not item.strip():
        raise PredictError("the item is empty; give " + ("an mp4 or wav file" if needs_audio else
                                                         "the utterance's text as a quoted string"))
    path = Path(item)
    exists = _path_is(path, Path.is_file)
    is_audio = path.suffix.lower() in AUDIO_SUFFIXES or exists
    if _path_is(path, Path.is_dir) and (is_audio or needs_audio):
        raise PredictError(f"{path}: a folder, not an audio or video file")
    # A run that needs audio reads a path-like item (any suffix) as a file it cannot find, not as text.
    if not exists and (is_audio or (needs_audio and _PATH_LIKE.fullmatch(item))):
        # A device or pipe (/dev/null, a FIFO) is there, but is no clip to decode: "not found" misled.
        raise PredictError(f"{path}: not a regular file" if _path_is(path, Path.exists) else f"{path}: file not found")
    if needs_audio and not is_audio:
        raise PredictError(f"this run classifies audio ({'+'.join(spec['inputs'])}); give an mp4 or wav file, not text")
    if not needs_audio and is_audio:
        raise PredictError("this run classifies text; give the utterance as a quoted string, not a file")
    # --text is the transcript beside a clip; any other run would drop it unread.
    if text is not None and not needs_text:
        raise PredictError("this run classifies audio only; leave out --text (a transcript is for runs on audio "
                           "and text)")
    if text is not None and not needs_audio:
        raise PredictError("this run classifies text: give the utterance as the item, without --text")
    transcript = text if needs_audio else item
    if needs_text and transcript is None:
        raise PredictError("this run uses audio and text: add the transcript with --text \"...\"")
    if text is not None and not text.strip():
        raise PredictError("--text is empty; give the transcript of the clip")
    turns = list(context)[-data.context_turns:] if data.context_turns else None
    utt = Utterance("predict", 0, len(turns or ()), speaker or "", transcript or "", "", "", 0, 0, 0.0, 0.0, 0)
    out: dict = {"key": str(item), "emotion": 0, "sentiment": 0, "speaker": utt.speaker, "dialogue_id": 0}
    if needs_audio:
        audio = data.audio
        cap = audio.max_samples
        # As prepare decodes: one sample past the cap tells a clip longer than the cap from one exactly
        # as long, and a longer one is cut to the cap, which the user is told rather than left to guess.
        limit = None if cap is None else (cap + 1) / audio.sample_rate
        wave = load_audio(path, max_seconds=limit, sample_rate=audio.sample_rate)
        if cap is not None and wave.numel() > cap:
            wave = wave[:cap]
            warnings.append(f"{path}: longer than the run's audio.max_seconds ({audio.max_seconds:g} s): only its "
                            f"first {audio.max_seconds:g} s were classified, as prepare cut such clips for training")
        if wave.numel() < max(1, int(audio.min_seconds * audio.sample_rate)):
            raise PredictError(f"{path}: {wave.numel() / audio.sample_rate:.3f} s of audio, under the "
                               f"{audio.min_seconds} s minimum the model was trained with")
        # prepare leaves silent clips out of training; the model still gives an answer (the text's, or its
        # bias), so it is printed, with a warning that the audio told it nothing it learned.
        reason = silence(wave, audio.silence_dbfs)
        if reason:
            warnings.append(f"{path}: {reason} (the run's audio.silence_dbfs): training left such clips out, so "
                            "the audio gives the model nothing to go on")
        mel, _ = audio.log_mel()(wave)  # [n_mels, T]
        out["mel"] = mel
    if "text" in inputs:
        ids = encode_with_context(Tokenizer(data.language), utt, turns, data.max_tokens)
        out["tokens"] = torch.tensor(ids, dtype=torch.long)
    if "hf_text" in inputs:
        out["hf_ids"] = torch.tensor(hf_ids_with_context(hf_tokenizer, utt, turns, spec["hf_max_tokens"]))
    return out


def predict(run: str | Path, item: str | Path, text: str | None = None, *, context: Sequence[tuple[str, str]] = (),
            speaker: str | None = None) -> dict:  # fmt: skip
    """``{"label", "target", "probabilities": {class: p}, "warnings": [line]}`` for one item, by the run's model.

    ``item``: an audio or video file (a path), or the utterance's text. ``context``: previous turns of the
    dialogue as (speaker, text), oldest first, with the item's own ``speaker``, for runs trained with
    ``data.context_turns`` > 0.
    """
    item = str(item) if isinstance(item, Path) else item  # as the command line gives it
    classifier, spec, hf_tokenizer = load_classifier(run)
    data = from_dict(DataConfig, spec["data"], source=f"{spec_file(run)}: data")
    _check_context(data, context, speaker)
    warnings: list[str] = []
    item_dict = _item(spec, data, item, text, hf_tokenizer, warnings, context, speaker)
    batch = Collate(getattr(hf_tokenizer, "pad_token_id", 0) or 0)([item_dict])
    with torch.no_grad():
        probabilities = classifier(batch).softmax(-1)[0]  # [C]
    names = spec["class_names"]
    ranked = sorted(zip(names, probabilities.tolist()), key=lambda pair: -pair[1])
    return {"label": ranked[0][0], "target": spec["target"], "probabilities": dict(ranked), "warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meld.predict", description=describe(__doc__))
    parser.add_argument("--run", required=True, help="a finished `python -m meld.finetune` run directory (its --out)")
    parser.add_argument("item", help="an audio/video file, or a quoted text")
    parser.add_argument("--text", help="the transcript, for runs on audio and text")
    parser.add_argument("--context", action="append", default=[], metavar="\"SPEAKER: TEXT\"",
                        help="a previous turn of the dialogue, oldest first (repeat), for runs trained with "
                             "data.context_turns > 0")
    parser.add_argument("--speaker", help="the utterance's own speaker; runs trained with dialogue context need it")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        context = [parse_turn(turn) for turn in args.context]
        result = predict(args.run, args.item, args.text, context=context, speaker=args.speaker)
    except (PredictError, CheckpointError, ConfigError, AudioDecodeError, OSError) as err:  # OSError: e.g. a file it may not read
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['target']}: {result['label']}")
    for name, p in result["probabilities"].items():
        print(f"  {name:<10} {p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
