"""Model presets and the mapping of a reference checkpoint's hyper_parameters onto ClaraConfig."""

from __future__ import annotations

import pytest

from clara.config import ConfigError
from clara.model_config import from_reference_hparams, load_model_config
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
