"""The seed article's pretraining augmentations: reverb, clipping, masking, pitch, environmental sounds.

Waveform augmentations work on padded batches ``[B, N]`` (48 kHz) on the batch's device and draw
from the torch RNG of that device, which the engine checkpoints.  Each is applied to an item with
its own probability ``p`` (0 = off) and draws its strength per item from a configured range:

* pitch modulation: f0 scaled by a ratio, duration kept (phase-vocoder stretch, then resample);
* reverb: convolution with a synthetic impulse response, exponentially decaying noise whose RT60
  is drawn from a range, plus the direct sound;
* clipping: hard clipping at a random fraction of the clip's peak;
* masking: SpecAugment-style time and frequency masks on the log-mel ``[B, 80, T]``.

Environmental-sound mixing follows the seed: â = λ·a_speech + (1 − λ)·a_env with λ drawn from
[0.01, 0.8], and the captions merged as "A person saying {speech}, background {env}", optionally
rewritten by a local generative language model.  It pairs whole samples, so it runs in the dataset
(:class:`clara.pretrain_data.EnvMixDataset`) with the helpers below.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import torch
import torchaudio

from clara.config import ConfigError
from clara.masking import length_mask

SAMPLE_RATE = 48_000
_LN_1000 = math.log(1000.0)  # 60 dB of amplitude decay


@dataclass(frozen=True)
class PitchConfig:
    p: float = 0.0
    ratio: tuple[float, float] = (0.89, 1.12)  # f0 multiplier, about +-2 semitones; quantised to 0.01


@dataclass(frozen=True)
class ReverbConfig:
    p: float = 0.0
    rt60: tuple[float, float] = (0.2, 1.0)  # seconds for the tail to decay by 60 dB
    drr_db: tuple[float, float] = (0.0, 10.0)  # direct-to-reverberant energy ratio


@dataclass(frozen=True)
class ClippingConfig:
    p: float = 0.0
    fraction: tuple[float, float] = (0.3, 0.9)  # clip level as a fraction of the item's peak


@dataclass(frozen=True)
class MaskingConfig:
    p: float = 0.0
    time_masks: int = 2
    max_time_width: int = 20  # frames (hop 512 at 48 kHz: 10.7 ms each)
    freq_masks: int = 2
    max_freq_width: int = 10  # mel bins
    fill: float = -1.0  # the floor of the normalised log-mel (-80 dB), i.e. silence


@dataclass(frozen=True)
class MixConfig:
    p: float = 0.0
    lam: tuple[float, float] = (0.01, 0.8)  # the speech's weight λ in λ·speech + (1 − λ)·env
    match_loudness: bool = True  # scale the env clip to the speech's RMS first, so λ sets the balance
    template: str = "A person saying {speech}, background {env}"
    lm_path: str = ""  # a LOCAL transformers model directory that rewrites merged captions; "" = template only
    lm_task: Literal["text-generation", "text2text-generation"] = "text-generation"
    lm_prompt: str = "Rewrite as one fluent sentence: {caption}\nSentence:"
    lm_max_new_tokens: int = 40


@dataclass(frozen=True)
class AugmentConfig:
    pitch: PitchConfig = field(default_factory=PitchConfig)
    reverb: ReverbConfig = field(default_factory=ReverbConfig)
    clipping: ClippingConfig = field(default_factory=ClippingConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    mix: MixConfig = field(default_factory=MixConfig)


def check_config(config: AugmentConfig) -> None:
    """Raise one ConfigError naming every out-of-range field."""
    problems = []
    ranges = {
        "pitch.ratio": (config.pitch.ratio, 0.25, 4.0),
        "reverb.rt60": (config.reverb.rt60, 0.01, 10.0),
        "reverb.drr_db": (config.reverb.drr_db, -30.0, 60.0),
        "clipping.fraction": (config.clipping.fraction, 0.0, 1.0),
        "mix.lam": (config.mix.lam, 0.0, 1.0),
    }
    for name, ((low, high), floor, ceiling) in ranges.items():
        if not floor <= low <= high <= ceiling:
            problems.append(f"{name} must be [low, high] with {floor} <= low <= high <= {ceiling}, got [{low}, {high}]")
    for name in ("pitch", "reverb", "clipping", "masking", "mix"):
        p = getattr(config, name).p
        if not 0.0 <= p <= 1.0:
            problems.append(f"{name}.p must be in [0, 1], got {p}")
    for name in ("time_masks", "max_time_width", "freq_masks", "max_freq_width"):
        if getattr(config.masking, name) < 0:
            problems.append(f"masking.{name} must be >= 0, got {getattr(config.masking, name)}")
    problems += filter(None, [_template_problem("mix.template", config.mix.template, ("speech", "env")),
                              _template_problem("mix.lm_prompt", config.mix.lm_prompt, ("caption",))])
    if problems:
        raise ConfigError("augment: " + "; ".join(problems))


def _template_problem(name: str, template: str, fields: tuple[str, ...]) -> str | None:
    """Why ``template`` cannot be filled in with exactly ``fields``, else None.  Checked when the config
    is read: the first mixed item would otherwise stop training with a KeyError or ValueError."""
    expected = " and ".join(f"{{{field}}}" for field in fields)
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
        if used == set(fields):
            template.format(**dict.fromkeys(fields, "text"))  # a format spec such as {speech:d} fails only here
            return None
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        return f"{name} must be text with the placeholders {expected} (a literal brace is written {{{{ or }}}}), " \
               f"got {template!r} ({err})"
    return f"{name} must use exactly the placeholders {expected}, got {template!r}"


def _uniform(low: float, high: float, count: int, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, device=device)


# -- pitch -------------------------------------------------------------------------------------


def pitch_shift(wave: torch.Tensor, ratio: float, *, n_fft: int = 1024, hop: int = 256) -> torch.Tensor:
    """Multiply f0 (and every frequency) of ``wave [..., N]`` by ``ratio``, keeping N samples.

    A phase vocoder first stretches the clip to ``ratio`` times its duration at the same pitch;
    resampling that by ``1 / ratio`` then plays it back ``ratio`` times faster, at the original
    duration.  ``ratio`` is rounded to a fraction with denominator <= 100 so the resampling filter
    stays short.
    """
    fraction = Fraction(ratio).limit_denominator(100)
    if fraction == 1:
        return wave
    shape, n = wave.shape[:-1], wave.shape[-1]
    # torch.stft's reflect padding needs more than n_fft // 2 samples: a shorter batch (clips under
    # 11 ms) is zero-padded to n_fft, as padding in a longer batch would, and cut back to n below.
    x = torch.nn.functional.pad(wave.reshape(-1, n), (0, max(0, n_fft - n)))  # [B, max(N, n_fft)]
    window = torch.hann_window(n_fft, device=wave.device)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)  # [B, F, T]
    phase_advance = torch.linspace(0, math.pi * hop, spec.shape[-2], device=wave.device)[:, None]  # [F, 1]
    stretched = torchaudio.functional.phase_vocoder(spec, 1.0 / float(fraction), phase_advance)
    longer = torch.istft(stretched, n_fft, hop, window=window, length=round(x.shape[-1] * float(fraction)))
    shifted = torchaudio.functional.resample(longer, fraction.numerator, fraction.denominator)
    shifted = shifted[..., :n]
    if shifted.shape[-1] < n:
        shifted = torch.nn.functional.pad(shifted, (0, n - shifted.shape[-1]))
    return shifted.reshape(*shape, n)


# -- reverb ------------------------------------------------------------------------------------


def synthetic_rir(rt60: torch.Tensor, drr_db: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Impulse responses [B, L] (L = the longest RT60 in samples) for RT60s and DRRs of shape [B].

    Sample 0 is the direct sound (1.0); the rest is Gaussian noise under an envelope that falls by
    60 dB at ``rt60``, scaled so its energy is ``drr_db`` below the direct sound's.
    """
    length = max(2, math.ceil(float(rt60.max()) * sample_rate))
    t = torch.arange(length, device=rt60.device) / sample_rate  # [L]
    envelope = torch.exp(-_LN_1000 * t[None, :] / rt60[:, None])  # [B, L]
    tail = torch.randn(rt60.shape[0], length, device=rt60.device) * envelope
    tail[:, 0] = 0.0
    tail_energy = tail.square().sum(dim=-1, keepdim=True).clamp_min(1e-12)  # [B, 1]
    tail = tail * torch.sqrt(10.0 ** (-drr_db[:, None] / 10.0) / tail_energy)
    tail[:, 0] = 1.0
    return tail


