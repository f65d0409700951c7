"""CLARA's audio front-end: 48 kHz mono waveform -> normalised log-mel spectrogram.

It computes what the reference computes per clip with librosa, batched in torch:

1. power mel spectrogram: n_fft 1024, hann window of 1024, hop 512, ``center=True`` with **zero**
   padding (librosa's default ``pad_mode="constant"`` since 0.9; the reference pinned 0.10), 80 mels
   over 0-8000 Hz, Slaney mel scale with Slaney area normalisation;
2. ``power_to_db(S, ref=np.max, amin=1e-10, top_db=80)``: dB relative to the clip's own maximum,
   floored at -80, so the range is [-80, 0];
3. ``(dB + 40) / 40``, so the range is [-1, 1].

Layout is ``[..., 80, T]`` with ``T = 1 + N // 512``. The model's position table takes at most 8192
frames (after its stride-2 convolution); cropping longer clips is the caller's business.

Zero-padded batches: given ``lengths``, each item is treated exactly as if it were alone. Because
centre padding is zero padding, an item followed by zeros gives the same valid frames as the item
alone, so only two things need masking: the dB reference (the maximum over the item's own valid
frames) and the frames past the item's end, which are set to exactly 0.0.
"""

from __future__ import annotations

import warnings

import torch
import torchaudio

SAMPLE_RATE = 48_000
HOP_LENGTH = 512
N_MELS = 80

_AMIN = 1e-10  # librosa's power_to_db floor: keeps log10 finite for silence


def num_frames(num_samples: int | torch.Tensor) -> int | torch.Tensor:
    """Frames a centred STFT with hop 512 gives for ``num_samples`` samples: ``1 + N // 512``."""
    return 1 + num_samples // HOP_LENGTH


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """librosa's default (Slaney) mel filters, [n_fft // 2 + 1, n_mels]."""
    with warnings.catch_warnings():
        # torchaudio warns of filters that fall between two FFT bins; empty_mel_bands names them instead.
        warnings.simplefilter("ignore", UserWarning)
        return torchaudio.functional.melscale_fbanks(
            n_freqs=n_fft // 2 + 1, f_min=f_min, f_max=f_max, n_mels=n_mels, sample_rate=sample_rate,
            norm="slaney", mel_scale="slaney",
        )  # fmt: skip


def empty_mel_bands(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> list[int]:
    """The mel bands (0-based) that no FFT bin reaches: too many mels for the band f_min..f_max at this
    FFT size.  Such a band's log-mel is the dB floor in every frame, a feature that carries nothing."""
    fbank = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)
    return torch.nonzero(fbank.amax(dim=0) == 0).flatten().tolist()


def resample_to_48k(waveform: torch.Tensor, orig_sr: int) -> torch.Tensor:
    """Resample a float waveform ``[..., N]`` at ``orig_sr`` Hz to 48 kHz, ``[..., ceil(N * 48000 / orig_sr)]``.

    Returns the input itself when it is already at 48 kHz.
    """
    if orig_sr == SAMPLE_RATE:
        return waveform
    return torchaudio.functional.resample(waveform, orig_freq=orig_sr, new_freq=SAMPLE_RATE)


class LogMel(torch.nn.Module):
    """Waveform ``[..., N]`` (mono, 48 kHz) -> reference-normalised log-mel ``[..., n_mels, T]``.

    The window and the filterbank are non-persistent buffers: they follow ``.to(device)`` but stay
    out of ``state_dict``, so checkpoints of a model holding this module keep the reference's keys.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = 1024,
        hop_length: int = HOP_LENGTH,
        n_mels: int = N_MELS,
        f_min: float = 0.0,
        f_max: float = 8000.0,
        top_db: float = 80.0,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.top_db = top_db
        # librosa's "hann" is the periodic (fftbins=True) window.
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        fbank = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)  # [F, n_mels]
        self.register_buffer("mel_fbank", fbank.T.contiguous(), persistent=False)  # [n_mels, F]

    def forward(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel of a (possibly zero-padded) batch.

        Args:
            waveform: ``[..., N]`` float, mono, 48 kHz; a 1-D ``[N]`` clip works too.
            lengths: valid samples per item, shape ``waveform.shape[:-1]`` (``[B]`` for ``[B, N]``),
                values clamped to ``[0, N]``; ``None`` means every sample is valid.

        Returns:
            ``(log_mel, frame_lengths)``: ``log_mel`` is ``[..., n_mels, T]`` float32 with
            ``T = 1 + N // hop``, valid values in [-1, 1] and exactly 0.0 past each item's
            ``1 + length // hop`` frames; ``frame_lengths`` is long with shape
            ``waveform.shape[:-1]``, so a 1-D clip gives ``[n_mels, T]`` and a 0-d length.
        """
        if waveform.dim() == 0 or waveform.shape[-1] == 0:
            raise ValueError(f"LogMel needs a waveform [..., N] with N >= 1 samples, got shape {tuple(waveform.shape)}")
        batch_shape, n = waveform.shape[:-1], waveform.shape[-1]
        if lengths is not None and lengths.shape != batch_shape:
            raise ValueError(f"lengths has shape {tuple(lengths.shape)}; expected {tuple(batch_shape)}, one per waveform")
        device = waveform.device
        # float32 throughout, also under an outer autocast or after ``module.half()``: half-precision
        # maths would cost far more than the 1e-3 agreement with librosa allows near the -80 dB floor.
        with torch.autocast(device.type, enabled=False):
            x = waveform.to(torch.float32).reshape(-1, n)  # [B, N]
            window = self.window.to(torch.float32)  # [n_fft]
            mel_fbank = self.mel_fbank.to(torch.float32)  # [n_mels, F]
            if lengths is None:
                lengths = torch.full((x.shape[0],), n, dtype=torch.long, device=device)
            else:
                lengths = lengths.to(device=device, dtype=torch.long).reshape(-1).clamp(0, n)
                # Whatever lies past an item's end is replaced by the zeros that centre padding
                # would put there if the item were alone.
                x = x.masked_fill(torch.arange(n, device=device) >= lengths[:, None], 0.0)

            spec = torch.stft(
                x,
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                window=window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            )  # [B, F, T]
            power = spec.real.square() + spec.imag.square()  # [B, F, T]
            mel = torch.matmul(mel_fbank, power)  # [B, n_mels, T]

            frame_lengths = 1 + lengths // self.hop_length  # [B]
            invalid = torch.arange(mel.shape[-1], device=device) >= frame_lengths[:, None]  # [B, T]
            invalid = invalid[:, None, :]  # [B, 1, T]
            # ref = each item's own maximum over its valid frames (mel >= 0, so 0 is neutral).
            ref = mel.masked_fill(invalid, 0.0).amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
            db = 10.0 * torch.log10(mel.clamp_min(_AMIN)) - 10.0 * torch.log10(ref.clamp_min(_AMIN))
            # The item's peak is 0 dB by construction, so librosa's "peak - top_db" floor is -top_db.
            db = db.clamp_min(-self.top_db)
            log_mel = ((db + 40.0) / 40.0).masked_fill(invalid, 0.0)  # [B, n_mels, T]

        return log_mel.reshape(*batch_shape, *log_mel.shape[-2:]), frame_lengths.reshape(batch_shape)
