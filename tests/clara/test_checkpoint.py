"""Our checkpoint format, the reference Lightning format, and the errors for bad files."""

from __future__ import annotations

import os
import stat
import sys
import types

import pytest
import torch

from clara.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_reference_state_dict
from clara.model import Clara
from clara.model_config import load_model_config
from clara.model_config import from_reference_hparams
from tests.clara.test_model import REFERENCE_SIZES, write_reference_checkpoint


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Clara(load_model_config("tiny", ["audio.cross_attention=gelu"])).eval()


def set_temperatures(model, audio: float, text: float) -> None:
    """Give the two temperatures values a fresh model never holds (init: both ln(1/0.07) = 2.659),
    different from each other, so a loader that skipped or swapped them cannot pass."""
    with torch.no_grad():
        model.audio_log_scale.fill_(audio)
        model.text_log_scale.fill_(text)


def test_round_trip_keeps_weights_and_config(tmp_path, model):
    set_temperatures(model, audio=1.75, text=3.25)
    old_umask = os.umask(0o022)
    try:
        save_checkpoint(model, tmp_path / "ckpt")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    # Readable by the team, as a plain write would leave it (safetensors alone writes 0o600).
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644}
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.audio_log_scale.item() == 1.75 and loaded.text_log_scale.item() == 3.25
    # Saving again over an existing checkpoint replaces it whole.
    save_checkpoint(loaded, tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt" / "model.safetensors").config == model.config


def test_reference_export_import_round_trip(tmp_path):
    hparams = REFERENCE_SIZES["tiny"][0]
    original = Clara(from_reference_hparams(hparams))
    set_temperatures(original, audio=1.75, text=3.25)
    reference = to_reference_state_dict(original)
    assert all(k.startswith("model.") for k in reference)
    # Each modality's temperature goes to the reference's key of that modality (clara.md).
    assert reference["model.audio_tempeture"].item() == 1.75 and reference["model.text_tempeture"].item() == 3.25
    # The fused latent qkv splits back into the reference's to_q and to_kv.
    assert reference["model.audio_encoder.layers.1.0.fn.to_q.weight"].shape == (128, 32)
    assert reference["model.audio_encoder.layers.1.0.fn.to_kv.weight"].shape == (256, 32)
    torch.save({"state_dict": reference, "hyper_parameters": hparams}, tmp_path / "exported.ckpt")
    loaded = load_checkpoint(tmp_path / "exported.ckpt")
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.audio_log_scale.item() == 1.75 and loaded.text_log_scale.item() == 3.25


def test_reference_checkpoint_has_282_tensors_at_medium(tmp_path):
    _, state, _ = write_reference_checkpoint(tmp_path, "medium")
    assert len(state) == 282


def test_lightning_attribute_dict_loads_without_lightning_or_pickle_opt_in(tmp_path):
    """Lightning pickles hyper_parameters as its AttributeDict: a dict we can read safely."""
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    module = types.ModuleType("lightning_fabric.utilities.data")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = module.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    module.AttributeDict = AttributeDict
    fake = {"lightning_fabric": types.ModuleType("lightning_fabric"),
            "lightning_fabric.utilities": types.ModuleType("lightning_fabric.utilities"),
            module.__name__: module}
    sys.modules.update(fake)
    try:
        payload["hyper_parameters"] = AttributeDict(payload["hyper_parameters"])
        torch.save(payload, path)
    finally:
        for name in fake:
            del sys.modules[name]
    loaded = load_checkpoint(path)
    assert loaded.config.text.layers == 2


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused_unless_opted_in(tmp_path, capsys):
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    payload["callbacks"] = Evil()
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True") as refused:
        load_checkpoint(path)
    assert "Unsupported global: GLOBAL print" in str(refused.value) and "\n" not in str(refused.value)
    assert "this must never run" not in capsys.readouterr().out
    assert load_checkpoint(path, allow_pickle=True).config.text.layers == 2


def test_allow_pickle_failures_are_one_error_naming_the_file(tmp_path):
    """With allow_pickle=True these escaped as EOFError, UnpicklingError or ModuleNotFoundError
    tracebacks that did not name the file."""
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("# not a checkpoint\n", encoding="utf-8")
    for name in ("empty.ckpt", "notes.ckpt"):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name, allow_pickle=True)
        assert str(err.value).startswith(f"{tmp_path / name}: not a readable PyTorch checkpoint (")
    # A checkpoint pickling a class of a module that is not installed here (as Lightning's classes
    # are where Lightning is not).
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    module = types.ModuleType("uninstalled_trainer")

    class Callback:
        pass

    Callback.__module__ = module.__name__
    Callback.__qualname__ = "Callback"
    module.Callback = Callback
    sys.modules[module.__name__] = module
    try:
        payload["callbacks"] = Callback()
        torch.save(payload, path)
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, allow_pickle=True)
    assert str(err.value) == f"{path}: its pickled objects need the module 'uninstalled_trainer', which is not installed"


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("# not a checkpoint\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"notes.ckpt: not a PyTorch checkpoint") as refused:
        load_checkpoint(path)
    assert "pickled" not in str(refused.value)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["model.text_fc1.bias"]
    payload["state_dict"]["model.extra.weight"] = torch.zeros(3)
    payload["state_dict"]["model.conv1.bias"] = torch.zeros(7)
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "missing 1 tensor(s): text.fc.bias" in message
    assert "unexpected 1 tensor(s): model.extra.weight" in message
    assert "audio.conv1.bias (checkpoint (7,), model (32,))" in message


def test_entries_outside_the_model_prefix_are_named_as_they_are_and_never_loaded(tmp_path):
    """A state_dict entry without ``model.`` used to be loaded as the model tensor of that name
    (``text_fc1.bias`` filled ``text.fc.bias``) and any other one was reported as ``model.<key>``,
    a name the file does not hold."""
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["text_fc1.bias"] = payload["state_dict"].pop("model.text_fc1.bias")
    payload["state_dict"]["loss_fn.logit_scale"] = torch.zeros(())
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: does not fit the model: missing 1 tensor(s): text.fc.bias | "
                              "unexpected 2 tensor(s): loss_fn.logit_scale, text_fc1.bias")


