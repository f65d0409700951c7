"""A small synthetic audio-caption set for the pretraining demo, generated deterministically in seconds.

Every clip is a voice-like harmonic sound whose caption says what one can hear: its pitch (high or
low), its intonation (rising, falling or steady), its syllable rate (fast or slow) and its
background (a quiet room, rain, wind or an electrical hum): 2 x 3 x 2 x 4 = 48 kinds.  Clips of one
kind differ in f0, timing, vowel colour and noise, and the training captions vary their wording,
so retrieval has to be learned from the sound.  The held-out set holds one new clip per kind with a
unique caption (chance R@1 is 1/48).  A separate set of environmental sounds (rain, wind, hum,
birdsong) feeds the environmental-sound mixing augmentation.

Audio is written as 16-bit 16 kHz WAV (the model's mel stops at 8 kHz; loading resamples to 48 kHz),
with JSONL manifests beside it.
"""

from __future__ import annotations

import itertools
import json
import wave
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clara.config import ConfigError
from clara.io_utils import NOT_WRITABLE, atomic_directory, locked, user_cache_dir

DEMO_VERSION = 1
SAMPLE_RATE = 16_000

PITCHES = {"high": (210.0, 290.0), "low": (85.0, 125.0)}  # f0 ranges in Hz
CONTOURS = ("rising", "falling", "steady")
RATES = {"fast": (6.0, 8.0), "slow": (2.0, 3.0)}  # syllables per second
BACKGROUNDS = ("quiet", "rain", "wind", "hum")
ENV_KINDS = {"rain": "rain", "wind": "wind noise", "hum": "an electrical hum", "birds": "birds chirping"}

_BACKGROUND_PHRASES = {
    "quiet": ("in a quiet room", "with no background noise"),
    "rain": ("over rain", "with rain in the background"),
    "wind": ("over wind", "with wind noise behind it"),
    "hum": ("over an electrical hum", "with a hum in the background"),
}
_RATE_PHRASES = {"fast": ("speaking fast", "with quick syllables"), "slow": ("speaking slowly", "with slow syllables")}
_CONTOUR_PHRASES = {
    "rising": ("rising", "going up in pitch"),
    "falling": ("falling", "going down in pitch"),
    "steady": ("steady", "keeping a flat pitch"),
}


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    train: Path  # manifests
    eval: Path
    env: Path


def caption(pitch: str, contour: str, rate: str, background: str, wording: int = 0) -> str:
    """The caption of one kind; ``wording`` 0 or 1 picks the phrasing of each part independently."""
    bits = [(wording >> shift) & 1 for shift in range(3)]
    return (
        f"a {pitch}-pitched voice {_CONTOUR_PHRASES[contour][bits[0]]}, "
        f"{_RATE_PHRASES[rate][bits[1]]}, {_BACKGROUND_PHRASES[background][bits[2]]}"
    )


