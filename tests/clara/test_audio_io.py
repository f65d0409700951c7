"""Decoding real container formats with PyAV: downmix, resampling, trimming and clear errors."""

from __future__ import annotations

import av
import numpy as np
import pytest

from clara.audio_io import AudioDecodeError, load_audio


def write_audio(path, left, right, rate, codec):
    """Write a stereo clip [2, N] with PyAV (wav = pcm_s16le, mp4 = aac)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        samples = np.stack([left, right]).astype(np.float32)
        if codec == "pcm_s16le":
            frame = av.AudioFrame.from_ndarray((samples.T.reshape(1, -1) * 32767).astype(np.int16), format="s16", layout="stereo")
        else:
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def dominant_hz(wave, rate=48_000):
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(len(wave))))
    return np.argmax(spectrum) * rate / len(wave)


def test_wav_at_44k1_is_downmixed_and_resampled(tmp_path):
    rate, seconds = 44_100, 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    write_audio(tmp_path / "a.wav", tone, np.zeros_like(tone), rate, "pcm_s16le")
    wave = load_audio(tmp_path / "a.wav")
    assert wave.ndim == 1 and abs(len(wave) - 48_000) <= 48
    assert dominant_hz(wave) == pytest.approx(440, abs=2)
    # The downmix is the channel mean: a 0.5 tone in one channel becomes 0.25.
    assert float(wave[1000:-1000].abs().max()) == pytest.approx(0.25, abs=0.01)


def test_mp4_aac_decodes_and_max_seconds_trims(tmp_path):
    rate = 48_000
    t = np.arange(rate * 2) / rate
    tone = 0.3 * np.sin(2 * np.pi * 1000 * t)
    write_audio(tmp_path / "clip.mp4", tone, tone, rate, "aac")
    full = load_audio(tmp_path / "clip.mp4")
    assert abs(len(full) - 2 * rate) < 2048  # AAC priming and padding frames
    assert dominant_hz(full) == pytest.approx(1000, abs=2)
    assert len(load_audio(tmp_path / "clip.mp4", max_seconds=0.5)) == rate // 2


def test_missing_and_corrupt_files_raise_one_clear_error(tmp_path):
    with pytest.raises(AudioDecodeError, match="nope.mp4: file not found"):
        load_audio(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(AudioDecodeError, match="bad.mp4: cannot decode audio"):
        load_audio(bad)