def reverberate(wave: torch.Tensor, rt60: torch.Tensor, drr_db: torch.Tensor, sample_rate: int = SAMPLE_RATE,
                lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``wave [B, N]`` convolved (FFT) with ``synthetic_rir``, cut to N samples, at the input's peak level.

    With ``lengths [B]`` (a padded batch) each item is cut to its own length: the reverberant tail
    that would run into the padding is dropped, so neither the output nor its peak level depends on
    how much padding follows."""
    rir = synthetic_rir(rt60, drr_db, sample_rate)  # [B, L]
    wet = torchaudio.functional.fftconvolve(wave, rir)[..., : wave.shape[-1]]  # [B, N]
    if lengths is not None:
        wet = wet * length_mask(lengths, wave.shape[-1])
    peak_in = wave.abs().amax(dim=-1, keepdim=True)
    peak_out = wet.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return wet * (peak_in / peak_out)


# -- clipping ----------------------------------------------------------------------------------


def hard_clip(wave: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Clip each item of ``wave [B, N]`` at ``fraction [B]`` of its own peak: |out| <= fraction * peak."""
    level = fraction[:, None] * wave.abs().amax(dim=-1, keepdim=True)  # [B, 1]
    return torch.maximum(torch.minimum(wave, level), -level)


# -- masking -----------------------------------------------------------------------------------


def _band_mask(count: int, max_width: int, size: torch.Tensor, axis_len: int) -> torch.Tensor:
    """[B, axis_len] bool: ``count`` bands per item, each of width in [0, max_width], inside [0, size)."""
    batch, device = size.shape[0], size.device
    positions = torch.arange(axis_len, device=device)
    mask = torch.zeros(batch, axis_len, dtype=torch.bool, device=device)
    for _ in range(count):
        width = torch.minimum(torch.randint(0, max_width + 1, (batch,), device=device), size)  # [B]
        start = (torch.rand(batch, device=device) * (size - width + 1)).long()  # [B]
        mask |= (positions >= start[:, None]) & (positions < (start + width)[:, None])
    return mask


def spec_mask(
    mel: torch.Tensor,
    frame_lengths: torch.Tensor,
    config: MaskingConfig,
    apply: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecAugment masks on ``mel [B, M, T]`` within each item's valid frames.

    Returns the masked mel and the mask ``[B, M, T]`` (True where ``config.fill`` was written);
    ``apply [B]`` bool picks the items to mask (default all).
    """
    batch, mels, frames = mel.shape
    lengths = frame_lengths.to(mel.device).clamp(0, frames)
    time = _band_mask(config.time_masks, config.max_time_width, lengths, frames)  # [B, T]
    freq = _band_mask(config.freq_masks, config.max_freq_width, torch.full_like(lengths, mels), mels)  # [B, M]
    valid = torch.arange(frames, device=mel.device)[None, :] < lengths[:, None]  # [B, T]
    mask = (time[:, None, :] | freq[:, :, None]) & valid[:, None, :]  # [B, M, T]
    if apply is not None:
        mask &= apply.to(mel.device)[:, None, None]
    return mel.masked_fill(mask, config.fill), mask


# -- environmental sounds ----------------------------------------------------------------------


def mix(speech: torch.Tensor, env: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """The seed's â = λ·speech + (1 − λ)·env (``lam`` a number, or one per item broadcast over samples)."""
    if isinstance(lam, torch.Tensor) and lam.ndim == 1 and speech.ndim == 2:
        lam = lam[:, None]
    return lam * speech + (1.0 - lam) * env


def fit_env(env: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """``env [M]`` looped from ``offset`` and cut to ``length`` samples (zeros if env is empty)."""
    if env.numel() == 0:
        return env.new_zeros(length)
    repeats = math.ceil((offset % env.numel() + length) / env.numel())
    return env.repeat(repeats)[offset % env.numel() : offset % env.numel() + length]


def rms(wave: torch.Tensor) -> torch.Tensor:
    return wave.square().mean(dim=-1).sqrt()


def merge_captions(template: str, speech: str, env: str) -> str:
    return template.format(speech=speech.strip().rstrip("."), env=env.strip().rstrip("."))


class CaptionRewriter:
    """Rewrites merged captions with a local transformers model (loaded lazily, never downloaded)."""

    def __init__(self, config: MixConfig):
        path = Path(config.lm_path).expanduser()
        if not path.is_dir():
            raise ConfigError(f"augment.mix.lm_path: {path} is not a local model directory")
        self.path = path
        self.config = config
        self._model = None
        self._tokenizer = None

    def __call__(self, caption: str) -> str:
        text = self._generate(self.config.lm_prompt.format(caption=caption)).strip()
        first_line = text.splitlines()[0].strip() if text else ""
        return first_line or caption  # an empty rewrite keeps the template's caption

    def _generate(self, prompt: str) -> str:
        """The model's greedy answer to ``prompt``: a causal model's continuation, a seq2seq model's output."""
        causal = self.config.lm_task == "text-generation"
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

            # generate() itself, not a pipeline: transformers 5 removed the text2text-generation pipeline.
            model_class = AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM
            self._model = model_class.from_pretrained(self.path, local_files_only=True).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        inputs = self._tokenizer(prompt, return_tensors="pt")
        prompt_ids = inputs["input_ids"]  # [1, P]
        ids = self._model.generate(prompt_ids, attention_mask=inputs["attention_mask"],
                                   max_new_tokens=self.config.lm_max_new_tokens, do_sample=False)  # fmt: skip
        if causal:
            ids = ids[:, prompt_ids.shape[1] :]  # [1, P + new] -> the new tokens only
        return self._tokenizer.decode(ids[0], skip_special_tokens=True)

    def __getstate__(self) -> dict:
        # DataLoader workers get the path, not a loaded model; each loads its own on first use.
        return {**self.__dict__, "_model": None, "_tokenizer": None}


# -- the batch pipelines -----------------------------------------------------------------------


class WaveAugment:
    """Pitch, reverb and clipping on a padded batch ``[B, N]``, in that order (clipping last, as a
    recorder would clip the reverberant signal)."""

    def __init__(self, config: AugmentConfig, sample_rate: int = SAMPLE_RATE):
        check_config(config)
        self.config = config
        self.sample_rate = sample_rate

    def __call__(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``wave [B, N]``, with each item's ``lengths [B]`` when the batch is padded: the padding then
        stays silent after each step, and no step's level (reverb's peak, the clipping level) reads it."""
        # float32 also under an outer autocast: FFTs and resampling filters lose too much in half precision.
        with torch.autocast(wave.device.type, enabled=False):
            return self._augment(wave.float().clone(), lengths)

    def _augment(self, wave: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        batch, device = wave.shape[0], wave.device
        pitch, reverb, clipping = self.config.pitch, self.config.reverb, self.config.clipping
        if pitch.p > 0:
            chosen = torch.rand(batch, device=device) < pitch.p
            ratios = torch.round(_uniform(*pitch.ratio, batch, device) * 100) / 100
            _shift_pitches(wave, chosen, ratios, lengths)
        if reverb.p > 0:
            rows = torch.nonzero(torch.rand(batch, device=device) < reverb.p).squeeze(1)
            if rows.numel():
                rt60 = _uniform(*reverb.rt60, rows.numel(), device)
                drr = _uniform(*reverb.drr_db, rows.numel(), device)
                wave[rows] = reverberate(wave[rows], rt60, drr, self.sample_rate,
                                         None if lengths is None else lengths[rows])  # fmt: skip
        if clipping.p > 0:
            rows = torch.nonzero(torch.rand(batch, device=device) < clipping.p).squeeze(1)
            if rows.numel():
                wave[rows] = hard_clip(wave[rows], _uniform(*clipping.fraction, rows.numel(), device))
        return wave


def _shift_pitches(wave: torch.Tensor, chosen: torch.Tensor, ratios: torch.Tensor, lengths: torch.Tensor | None) -> None:
    """Pitch-shift the ``chosen [B]`` items of ``wave [B, N]`` in place by their ``ratios [B]``, each over
    its own length: the vocoder's STFT and the resampler read past an item's end, so a padded item
    shifted whole would change with the padding after it.  Items sharing a ratio and a length go
    through the vocoder together; a shifted item's padding becomes silence."""
    n = wave.shape[-1]
    lengths = torch.full_like(ratios, n, dtype=torch.long) if lengths is None else lengths.to(wave.device)
    for ratio, length in set(zip(ratios[chosen].tolist(), lengths[chosen].tolist())):
        rows = torch.nonzero(chosen & (ratios == ratio) & (lengths == length)).squeeze(1)
        wave[rows] = torch.nn.functional.pad(pitch_shift(wave[rows, :length], ratio), (0, n - length))


class MelAugment:
    """Time and frequency masks on log-mel batches ``[B, M, T]``, each item with probability p."""

    def __init__(self, config: MaskingConfig):
        self.config = config

    def __call__(self, mel: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        if self.config.p <= 0:
            return mel
        apply = torch.rand(mel.shape[0], device=mel.device) < self.config.p
        return spec_mask(mel, frame_lengths, self.config, apply)[0]
