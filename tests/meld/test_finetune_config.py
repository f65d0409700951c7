"""A mistake in the fine-tune settings is one ConfigError naming the key, its rule and the value given."""

from __future__ import annotations

import re

import pytest

from clara.config import ConfigError
from meld.finetune import load_config


@pytest.mark.parametrize(("override", "message"), [
    ("model.fusion_dim=0", "model.fusion_dim must be >= 1, got 0"),
    ("model.hidden_dim=-4", "model.hidden_dim must be >= 0, got -4"),
    ("model.hf_max_tokens=2", "model.hf_max_tokens must be >= 3, got 2"),
    ("model.dropout=1", "model.dropout must be in [0, 1), got 1.0"),
    ("model.modality_dropout=-0.5", "model.modality_dropout must be in [0, 1), got -0.5"),
    ("loss.class_weight_power=-0.5", "loss.class_weight_power must be >= 0, got -0.5"),
    ("loss.focal_gamma=-1", "loss.focal_gamma must be >= 0, got -1.0"),
    ("loss.unimodal_weight=-2", "loss.unimodal_weight must be >= 0, got -2.0"),
    ("loss.label_smoothing=1", "loss.label_smoothing must be in [0, 1), got 1.0"),
])
def test_a_bad_value_names_its_key_and_value(override, message):
    # These were grouped ("loss: class_weight_power, focal_gamma and unimodal_weight must be >= 0"): the
    # message named three keys and no value, so it did not say which setting was wrong.
    with pytest.raises(ConfigError, match=re.escape(f"overrides: {message}") + "$"):
        load_config(None, [override])


def test_a_transformers_text_encoder_in_an_audio_only_run_is_refused_in_either_mode():
    # With hf_text_mode beside, an audio-only run loaded the encoder and never read it: the setting was
    # recorded as the run's while no text went in.
    for mode in ("replace", "beside"):
        with pytest.raises(ConfigError, match=r"model\.hf_text is a text encoder; use data\.modality text or both"):
            load_config(None, ["data.modality=audio", "model.hf_text=/some/roberta", f"model.hf_text_mode={mode}"])
    config = load_config(None, ["data.modality=both", "model.hf_text=/some/roberta", "model.hf_text_mode=beside"])
    assert config.model.hf_text_mode == "beside"
