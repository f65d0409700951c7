"""Each augmentation does what it must: λ range and formula, clip bounds, mask widths, f0 ratio, reverb tail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clara.augment import (
    AugmentConfig,
    CaptionRewriter,
    ClippingConfig,
    MaskingConfig,
    MixConfig,
    PitchConfig,
    ReverbConfig,
    WaveAugment,
    check_config,
    fit_env,
    hard_clip,
    merge_captions,
    mix,
    pitch_shift,
    reverberate,
    spec_mask,
    synthetic_rir,
)
from clara.config import ConfigError, from_dict
from clara.pretrain_data import EnvMixDataset

SR = 48_000


def harmonic_tone(f0: float, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return sum(torch.sin(2 * math.pi * f0 * h * t) / h for h in (1, 2, 3)).float()


def fundamental(wave: torch.Tensor, low: float = 80.0, high: float = 600.0) -> float:
    """The strongest spectral peak in [low, high] Hz, refined by parabolic interpolation."""
    x = wave.double().numpy() * np.hanning(wave.numel())
    spectrum = np.abs(np.fft.rfft(x, 8 * x.size))
    freqs = np.fft.rfftfreq(8 * x.size, 1 / SR)
    band = np.nonzero((freqs >= low) & (freqs <= high))[0]
    i = band[np.argmax(spectrum[band])]
    a, b, c = np.log(spectrum[i - 1 : i + 2])
    return float(freqs[i] + 0.5 * (a - c) / (a - 2 * b + c) * (freqs[1] - freqs[0]))


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, waves, captions):
        self.waves, self.captions = waves, captions

    def __len__(self):
        return len(self.waves)

    def __getitem__(self, i):
        return {"wave": self.waves[i], "caption": self.captions[i], "language": "en"}


# -- environmental-sound mixing ---------------------------------------------------------------


def test_mix_is_the_seed_formula():
    speech, env = torch.randn(3, 100), torch.randn(3, 100)
    lam = torch.tensor([0.01, 0.5, 0.8])
    assert torch.allclose(mix(speech, env, lam), lam[:, None] * speech + (1 - lam[:, None]) * env)
    assert torch.allclose(mix(speech[0], env[0], 0.3), 0.3 * speech[0] + 0.7 * env[0])


def _is_looped_from(part: torch.Tensor, clip: torch.Tensor) -> bool:
    """Whether ``part`` is ``clip`` looped from some offset (``fit_env``)."""
    starts = torch.nonzero((clip - part[0]).abs() < 1e-4).flatten().tolist()
    return any(torch.allclose(part, fit_env(clip, part.numel(), start), atol=1e-4) for start in starts)


def test_env_mixing_draws_lambda_in_range_and_applies_the_formula():
    n = 480
    speech = [torch.randn(n) for _ in range(64)]
    env = _Pairs([torch.randn(700) for _ in range(3)], ["rain", "wind noise", "hum"])
    config = MixConfig(p=1.0, lam=(0.01, 0.8), match_loudness=False)
    dataset = EnvMixDataset(_Pairs(speech, [f"word {i}" for i in range(64)]), env, config, seed=0)
    lams = []
    for i in range(64):
        item = dataset[i]
        lam = item["lam"]
        lams.append(lam)
        assert 0.01 <= lam <= 0.8
        # The env part is the mixture minus the speech part; it must be one env clip, looped.
        env_part = (item["wave"] - lam * speech[i]) / (1 - lam)
        matches = [_is_looped_from(env_part, clip["wave"]) for clip in env]
        assert sum(matches) == 1
        env_caption = env.captions[matches.index(True)]
        assert item["caption"] == f"A person saying word {i}, background {env_caption}"
    assert max(lams) - min(lams) > 0.5  # the draws spread over the range


def test_env_mixing_is_a_function_of_seed_epoch_and_index():
    speech = _Pairs([torch.randn(200) for _ in range(8)], ["a"] * 8)
    env = _Pairs([torch.randn(300)], ["rain"])
    first = EnvMixDataset(speech, env, MixConfig(p=0.5), seed=3)
    second = EnvMixDataset(speech, env, MixConfig(p=0.5), seed=3)
    assert all(torch.equal(first[i]["wave"], second[i]["wave"]) for i in range(8))
    second.set_epoch(1)
    assert not all(torch.equal(first[i]["wave"], second[i]["wave"]) for i in range(8))


def test_loudness_matching_scales_env_to_the_speech_rms():
    speech = _Pairs([torch.full((100,), 0.5)], ["a"])
    env = _Pairs([torch.full((100,), 4.0)], ["hum"])
    item = EnvMixDataset(speech, env, MixConfig(p=1.0, match_loudness=True), seed=0)[0]
    assert torch.allclose(item["wave"], torch.full((100,), 0.5))  # λ·0.5 + (1 − λ)·0.5


def test_caption_merge_template():
    assert merge_captions("A person saying {speech}, background {env}", "it's raining outside.", " wind noise") == (
        "A person saying it's raining outside, background wind noise"
    )


# -- clipping ---------------------------------------------------------------------------------


def test_hard_clip_bounds():
    wave = torch.randn(4, 1000) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    fraction = torch.tensor([0.3, 0.5, 0.7, 0.9])
    clipped = hard_clip(wave, fraction)
    peak = wave.abs().amax(dim=1)
    assert torch.all(clipped.abs().amax(dim=1) <= fraction * peak + 1e-6)
    assert torch.allclose(clipped.abs().amax(dim=1), fraction * peak)  # the level is reached
    inside = wave.abs() < (fraction * peak)[:, None]
    assert torch.equal(clipped[inside], wave[inside])  # samples under the level are untouched


# -- masking ----------------------------------------------------------------------------------


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, count = [], 0
    for value in row.tolist() + [False]:
        if value:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs


def test_spec_mask_widths_and_fill():
    config = MaskingConfig(p=1.0, time_masks=1, max_time_width=7, freq_masks=1, max_freq_width=5, fill=-1.0)
    mel = torch.rand(64, 80, 50) + 0.5  # never equal to the fill
    lengths = torch.randint(20, 51, (64,))
    masked, mask = spec_mask(mel, lengths, config)
    assert torch.all(masked[mask] == -1.0)
    assert torch.equal(masked[~mask], mel[~mask])
    widths_seen = set()
    for b in range(64):
        time_cols = mask[b].all(dim=0)  # frames masked in every bin: the time mask
        freq_rows = mask[b, :, : int(lengths[b])].all(dim=1)  # bins masked over all valid frames
        for width in _runs(time_cols):
            assert width <= 7
            widths_seen.add(width)
        assert all(width <= 5 for width in _runs(freq_rows))
        assert not mask[b, :, int(lengths[b]) :].any()  # padding frames are never masked
    assert max(widths_seen) >= 5  # the widths really spread up to the bound


def test_spec_mask_apply_selects_items():
    config = MaskingConfig(p=1.0, time_masks=2, max_time_width=10, freq_masks=2, max_freq_width=10)
    _, mask = spec_mask(torch.rand(2, 80, 40), torch.tensor([40, 40]), config, apply=torch.tensor([True, False]))
    assert not mask[1].any()


# -- pitch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.8, 1.12, 1.25])
def test_pitch_shift_moves_f0_by_the_ratio_and_keeps_length(ratio):
    tone = harmonic_tone(200.0)
    shifted = pitch_shift(tone[None], ratio)[0]
    assert shifted.shape == tone.shape
    assert fundamental(tone) == pytest.approx(200.0, rel=0.01)
    assert fundamental(shifted) == pytest.approx(200.0 * ratio, rel=0.03)


def test_wave_augment_pitch_keeps_shape():
    config = AugmentConfig(pitch=PitchConfig(p=1.0, ratio=(1.1, 1.1)))
    waves = torch.stack([harmonic_tone(150.0, 0.5), harmonic_tone(250.0, 0.5)])
    out = WaveAugment(config)(waves)
    assert out.shape == waves.shape
    assert fundamental(out[0]) == pytest.approx(165.0, rel=0.03)


def test_pitch_shift_of_a_batch_shorter_than_the_fft_is_the_zero_padded_shift():
    """A batch whose longest clip is under 513 samples (11 ms) used to stop training: torch.stft's
    reflect padding needs more samples than n_fft // 2.  It is now shifted as it would be inside a
    longer, zero-padded batch: the first 300 samples of the 1,024-sample shift."""
    torch.manual_seed(0)
    short = torch.randn(2, 300)
    padded = torch.cat([short, torch.zeros(2, 724)], dim=1)
    for ratio in (0.9, 1.12):
        torch.testing.assert_close(pitch_shift(short, ratio), pitch_shift(padded, ratio)[:, :300])
    out = WaveAugment(AugmentConfig(pitch=PitchConfig(p=1.0, ratio=(1.1, 1.1))))(short, torch.tensor([300, 120]))
    assert out.shape == (2, 300) and not out[1, 120:].any() and out[0].abs().amax() > 0.1


# -- reverb -----------------------------------------------------------------------------------


def _decay_time(response: torch.Tensor, db: float) -> float:
    """Seconds until the backward-integrated (Schroeder) energy falls ``db`` below its start."""
    energy = response.double().square().flip(0).cumsum(0).flip(0)
    curve = 10 * torch.log10(energy / energy[0])
    return float(torch.nonzero(curve < -db)[0, 0]) / SR


def test_reverb_tail_grows_with_rt60_and_length_is_kept():
    impulse = torch.zeros(3, 2 * SR)
    impulse[:, 0] = 1.0
    rt60 = torch.tensor([0.2, 0.5, 1.0])
    out = reverberate(impulse, rt60, torch.zeros(3))
    assert out.shape == impulse.shape
    # With DRR 0 dB half the energy is the direct sound (-3 dB at once); the tail then loses 60 dB
    # per RT60, so the curve crosses -23 dB at 20/60 of the RT60.
    times = [_decay_time(out[i], 23.0) for i in range(3)]
    assert times[0] < times[1] < times[2]
    for time, expected in zip(times, rt60.tolist()):
        assert time == pytest.approx(expected / 3, rel=0.25)


def test_synthetic_rir_direct_to_reverberant_ratio():
    rir = synthetic_rir(torch.tensor([0.4, 0.4]), torch.tensor([0.0, 10.0]))
    tail_energy = rir[:, 1:].square().sum(dim=1)
    assert torch.allclose(rir[:, 0], torch.ones(2))
    assert torch.allclose(tail_energy, torch.tensor([1.0, 0.1]), rtol=1e-4)


def test_wave_augment_keeps_peak_under_reverb_and_clips():
    config = AugmentConfig(reverb=ReverbConfig(p=1.0), clipping=ClippingConfig(p=1.0, fraction=(0.5, 0.5)))
    waves = torch.randn(4, SR // 2)
    out = WaveAugment(config)(waves)
    assert out.shape == waves.shape
    assert torch.allclose(out.abs().amax(dim=1), 0.5 * waves.abs().amax(dim=1), rtol=1e-4)


def test_a_padded_item_is_augmented_as_it_would_be_alone():
    """With the batch's lengths, reverb and clipping treat a padded item as the same item unpadded:
    equal samples over its length (same random draws), silence after it.  Without them the
    reverberant tail runs on into the padding (and into the peaks that set the levels)."""
    config = AugmentConfig(reverb=ReverbConfig(p=1.0, rt60=(0.8, 0.8)), clipping=ClippingConfig(p=1.0, fraction=(0.5, 0.5)))
    torch.manual_seed(0)
    wave = torch.randn(1, SR // 4)
    padded = torch.cat([wave, torch.zeros(1, SR // 2)], dim=1)
    lengths = torch.tensor([wave.shape[1]])
    torch.manual_seed(1)
    alone = WaveAugment(config)(wave)
    torch.manual_seed(1)
    together = WaveAugment(config)(padded, lengths)
    torch.testing.assert_close(together[:, : wave.shape[1]], alone, rtol=1e-4, atol=1e-6)
    assert not together[:, wave.shape[1] :].any()
    torch.manual_seed(1)
    unaware = WaveAugment(config)(padded)
    assert unaware[:, wave.shape[1] :].abs().amax() > 1e-3


@pytest.mark.parametrize("ratio", [0.89, 1.12])
def test_a_padded_item_is_pitch_shifted_as_it_would_be_alone(ratio):
    """The vocoder's STFT and the resampler read past an item's end: a padded batch shifted whole
    changed each item's last ~15 ms with the padding after it (by a quarter of the item's peak).
    Items of one length still share a vocoder call and get the same result."""
    config = AugmentConfig(pitch=PitchConfig(p=1.0, ratio=(ratio, ratio)))
    torch.manual_seed(0)
    short, long = torch.randn(SR // 4) * 0.1, torch.randn(SR // 2) * 0.1
    batch = torch.zeros(3, SR // 2 + 5000)  # padded past the longest, as data.frames_multiple pads
    for row, item in enumerate((short, long, short)):
        batch[row, : item.numel()] = item
    together = WaveAugment(config)(batch, torch.tensor([short.numel(), long.numel(), short.numel()]))
    for row, item in enumerate((short, long, short)):
        alone = WaveAugment(config)(item[None])[0]
        assert fundamental(alone, 80, 24_000) != 0 and not torch.allclose(alone, item, atol=1e-2)  # shifted
        torch.testing.assert_close(together[row, : item.numel()], alone, rtol=0, atol=1e-5)
        assert not together[row, item.numel() :].any()


# -- configuration ----------------------------------------------------------------------------


def test_augment_config_from_yaml_mapping_and_range_errors():
    config = from_dict(AugmentConfig, {"mix": {"p": 0.5, "lam": [0.1, 0.6]}, "reverb": {"p": 0.2}})
    assert config.mix.lam == (0.1, 0.6) and config.reverb.p == 0.2
    check_config(config)
    with pytest.raises(ConfigError, match=r"mix\.lam"):
        check_config(from_dict(AugmentConfig, {"mix": {"lam": [0.9, 0.2]}}))
    with pytest.raises(ConfigError, match=r"clipping\.p"):
        check_config(from_dict(AugmentConfig, {"clipping": {"p": 1.5}}))
    with pytest.raises(ConfigError, match="template"):
        check_config(from_dict(AugmentConfig, {"mix": {"template": "no placeholders"}}))
    with pytest.raises(ConfigError) as err:  # each field named, not "masking counts and widths"
        check_config(from_dict(AugmentConfig, {"masking": {"max_time_width": -1, "freq_masks": -2}}))
    assert str(err.value) == "augment: masking.max_time_width must be >= 0, got -1; masking.freq_masks must be >= 0, got -2"


@pytest.mark.parametrize("field, template, problem", [
    ("template", "A person saying {speech} at {place}, background {env}", "must use exactly the placeholders"),
    ("template", "{speech}, background {env} {}", "must use exactly the placeholders"),
    ("template", "{speech.upper}, background {env}", "must use exactly the placeholders"),
    ("template", "{speech}, background {env} :-{", "(Single '{' encountered in format string)"),
    ("template", "{speech:d}, background {env}", "(Unknown format code 'd' for object of type 'str')"),
    ("lm_prompt", "Rewrite as one fluent sentence:", "must use exactly the placeholders"),
    ("lm_prompt", "Rewrite {caption} as {style}", "must use exactly the placeholders"),
])  # fmt: skip
def test_a_template_that_cannot_be_filled_in_is_refused_when_read(field, template, problem):
    """These passed the old check (both placeholders present) and stopped training with a KeyError,
    IndexError or ValueError traceback at the first mixed item; a prompt without {caption} rewrote
    nothing of the caption."""
    with pytest.raises(ConfigError) as err:
        check_config(from_dict(AugmentConfig, {"mix": {field: template}}))
    assert str(err.value).startswith(f"augment: mix.{field} must ") and f"got {template!r}" in str(err.value)
    assert problem in str(err.value)
    fine = from_dict(AugmentConfig, {"mix": {"template": "{speech!r} {{quoted}}: {env}", "lm_prompt": "Fix: {caption}"}})
    check_config(fine)
    assert merge_captions(fine.mix.template, "hi", "rain") == "'hi' {quoted}: rain"


def test_missing_language_model_directory_is_a_config_error(tmp_path):
    speech = _Pairs([torch.randn(10)], ["a"])
    with pytest.raises(ConfigError, match="lm_path"):
        EnvMixDataset(speech, speech, MixConfig(p=1.0, lm_path=str(tmp_path / "absent")), seed=0)


def test_merged_captions_go_through_the_rewriter(tmp_path):
    speech = _Pairs([torch.randn(10)], ["it's raining outside"])
    env = _Pairs([torch.randn(10)], ["wind noise"])
    dataset = EnvMixDataset(speech, env, MixConfig(p=1.0, lm_path=str(tmp_path)), seed=0)
    prompts = []

    def fake_generate(prompt):  # stands in for a local transformers model
        prompts.append(prompt)
        return " Someone says it is raining as wind blows.\nSecond line"

    dataset.rewriter._generate = fake_generate
    assert dataset[0]["caption"] == "Someone says it is raining as wind blows."
    assert "A person saying it's raining outside, background wind noise" in prompts[0]


def _tiny_language_model(folder, task: str):
    """A randomly initialised GPT-2 (text-generation) or T5 (text2text-generation) of a few thousand
    weights with a word-level tokenizer, saved to ``folder`` as a local model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = "<pad> </s> <unk> a person saying it's raining outside , background wind noise rewrite as one fluent sentence :"
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words.split())}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        model_input_names=["input_ids", "attention_mask"])  # fmt: skip
    torch.manual_seed(0)
    size = len(words.split())
    if task == "text-generation":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=size, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                           bos_token_id=1, eos_token_id=1, pad_token_id=0))  # fmt: skip
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=size, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


