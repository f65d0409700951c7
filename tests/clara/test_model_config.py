"""Model presets and the mapping of a reference checkpoint's hyper_parameters onto ClaraConfig."""

from __future__ import annotations

import math

import pytest

from clara.config import ConfigError
from clara.model_config import ClaraConfig, from_reference_hparams, load_model_config, result_overrides
from tests.clara.test_model import REFERENCE_SIZES


def test_reference_medium_hparams_are_our_medium_preset():
    assert from_reference_hparams(REFERENCE_SIZES["medium"][0]) == load_model_config("medium")


def test_trainer_bookkeeping_is_skipped_and_unknown_architecture_is_refused():
    base = from_reference_hparams({})
    # Lightning's CLI (2.1+) saves these beside the model's own arguments.
    bookkeeping = {"_instantiator": "lightning.pytorch.cli.instantiate_module", "_class_path": "clara.CLARA"}
    assert from_reference_hparams(bookkeeping) == base
    assert from_reference_hparams({"learning_rate": 3e-4, "LR_sheduler_T_max": 40}) == base
    with pytest.raises(ConfigError, match=r"ckpt: unknown reference hyper-parameter\(s\) audio_encoder_depth$"):
        from_reference_hparams({"audio_encoder_depth": 4}, source="ckpt")


@pytest.mark.parametrize("override, expected", [
    ("text.heads=3", "text: width (32) must be a multiple of heads (3)"),
    ("text.heads=0", "text: heads must be at least 1, got 0"),
    ("text.layers=-1", "text: layers must be at least 0, got -1"),
    ("text.dropout=1.5", "text: dropout must be in [0, 1), got 1.5"),
    ("audio.latent_heads=0", "audio: latent_heads must be at least 1, got 0"),
    ("audio.num_latents=0", "audio: num_latents must be at least 1, got 0"),
    ("audio.token_keep=1.5", "audio: token_keep must be in (0, 1], got 1.5"),
    ("audio.token_keep=0", "audio: token_keep must be in (0, 1], got 0.0"),
    ("init_temperature=0", "init_temperature must be above 0 and finite, got 0.0"),
    ("output_dim=0", "output_dim must be at least 1, got 0"),
])  # fmt: skip
def test_sizes_that_would_fail_inside_the_model_are_one_config_error(override, expected):
    """Each of these passed the type check and then failed in the first forward pass (a reshape, a
    zero-division, log(0)) or did something else quietly (token_keep 1.5 kept every token)."""
    with pytest.raises(ConfigError) as err:
        load_model_config("tiny", [override])
    assert str(err.value).endswith(f"tiny.yaml + overrides: {expected}")


def test_every_bad_top_level_field_is_named_in_one_error():
    """ClaraConfig stopped at its first bad field (output_dim), where TextConfig and AudioConfig name
    them all; and an infinite init_temperature passed, then failed building the model with a bare
    "math domain error" (log(1 / inf))."""
    with pytest.raises(ConfigError) as err:
        ClaraConfig(output_dim=0, init_temperature=-1.0)
    assert str(err.value) == "output_dim must be at least 1, got 0; init_temperature must be above 0 and finite, got -1.0"
    with pytest.raises(ConfigError, match=r"^init_temperature must be above 0 and finite, got inf$"):
        ClaraConfig(init_temperature=math.inf)


def test_every_preset_and_zero_layers_pass_the_checks():
    for name in ("tiny", "small", "medium", "large"):
        load_model_config(name)
    config = load_model_config("tiny", ["text.layers=0", "audio.layers=0", "audio.token_keep=1"])
    assert (config.text.layers, config.audio.layers, config.audio.token_keep) == (0, 0, 1.0)


@pytest.mark.parametrize("value", [None, "half", [0.5]])
def test_a_non_numeric_reference_seq_dropout_is_a_config_error(value):
    """It went through float() unguarded: a TypeError or ValueError traceback."""
    with pytest.raises(ConfigError) as err:
        from_reference_hparams({"audio_encoder_seq_dropout_prob": value}, source="ckpt: hyper_parameters")
    assert str(err.value) == f"ckpt: hyper_parameters: audio_encoder_seq_dropout_prob: expected a number, got {value!r}"


@pytest.mark.parametrize("value, keep", [(0.5, 0.5), (0.25, 0.75), ("0.1", 0.9), (0, 1.0)])
def test_reference_seq_dropout_is_one_minus_the_kept_fraction(value, keep):
    assert from_reference_hparams({"audio_encoder_seq_dropout_prob": value}).audio.token_keep == pytest.approx(keep)


def test_result_overrides_take_the_last_value_of_a_repeated_key():
    """Both values went into the sort, which compared them: a TypeError traceback for values of two
    types or two mappings, and a resume refused for a list that sets the same model as the saved one."""
    assert result_overrides(["text.layers=2", "attention=eager", "text.layers=x"]) == [("text.layers", "x")]
    assert result_overrides(["audio={layers: 2}", "audio={width: 64}"]) == [("audio", {"width": 64})]
    assert result_overrides(["mask_padding=true", "mask_padding=false"]) == result_overrides(["mask_padding=false"])