def test_wrong_kinds_of_file_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLARA checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match="no 'model.' keys"):
        load_checkpoint(tmp_path / "lightning.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="text.ckpt"):
        load_checkpoint(tmp_path / "text.ckpt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty_dir")


def test_a_pretraining_run_folder_points_to_its_model_folder(tmp_path, model):
    save_checkpoint(model, tmp_path / "run" / "model")  # clara.pretrain's layout, beside checkpoint.pt
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'run'}: a run's folder, not a checkpoint \(no config.json\); "
                                              rf"its weights are the checkpoint {tmp_path / 'run' / 'model'}$"):
        load_checkpoint(tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "model").config == model.config


def test_a_bad_stored_config_or_override_names_the_file_once(tmp_path, model):
    save_checkpoint(model, tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "ckpt", overrides=["attention=fast"])
    assert str(err.value).startswith(f"{config} + overrides: attention: 'fast' is not one of")
    config.write_text(config.read_text().replace('"audio": {', '"audio": {"lyers": 2, ', 1))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "ckpt")
    assert str(err.value).startswith(f"{config}: audio: unknown key(s) lyers for ")


@pytest.mark.parametrize("content, expected", [
    (b"[1, 2]", "expected a JSON object of model settings, got list"),
    (b"\xff\xfe{}", "not JSON text ("),
    (b'{"audio": ', "not JSON text ("),
])  # fmt: skip
def test_a_stored_config_that_is_no_json_object_is_named(tmp_path, model, content, expected):
    """A list or a non-UTF-8 config.json used to escape as a TypeError or UnicodeDecodeError traceback."""
    save_checkpoint(model, tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "ckpt")
    assert str(err.value).startswith(f"{config}: {expected}")


def test_tied_reference_layers_are_rejected(tmp_path):
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    payload["hyper_parameters"]["audio_encoder_weight_tie_layers"] = True
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="tied Perceiver layers"):
        load_checkpoint(path)


def _corrupt(payload, how):
    """Damage a reference payload the way a hand-edited or foreign checkpoint might be damaged."""
    state = payload["state_dict"]
    if how == "hyper_parameters None":
        payload["hyper_parameters"] = None
    elif how == "hyper_parameters text":
        payload["hyper_parameters"] = "text_encoder_layers=2"
    elif how == "state_dict list":
        payload["state_dict"] = sorted(state)
    elif how == "entry not a tensor":
        state["model.conv1.bias"] = 3.0
    elif how == "key not a name":
        state[7] = torch.zeros(1)
    elif how == "to_q and to_kv disagree":
        state["model.audio_encoder.layers.0.0.fn.to_q.weight"] = torch.zeros(128, 7)


@pytest.mark.parametrize("how, expected", [
    ("hyper_parameters None", "'hyper_parameters' must be a mapping of settings, got a NoneType"),
    ("hyper_parameters text", "'hyper_parameters' must be a mapping of settings, got a str"),
    ("state_dict list", "'state_dict' must map names to tensors, got a list"),
    ("entry not a tensor", "state_dict entry 'model.conv1.bias' is a float, not a tensor"),
    ("key not a name", "state_dict key 7 is a int, not a name"),
    ("to_q and to_kv disagree", "does not fit the model: mis-shaped tensor(s): "
     "model.audio_encoder.layers.0.0.fn.to_q.weight (128, 7), model.audio_encoder.layers.0.0.fn.to_kv.weight "
     "(256, 32) cannot be stacked into audio.perceiver.layers.0.attn.qkv.weight"),
])  # fmt: skip
def test_a_damaged_reference_checkpoint_is_one_error_naming_file_and_entry(tmp_path, how, expected):
    """Each of these escaped as a TypeError, ValueError, AttributeError or RuntimeError traceback."""
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    _corrupt(payload, how)
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: {expected}"


def test_a_bad_override_on_a_reference_checkpoint_names_the_file(tmp_path):
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, overrides=["attention=fast"])
    assert str(err.value).startswith(f"{path} + overrides: attention: 'fast' is not one of")
    assert load_checkpoint(path, overrides=["attention=eager"]).config.attention == "eager"


def test_a_safetensors_file_of_another_name_is_refused_not_swapped_for_its_neighbour(tmp_path, model):
    """Given run/other.safetensors, the loader used to read run/model.safetensors instead."""
    save_checkpoint(model, tmp_path / "run")
    other = tmp_path / "run" / "other.safetensors"
    other.write_bytes((tmp_path / "run" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(other)
    assert str(err.value).startswith(f"{other}: a meld-clara checkpoint is a directory holding model.safetensors")