@pytest.mark.parametrize("task", ["text-generation", "text2text-generation"])
def test_caption_rewriter_runs_both_kinds_of_local_model(tmp_path, task):
    """The rewrite is the model's greedy output for the prompt (a causal model's continuation without
    the prompt echoed).  A seq2seq model (text2text-generation) used to stop the run at the first
    mixed caption: transformers 5 removed that pipeline task (KeyError)."""
    model, tokenizer = _tiny_language_model(tmp_path, task)
    config = MixConfig(p=1.0, lm_path=str(tmp_path), lm_task=task, lm_max_new_tokens=6)
    caption = "A person saying it's raining outside, background wind noise"
    prompt = tokenizer(config.lm_prompt.format(caption=caption), return_tensors="pt")["input_ids"]  # [1, P]
    # Greedy decoding by hand, one argmax token at a time, up to the end-of-sequence token.
    out = prompt if task == "text-generation" else torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(config.lm_max_new_tokens):
            if task == "text-generation":
                logits = model(out).logits[:, -1]
            else:
                logits = model(input_ids=prompt, decoder_input_ids=out).logits[:, -1]
            out = torch.cat([out, logits.argmax(dim=-1, keepdim=True)], dim=1)
            if int(out[0, -1]) == model.config.eos_token_id:
                break
    new = out[0, prompt.shape[1] :] if task == "text-generation" else out[0, 1:]
    expected = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert expected and expected != caption
    before = torch.get_rng_state()
    assert CaptionRewriter(config)(caption) == expected
    assert torch.equal(torch.get_rng_state(), before)  # greedy: the augmentations' RNG is left alone
