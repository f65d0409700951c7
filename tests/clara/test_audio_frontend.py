"""The audio front-end against librosa (the reference's own pipeline), and its batching contract."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

from clara.audio_frontend import HOP_LENGTH, SAMPLE_RATE, LogMel, num_frames, resample_to_48k

SR = SAMPLE_RATE


def _librosa_log_mel(y: np.ndarray) -> np.ndarray:
    """The reference pipeline, with librosa's defaults (zero centre padding): ``[80, T]``."""
    librosa = pytest.importorskip("librosa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_fft too large" for clips shorter than 1024 samples
        mel = librosa.feature.melspectrogram(
            y=y, sr=SR, n_fft=1024, hop_length=512, win_length=1024, n_mels=80,
            fmin=0, fmax=8000, power=2.0, htk=False, norm="slaney",
        )
    return (librosa.power_to_db(mel, ref=np.max) + 40) / 40


def _speech_like(rng: np.random.Generator, seconds: float = 1.5) -> np.ndarray:
    """Voiced harmonics (f0 gliding 110-220 Hz) shaped by moving formants, plus breath noise,
    with an exact-zero lead-in, a near-silent pause and an exact-zero tail."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 110 + 110 * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t))  # [n]
    phase = 2 * np.pi * np.cumsum(f0) / SR  # [n]
    formants = np.stack([  # [3, n] centre frequencies drifting like vowel transitions
        700 + 200 * np.sin(2 * np.pi * 2.1 * t),
        1200 + 400 * np.sin(2 * np.pi * 1.7 * t + 1.0),
        2600 + 300 * np.sin(2 * np.pi * 0.9 * t + 2.0),
    ])
    voiced = np.zeros(n)
    for k in range(1, int(8000 / 110) + 1):
        fk = k * f0  # [n]
        envelope = np.exp(-0.5 * ((fk[None] - formants) / 150.0) ** 2).sum(axis=0) + 0.01
        voiced += envelope * np.sin(k * phase) / k**0.5
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * 3.0 * t)  # [n] amplitude modulation at 3 Hz
    y = 0.1 * voiced * syllables + 0.003 * rng.standard_normal(n)
    y[: SR // 10] = 0.0
    y[int(0.7 * SR) : int(0.9 * SR)] *= 1e-3
    y[-SR // 20 :] = 0.0
    return y.astype(np.float32)


def _chirp(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f_start, f_end = 50.0, 20_000.0  # logarithmic sweep across and beyond the 8 kHz mel range
    rate = np.log(f_end / f_start) / seconds
    return (0.5 * np.sin(2 * np.pi * f_start * (np.exp(rate * t) - 1) / rate)).astype(np.float32)


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "speech_like": _speech_like(rng),  # 72000 samples, a multiple of neither 512 nor 1024
        "chirp": _chirp(),
        "quiet_white_noise": (1e-4 * rng.standard_normal(100 * HOP_LENGTH)).astype(np.float32),
        "noise_not_hop_multiple": (0.05 * rng.standard_normal(100 * HOP_LENGTH + 123)).astype(np.float32),
        "short_clip": (0.2 * rng.standard_normal(300)).astype(np.float32),
        "one_hop": (0.2 * rng.standard_normal(HOP_LENGTH)).astype(np.float32),
        "silence": np.zeros(SR // 2, np.float32),
    }


@pytest.mark.parametrize("name", list(_signals()))
def test_matches_librosa_reference(name):
    y = _signals()[name]
    expected = _librosa_log_mel(y)
    log_mel, frames = LogMel()(torch.from_numpy(y))
    assert log_mel.shape == expected.shape == (80, 1 + len(y) // 512)
    assert frames.shape == () and int(frames) == expected.shape[1]
    assert np.abs(log_mel.numpy() - expected).max() < 1e-3
    assert log_mel.min() >= -1.0 and log_mel.max() == 1.0  # [-80, 0] dB, the clip's peak at 0 dB


def test_reference_pad_mode_is_zero_padding():
    # The reference pinned librosa 0.10, whose STFT centre padding defaults to zeros (since 0.9);
    # LogMel pads with zeros, which is also what keeps batched items equal to items alone.
    librosa = pytest.importorskip("librosa")
    assert inspect.signature(librosa.stft).parameters["pad_mode"].default == "constant"


def test_num_frames_and_layout():
    assert num_frames(0) == 1
    assert num_frames(511) == 1
    assert num_frames(512) == 2
    assert num_frames(48_000) == 94
    assert num_frames(torch.tensor([300, 1024, 1025])).tolist() == [1, 3, 3]

    x = torch.randn(3, 2, 5000)
    log_mel, frames = LogMel()(x)
    assert log_mel.shape == (3, 2, 80, num_frames(5000))
    assert log_mel.dtype == torch.float32
    assert frames.shape == (3, 2) and frames.dtype == torch.long
    assert (frames == num_frames(5000)).all()

    batch, frames = LogMel()(torch.randn(4, 10_000), torch.tensor([10_000, 9000, 300, 512]))
    assert batch.shape == (4, 80, num_frames(10_000))
    assert frames.tolist() == [num_frames(n) for n in (10_000, 9000, 300, 512)]


def test_padded_batch_equals_items_alone():
    frontend = LogMel()
    items = [torch.from_numpy(y) for y in _signals().values()]
    lengths = torch.tensor([len(y) for y in items])
    batch = torch.zeros(len(items), int(lengths.max()))
    for i, y in enumerate(items):
        batch[i, : len(y)] = y

    log_mel, frames = frontend(batch, lengths)
    assert frames.tolist() == [num_frames(len(y)) for y in items]
    for i, y in enumerate(items):
        alone, _ = frontend(y)
        t = int(frames[i])
        assert torch.equal(log_mel[i, :, t:], torch.zeros_like(log_mel[i, :, t:]))
        assert (log_mel[i, :, :t] - alone).abs().max() <= 1e-5

    # Non-zero junk past an item's end (e.g. a batch padded with noise) changes nothing either.
    junk = torch.where(torch.arange(batch.shape[1]) < lengths[:, None], batch, torch.randn_like(batch))
    assert (frontend(junk, lengths)[0] - log_mel).abs().max() <= 1e-5


def test_silence_is_finite():
    frontend = LogMel()
    silent, _ = frontend(torch.zeros(SR))
    assert torch.isfinite(silent).all()
    # Silence is its own 0 dB reference, as in librosa: every value is (0 + 40) / 40.
    assert torch.equal(silent, torch.ones_like(silent))

    batch = torch.zeros(2, SR)
    batch[1] = 0.5 * torch.randn(SR)
    log_mel, _ = frontend(batch, torch.tensor([SR // 2, SR]))
    assert torch.isfinite(log_mel).all()
    assert torch.equal(log_mel[0], torch.cat([silent[:, : num_frames(SR // 2)],
                                              torch.zeros(80, num_frames(SR) - num_frames(SR // 2))], 1))


@pytest.mark.parametrize("orig_sr, freq", [(16_000, 440.0), (44_100, 1000.0)])
def test_resample_keeps_frequency_and_duration(orig_sr, freq):
    n = orig_sr  # one second
    sine = torch.sin(2 * torch.pi * freq * torch.arange(n, dtype=torch.float64) / orig_sr).float()
    out = resample_to_48k(sine, orig_sr)
    assert abs(out.shape[-1] - n * SR / orig_sr) <= 1
    peak_hz = torch.fft.rfft(out).abs().argmax().item() * SR / out.shape[-1]
    assert abs(peak_hz - freq) <= 1.0  # one-second clip: 1 Hz bins

    stereo_batch = resample_to_48k(torch.stack([sine, -sine])[None], orig_sr)  # [1, 2, N] stays batched
    assert stereo_batch.shape == (1, 2, out.shape[-1])


def test_resample_is_identity_at_48k():
    x = torch.randn(2, 1000)
    assert resample_to_48k(x, SR) is x


def test_buffers_stay_out_of_state_dict_and_maths_stays_float32():
    assert LogMel().state_dict() == {}  # a model holding LogMel keeps the reference's checkpoint keys
    x = 0.1 * torch.randn(2, 4000)
    for dtype in (torch.float64, torch.float16):  # e.g. ``model.double()`` / ``model.half()``
        x_cast = x.to(dtype)
        out, _ = LogMel().to(dtype)(x_cast)
        assert out.dtype == torch.float32
        assert (out - LogMel()(x_cast.float())[0]).abs().max() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    items = [torch.from_numpy(y) for y in _signals().values()]
    lengths = torch.tensor([len(y) for y in items])
    batch = torch.zeros(len(items), int(lengths.max()))
    for i, y in enumerate(items):
        batch[i, : len(y)] = y
    cpu, cpu_frames = LogMel()(batch, lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu, gpu_frames = LogMel().cuda()(batch.cuda(), lengths.cuda())
    assert gpu.is_cuda and gpu.dtype == torch.float32
    assert torch.equal(gpu_frames.cpu(), cpu_frames)
    assert (gpu.cpu() - cpu).abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(0,), (3, 0), ()])
def test_a_waveform_without_samples_is_one_clear_error(shape):
    """An empty clip used to fail deep in a reshape ("cannot reshape tensor of 0 elements")."""
    with pytest.raises(ValueError, match=r"LogMel needs a waveform \[\.\.\., N\] with N >= 1 samples, got shape "):
        LogMel()(torch.zeros(shape))


def test_lengths_of_the_wrong_shape_are_one_clear_error():
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\); expected \(2,\), one per waveform"):
        LogMel()(torch.zeros(2, 1000), torch.tensor([1000, 900, 800]))
