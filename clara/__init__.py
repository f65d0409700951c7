"""CLARA: a CLIP-style audio-text contrastive model, checkpoint-compatible with the reference.

The public API: ``LogMel`` and ``Tokenizer`` turn audio and text into model inputs; ``Clara`` encodes
them (``encode_audio``, ``encode_text``); ``ContrastiveLoss`` trains it; ``load_checkpoint`` reads our
format and the published reference checkpoint, ``save_checkpoint`` writes ours.  The attention
function stays in its module (``from clara.attention import attention``): exported here under the
same name, it would hide the module ``clara.attention`` itself.
"""

from clara.audio_frontend import SAMPLE_RATE, LogMel, resample_to_48k
from clara.audio_io import load_audio
from clara.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clara.loss import ContrastiveLoss
from clara.model import Clara, ClaraOutput
from clara.model_config import AudioConfig, ClaraConfig, TextConfig, load_model_config
from clara.tokenizer import Tokenizer

__all__ = [
    "SAMPLE_RATE",
    "AudioConfig",
    "CheckpointError",
    "Clara",
    "ClaraConfig",
    "ClaraOutput",
    "ContrastiveLoss",
    "LogMel",
    "TextConfig",
    "Tokenizer",
    "load_audio",
    "load_checkpoint",
    "load_model_config",
    "resample_to_48k",
    "save_checkpoint",
]
