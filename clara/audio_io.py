"""Decoding audio files (mp4/AAC, wav, flac, mp3, ...) to mono 48 kHz float tensors with PyAV.

PyAV bundles FFmpeg, so no system package is needed.  Every stream is downmixed to mono by
averaging its channels and resampled to 48 kHz (the model's rate) by FFmpeg's resampler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clara.audio_frontend import SAMPLE_RATE


class AudioDecodeError(ValueError):
    """A file that cannot be decoded as audio (missing, corrupt, or with no audio stream)."""


def load_audio(path: str | Path, *, max_seconds: float | None = None, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode ``path`` to a mono float32 waveform [N] at ``sample_rate``, at most ``max_seconds`` long."""
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"{path}: file not found")
    limit = None if max_seconds is None else int(round(max_seconds * sample_rate))
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            # Resample only; the downmix is a plain channel mean done here, not FFmpeg's matrix.
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))  # [C, n] planes -> [n]
                    total += chunks[-1].shape[0]
                if limit is not None and total >= limit:
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().mean(axis=0))
    except AudioDecodeError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        raise AudioDecodeError(f"{path}: cannot decode audio ({type(err).__name__}: {err})") from None
    wave = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if limit is not None:
        wave = wave[:limit]
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