def _colored_noise(rng: np.random.Generator, n: int, gain) -> np.ndarray:
    """White noise shaped in the frequency domain by ``gain(freqs_hz)``, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    noise = np.fft.irfft(spectrum * gain(freqs), n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def environment(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """One environmental sound of ``n`` samples, unit RMS."""
    t = np.arange(n) / SAMPLE_RATE
    if kind == "rain":
        hiss = _colored_noise(rng, n, lambda f: (f > 1500) * 1.0)
        drops = np.zeros(n)
        drops[rng.integers(0, n, size=int(40 * n / SAMPLE_RATE))] = rng.uniform(2, 6, size=int(40 * n / SAMPLE_RATE))
        drops = np.convolve(drops, np.exp(-np.arange(80) / 12.0) * np.sin(np.arange(80) * 1.3))[:n]
        sound = hiss + drops
    elif kind == "wind":
        gust = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 2 * np.pi))
        sound = _colored_noise(rng, n, lambda f: 1.0 / (1.0 + (f / 300.0) ** 2)) * gust
    elif kind == "hum":
        mains = rng.choice([50.0, 60.0])
        sound = sum(np.sin(2 * np.pi * mains * h * t) / h for h in range(1, 12))
        sound = sound + 0.05 * rng.standard_normal(n)
    elif kind == "birds":
        sound = 0.02 * rng.standard_normal(n)
        for start in rng.integers(0, max(1, n - 2400), size=max(1, int(6 * n / SAMPLE_RATE))):
            length = int(rng.integers(800, 2400))
            phase = np.cumsum(np.linspace(rng.uniform(2500, 3500), rng.uniform(4000, 6000), length)) / SAMPLE_RATE
            sound[start : start + length] += np.sin(2 * np.pi * phase) * np.hanning(length)
    else:
        raise ValueError(f"unknown environment kind {kind!r}; expected one of {', '.join(ENV_KINDS)}")
    return sound / (np.sqrt(np.mean(sound**2)) + 1e-12)


def voice(pitch: str, contour: str, rate: str, background: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A voice-like clip: harmonics of a moving f0 under vowel formants, in syllables, over a background."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0_start = rng.uniform(*PITCHES[pitch])
    glide = {"rising": rng.uniform(1.3, 1.6), "falling": 1.0 / rng.uniform(1.3, 1.6), "steady": 1.0}[contour]
    f0 = f0_start * glide ** (t / seconds) * (1.0 + 0.01 * np.sin(2 * np.pi * 5.0 * t))  # [n], slight vibrato
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formants = rng.uniform([500.0, 1000.0], [900.0, 2200.0])  # a vowel colour per clip
    signal = np.zeros(n)
    for harmonic in range(1, 40):
        frequency = harmonic * f0
        weight = sum(np.exp(-(((frequency - f) / 150.0) ** 2)) for f in formants) + 0.05
        signal += weight * np.sin(harmonic * phase) * (frequency < SAMPLE_RATE / 2)
    syllables = rng.uniform(*RATES[rate])
    syllable_phase = syllables * t + rng.uniform(0, 1)
    envelope = np.clip(np.sin(np.pi * (syllable_phase % 1.0)) * 1.4, 0, 1) ** 2  # gaps between syllables
    signal = signal * envelope
    signal /= np.sqrt(np.mean(signal**2)) + 1e-12
    if background == "quiet":
        signal = signal + 0.003 * rng.standard_normal(n)
    else:
        signal = signal + environment(background, rng, n) * 10 ** (-rng.uniform(6.0, 12.0) / 20.0)
    return signal


def _write_wav(path: Path, signal: np.ndarray) -> None:
    pcm = np.clip(signal / (np.abs(signal).max() + 1e-12) * 0.9, -1, 1)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes((pcm * 32767).astype("<i2").tobytes())


def _write_manifest(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _read_stamp(path: Path) -> object:
    """The stamp of a finished build (what ``build_demo`` wrote to ``demo.json``); None when there is
    none or it cannot be read (a build of another kind, or a damaged file: rebuilt)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Hold the lock under which builds of ``root`` take turns (two terminals, or every process of a
    torchrun).  Its file sits beside ``root``, as ``root`` is replaced whole; a folder the user may
    not write there is one error naming it."""
    with ExitStack() as lock:
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            lock.enter_context(locked(root.parent / f".{root.name}.lock"))
        except OSError as error:
            if error.errno not in NOT_WRITABLE:
                raise
            raise ConfigError(f"{root.parent}: cannot be written to build the pretraining demo {root.name} there, "
                              "and no finished build of these settings is there; give data.demo_dir a folder you "
                              "can write") from None
        yield


def build_demo(
    root: str | Path | None = None,
    *,
    train_per_kind: int = 5,
    eval_per_kind: int = 1,
    env_per_kind: int = 3,
    seconds: float = 1.0,
    seed: int = 0,
) -> DemoPaths:
    """Build the demo under ``root`` (default ``user_cache_dir()/demo-pairs``) unless an identical build is there.

    An earlier build with other settings is replaced; a ``root`` that holds anything else (or is a
    file) is refused with a ConfigError, as the build would replace it as a whole.  A finished build is
    used without writing anything, so a folder the user may only read serves as well."""
    root = Path(root) if root is not None else user_cache_dir() / "demo-pairs"
    stamp = {"version": DEMO_VERSION, "seconds": seconds, "seed": seed}
    stamp.update(train=train_per_kind, eval=eval_per_kind, env=env_per_kind)
    paths = DemoPaths(root, root / "train.jsonl", root / "eval.jsonl", root / "env.jsonl")
    stamp_file = root / "demo.json"
    # Checked before the lock, whose file could not be made beside a build the user may only read; the
    # stamp is the last file of a build, so one under way in another process is not taken for finished.
    if _read_stamp(stamp_file) == stamp:
        return paths
    # An older or broken build is replaced below, as a whole; anything else at ``root`` is someone's
    # files, which that replacement would delete.
    if root.exists() and not stamp_file.is_file() and not (root.is_dir() and not any(root.iterdir())):
        what = "a folder holding other files" if root.is_dir() else "not a folder"
        raise ConfigError(f"{root}: {what}, not a demo build; give data.demo_dir a new or empty folder")

    with _build_lock(root):
        if _read_stamp(stamp_file) == stamp:  # the build this one waited for made it
            return paths
        # Built beside ``root`` and swapped in whole: the old build is set aside before it is deleted, as
        # deleted in place an interruption could leave it without its stamp, a folder refused above.
        with atomic_directory(root) as staging:
            rng = np.random.default_rng(seed)
            kinds = list(itertools.product(PITCHES, CONTOURS, RATES, BACKGROUNDS))
            for split, per_kind in (("train", train_per_kind), ("eval", eval_per_kind)):
                (staging / split).mkdir()
                rows = []
                for copy, kind in itertools.product(range(per_kind), kinds):
                    name = f"{split}/{len(rows):05d}.wav"
                    _write_wav(staging / name, voice(*kind, rng, seconds))
                    # Held-out captions use one wording, so each kind has exactly one caption there.
                    wording = 0 if split == "eval" else int(rng.integers(8))
                    rows.append({"audio": name, "caption": caption(*kind, wording), "language": "en"})
                _write_manifest(staging / f"{split}.jsonl", rows)
            (staging / "env").mkdir()
            rows = []
            for copy, (kind, text) in itertools.product(range(env_per_kind), ENV_KINDS.items()):
                name = f"env/{kind}-{copy}.wav"
                _write_wav(staging / name, environment(kind, rng, int(2 * seconds * SAMPLE_RATE)))
                rows.append({"audio": name, "caption": text, "language": "en"})
            _write_manifest(staging / "env.jsonl", rows)
            (staging / "demo.json").write_text(json.dumps(stamp), encoding="utf-8")
    return paths
