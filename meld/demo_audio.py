"""Voice synthesiser for the demo dataset: speech-like clips whose prosody carries an emotion.

A clip is a glottal-pulse source following an f0 contour, shaped by vowel formants, cut into syllables
and pauses, with consonant noise at syllable onsets, then set to a recording level and mixed with
background noise at a random SNR.  The emotion moves pitch level, range and contour, speaking rate,
loudness and voice quality (brightness, breathiness, jitter/shimmer, tremolo, creak); the speaker moves
base pitch and formant scale.  Everything is numpy over whole sample arrays, driven by one seeded
Generator per clip, so a clip depends on its ``ClipSpec`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

SAMPLE_RATE = 48_000
# The voice is made at half rate (everything it holds lies below 12 kHz), then upsampled: half the work.
VOICE_RATE = SAMPLE_RATE // 2
# Below this much speaking time a clip holds room noise only (the demo's "very short clip").
MIN_SPEECH_S = 0.3
# Vowel formants (F1, F2, F3, F4) in Hz for an adult male tract; a speaker scales them all.
VOWELS = np.array([
    [730, 1090, 2440, 3400],  # a
    [530, 1840, 2480, 3500],  # e
    [270, 2290, 3010, 3700],  # i
    [570, 840, 2410, 3300],  # o
    [300, 870, 2240, 3350],  # u
], dtype=np.float64)
BANDWIDTHS = np.array([90.0, 110.0, 170.0, 250.0])


@dataclass(frozen=True)
class Voice:
    """A speaker: neutral median pitch, vocal-tract scale (1 = adult male), resting breathiness."""

    f0: float
    formant_scale: float
    breath: float


@dataclass(frozen=True)
class Prosody:
    """How an emotion sounds; every field is blended towards neutral by a per-clip intensity."""

    pitch: float  # f0 multiplier on the speaker's base
    accent: float  # semitones of syllable accents (pitch range)
    slope: float  # semitones of drift from start to end of the utterance
    end_tone: float  # semitones added over the last quarter (rising surprise, falling anger)
    rate: float  # syllables per second
    gain_db: float  # loudness relative to neutral
    tilt: float  # 0 = dark, lax voice ... 1 = bright, tense voice
    breath: float  # aspiration noise added to the speaker's own
    jitter: float  # cycle-to-cycle f0 irregularity (fraction of f0)
    shimmer: float  # cycle-to-cycle amplitude irregularity (fraction)
    tremolo: float  # depth of a 5-8 Hz wobble in pitch (semitones) and loudness
    creak: float  # how much every other glottal cycle is damped (period doubling)
    pause: float  # chance of a pause after a syllable


# Columns: pitch, accent, slope, end_tone, rate, gain_db, tilt, breath, jitter, shimmer, tremolo, creak, pause.
PROSODY: dict[str, Prosody] = {
    "neutral": Prosody(1.00, 1.8, -1.5, -1.0, 4.6, 0.0, 0.45, 0.03, 0.005, 0.03, 0.0, 0.0, 0.08),
    "joy": Prosody(1.22, 5.0, 1.5, 2.0, 5.0, 3.0, 0.65, 0.03, 0.006, 0.04, 0.0, 0.0, 0.06),
    "surprise": Prosody(1.28, 3.5, 0.0, 8.0, 4.4, 4.0, 0.60, 0.05, 0.008, 0.04, 0.0, 0.0, 0.08),
    "anger": Prosody(1.10, 3.0, -2.0, -3.0, 5.8, 7.0, 0.95, 0.01, 0.010, 0.06, 0.0, 0.0, 0.05),
    "sadness": Prosody(0.85, 0.7, -2.5, -1.5, 3.2, -5.0, 0.15, 0.12, 0.010, 0.05, 0.0, 0.0, 0.20),
    "disgust": Prosody(0.86, 2.2, -3.0, -3.0, 3.8, 0.0, 0.55, 0.05, 0.025, 0.10, 0.0, 0.65, 0.14),
    "fear": Prosody(1.32, 2.0, 1.0, 2.0, 6.0, -2.0, 0.35, 0.15, 0.030, 0.10, 0.9, 0.0, 0.08),
}


@dataclass(frozen=True)
class ClipSpec:
    """Everything that decides one clip; ``seed`` entropy makes the noise of each clip its own."""

    emotion: str
    voice: Voice
    duration: float  # seconds
    channels: int  # 1, 2 or 6 (5.1)
    seed: tuple[int, ...]
    silent: bool = False


def voice_for(rng: np.random.Generator, female: bool) -> Voice:
    """A random speaker of the given sex (typical adult pitch and tract-length ranges)."""
    f0 = rng.uniform(185.0, 235.0) if female else rng.uniform(95.0, 135.0)
    scale = rng.uniform(1.10, 1.20) if female else rng.uniform(0.92, 1.04)
    return Voice(f0=f0, formant_scale=scale, breath=rng.uniform(0.02, 0.08))


def speaking_rate(emotion: str) -> float:
    return PROSODY[emotion].rate


def _blend(emotion: str, intensity: float) -> Prosody:
    base, target = PROSODY["neutral"], PROSODY[emotion]
    return Prosody(*(getattr(base, f.name) + intensity * (getattr(target, f.name) - getattr(base, f.name))
                     for f in fields(Prosody)))


def _fft_size(n: int, room: int = 0) -> int:
    """Smallest 2^a 3^b 5^c >= n + room: fast for numpy's FFT; ``room`` keeps a filter's ringing tail
    from wrapping round onto the start."""
    n += room
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35 << max(0, (-(-n // p35) - 1).bit_length())
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _coloured_noise(rng: np.random.Generator, n: int, rate: int, response) -> np.ndarray:
    """Gaussian noise (n,) with power spectrum |response(freqs_hz)|^2, made in the frequency domain
    (one inverse FFT, no forward one)."""
    size = _fft_size(n)
    freqs = np.fft.rfftfreq(size, 1.0 / rate)
    white = rng.standard_normal((freqs.size, 2)).view(np.complex128)[:, 0]
    return np.fft.irfft(white * response(freqs), size)[:n]


def _upsample2(x: np.ndarray) -> np.ndarray:
    """(n,) -> (2n,) band-limited interpolation: zero-pad the spectrum to twice the rate."""
    size = _fft_size(x.size, room=64)  # the voice starts and ends in silence: nothing to wrap round
    return np.fft.irfft(np.fft.rfft(x, size) * 2.0, 2 * size)[: 2 * x.size]


def _formants(freqs: np.ndarray, vowel: np.ndarray, scale: float, tilt: float) -> np.ndarray:
    """Cascade of analog resonators F^2 / (F^2 - f^2 + j f B), times a brightness slope set by tilt."""
    h = np.ones_like(freqs, dtype=np.complex128)
    for f, b in zip(vowel * scale, BANDWIDTHS):
        h *= f * f / (f * f - freqs * freqs + 1j * freqs * b)
    # From -3 dB/octave (lax) to +3 dB/octave (tense) above 500 Hz.
    return h * np.maximum(freqs / 500.0, 1.0) ** (tilt - 0.5)


def _syllables(rng: np.random.Generator, p: Prosody, span: float):
    """Syllable start times and lengths (s) filling ``span``, with pauses between some of them."""
    k = int(span * p.rate * 1.6) + 2
    lengths = rng.lognormal(np.log(1.0 / p.rate), 0.25, k)
    gaps = np.where(rng.random(k) < p.pause, rng.uniform(0.12, 0.40, k), rng.uniform(0.0, 0.03, k))
    ends = np.cumsum(lengths + gaps)
    keep = max(1, int(np.searchsorted(ends, span)))
    lengths, gaps = lengths[:keep], gaps[:keep]
    gaps[-1] = 0.0  # the utterance ends on a syllable, not a pause
    stretch = span / (lengths + gaps).sum()
    lengths, gaps = lengths * stretch, gaps * stretch
    starts = np.concatenate([[0.0], np.cumsum(lengths + gaps)[:-1]])
    return starts, lengths


def _speech(rng: np.random.Generator, p: Prosody, voice: Voice, span: float) -> np.ndarray:
    """One utterance of ``span`` seconds: mono float64 (span * VOICE_RATE,), arbitrary level."""
    n = int(span * VOICE_RATE)
    t = np.arange(n) / VOICE_RATE
    starts, lengths = _syllables(rng, p, span)
    k = len(starts)
    syl = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, k - 1)  # (n,) syllable of each sample
    u = (t - starts[syl]) / lengths[syl]  # position inside the syllable; > 1 in the pause after it
    onset = rng.uniform(0.15, 0.35, k) * (rng.random(k) < 0.7)  # consonant share of each syllable

    # Pitch contour in semitones: drift + final boundary tone + smooth syllable accents + tremolo.
    x = t / span
    rise = np.clip((x - 0.75) / 0.25, 0.0, 1.0)
    accents = p.accent * rng.uniform(-0.4, 1.0, k) * (rng.random(k) < 0.6)
    semis = (p.slope * (x - 0.5) + p.end_tone * rise * rise * (3 - 2 * rise)
             + np.interp(t, starts + lengths / 2, accents)
             + p.tremolo * np.sin(2 * np.pi * rng.uniform(5.0, 8.0) * t + rng.uniform(0, 2 * np.pi)))
    f0 = voice.f0 * p.pitch * 2.0 ** ((semis + rng.normal(0.0, 0.7)) / 12.0)

    # Jitter and shimmer are per glottal cycle: number the cycles once, perturb, integrate again.
    cycle = np.floor(np.cumsum(f0) / VOICE_RATE).astype(np.int64)
    f0 = f0 * (1.0 + p.jitter * rng.standard_normal(cycle[-1] + 1))[cycle]
    phase = np.cumsum(f0) / VOICE_RATE
    cycle = np.floor(phase).astype(np.int64)
    frac = phase - cycle
    gains = (1.0 + p.shimmer * rng.standard_normal(cycle[-1] + 1)) * np.where(
        np.arange(cycle[-1] + 1) % 2 == 1, 1.0 - p.creak, 1.0)

    # Rosenberg glottal flow; a tense voice opens less and closes faster, which brightens it.
    open_q = 0.75 - 0.3 * p.tilt
    rise_q, fall_q = 0.65 * open_q, 0.35 * open_q * (1.3 - p.tilt)
    flow = np.where(frac < rise_q, 0.5 * (1 - np.cos(np.pi * frac / rise_q)),
                    np.where(frac < rise_q + fall_q, np.cos(0.5 * np.pi * (frac - rise_q) / fall_q), 0.0))
    source = np.diff(flow, prepend=flow[0]) * (VOICE_RATE / f0) * gains[cycle]
    source += (voice.breath + p.breath) * (0.4 + flow) * rng.standard_normal(n)
    if p.tremolo:
        source *= 1.0 + 0.25 * p.tremolo * np.sin(2 * np.pi * rng.uniform(5.0, 8.0) * t)

    # Loudness: a syllable envelope after the consonant onset, accented syllables up to 40 % louder.
    v_pos = np.clip((u - onset[syl]) / (1.0 - onset[syl]), 0.0, 1.0)
    stress = 1.0 + 0.4 * np.clip(accents / max(p.accent, 1.0), 0.0, 1.0)
    voiced = source * np.where(u < 1.0, np.sin(np.pi * v_pos) ** 0.6, 0.0) * stress[syl]
    # Consonants: white noise in the onset of some syllables, coloured below as a hiss or a breath.
    unvoiced = rng.standard_normal(n) * np.where(u < onset[syl], np.sin(np.pi * u / np.maximum(onset[syl], 1e-6)),
                                                 0.0)

    # Filter syllable by syllable, all at once: cut each syllable's samples into a row, filter the rows
    # in one batched FFT (its vowel's formants for the voiced part, a hiss "s" or a breath "h" for the
    # consonant), then overlap-add the rows, ringing tails included, back in place.
    first = np.round(starts * VOICE_RATE).astype(np.int64)  # (k,)
    count = np.minimum(np.round(lengths * VOICE_RATE).astype(np.int64), n - first)
    width = int(count.max())
    size = _fft_size(width, room=2048)  # formant ringing dies out within ~20 ms (480 samples)
    cut = np.minimum(first[:, None] + np.arange(width), n - 1)  # (k, width) sample indices
    inside = np.arange(width) < count[:, None]
    rows = np.concatenate([voiced, unvoiced])[np.concatenate([cut, cut + n])] * np.tile(inside, (2, 1))
    freqs = np.fft.rfftfreq(size, 1.0 / VOICE_RATE)
    vowels = np.stack([_formants(freqs, f, voice.formant_scale, p.tilt) for f in VOWELS])  # (5, bins)
    frication = np.stack([np.exp(-0.5 * ((freqs - 6000.0 * voice.formant_scale) / 1800.0) ** 2),
                          1.0 / (1.0 + (freqs / 3000.0) ** 2)])  # (2, bins): hiss, breath
    response = np.concatenate([vowels[rng.integers(0, len(VOWELS), k)], frication[rng.integers(0, 2, k)]])
    shaped = np.fft.irfft(np.fft.rfft(rows, size) * response, size)  # (2k, size)
    # Voiced part at unit RMS over the speaking time, consonants a quarter of that over their onsets.
    shaped[:k] /= np.sqrt((shaped[:k] ** 2).sum() / max(1, np.count_nonzero(voiced))) + 1e-12
    shaped[k:] *= 0.25 / (np.sqrt((shaped[k:] ** 2).sum() / max(1, np.count_nonzero(unvoiced))) + 1e-12)
    spot = np.tile(first[:, None] + np.arange(size), (2, 1))
    keep = spot < n
    return np.bincount(spot[keep], weights=shaped[keep], minlength=n)


def _background(rng: np.random.Generator, channels: int, n: int) -> np.ndarray:
    """(channels, n) unit-RMS room noise: pink-ish hiss, sometimes with mains hum.

    One noise serves all channels, each shifted by a different delay: as decorrelated as a room
    recording needs, for the price of one FFT.
    """
    noise = _coloured_noise(rng, n, SAMPLE_RATE, lambda f: 1.0 / np.sqrt(np.maximum(f, 50.0)))
    if rng.random() < 0.3:
        t = np.arange(n) / SAMPLE_RATE
        mains = rng.choice([50.0, 60.0])
        noise += 0.3 * noise.std() * sum(np.sin(2 * np.pi * mains * h * t) / h for h in (1, 2, 3))
    noise /= np.sqrt(np.mean(noise ** 2)) + 1e-12
    return np.stack([np.roll(noise, 1009 * c) for c in range(channels)])


def _to_channels(rng: np.random.Generator, speech: np.ndarray, noise_rms: float, channels: int) -> np.ndarray:
    """(channels, n): speech in every front channel (the centre only, for 5.1) plus room noise."""
    if channels == 6:  # FL FR FC LFE BL BR, as in a film mix: dialogue in the centre
        mix = np.array([0.3, 0.3, 1.0, 0.0, 0.0, 0.0])
    else:
        mix = rng.uniform(0.85, 1.0, channels)
    return mix[:, None] * speech[None, :] + _background(rng, channels, speech.size) * noise_rms


def render_clip(spec: ClipSpec) -> np.ndarray:
    """The clip's samples at SAMPLE_RATE: float32 (channels, round(duration * SAMPLE_RATE)) in [-1, 1]."""
    rng = np.random.default_rng(list(spec.seed))
    n = max(1, round(spec.duration * SAMPLE_RATE))
    if spec.silent:
        return np.zeros((spec.channels, n), np.float32)
    p = _blend(spec.emotion, rng.uniform(0.35, 1.1))
    lead, trail = rng.uniform(0.08, 0.30, 2)
    span = spec.duration - lead - trail
    speech = np.zeros(n)
    # Speech level in dBFS: the emotion's loudness plus a random recording level.
    level = 10.0 ** ((-26.0 + p.gain_db + rng.uniform(-4.0, 4.0)) / 20.0)
    if span >= MIN_SPEECH_S:
        voice = _upsample2(_speech(rng, p, spec.voice, span))
        voice *= level / (np.sqrt(np.mean(voice ** 2)) + 1e-12)
        start = int(lead * SAMPLE_RATE)
        speech[start:start + voice.size] = voice
    snr_db = rng.uniform(6.0, 30.0)
    out = _to_channels(rng, speech, level * 10.0 ** (-snr_db / 20.0), spec.channels)
    peak = np.abs(out).max()
    if peak > 0.98:
        out *= 0.98 / peak
    return out.astype(np.float32)
