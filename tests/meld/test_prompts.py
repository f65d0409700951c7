"""Prompt sets and class embeddings; zero-shot logits against the reference procedure written out plainly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clara.checkpoint import load_checkpoint, save_checkpoint
from clara.config import ConfigError
from clara.model import Clara
from clara.model_config import load_model_config
from clara.tokenizer import Tokenizer
from meld.labels import EMOTIONS, SENTIMENTS
from meld.prompts import (
    PROMPT_ROOT, SEED_TEMPLATE, PromptSet, class_embeddings, encode_prompts, load_prompts, zero_shot_logits,
)

# The audio temperature the `tiny` fixture saves: not the init ln(1/0.07) = 2.659, so a checkpoint
# loader that dropped it would leave the reloaded model with a different scale.
SAVED_AUDIO_LOG_SCALE = 2.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Clara:
    """A random tiny CLARA, saved and loaded back like any checkpoint (eval mode), with a non-default scale."""
    torch.manual_seed(0)
    model = Clara(load_model_config("tiny"))
    with torch.no_grad():
        model.audio_log_scale.fill_(SAVED_AUDIO_LOG_SCALE)
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny")
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def _audio(model: Clara) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    mel = torch.rand(5, 80, 120, generator=generator) * 2 - 1  # [B, n_mels, T] in the front-end's range
    lengths = torch.tensor([120, 90, 60, 100, 30])
    with torch.no_grad():
        return model.encode_audio(mel, lengths)


def test_one_template_matches_the_reference_procedure(tiny, tokenizer):
    template = SEED_TEMPLATE
    # The reference, one text at a time: tokenise template.format(label), encode text, project,
    # normalise; mean over templates (one here), renormalise; logits = exp(t_a) * A W^T.
    rows = []
    with torch.no_grad():
        for label in EMOTIONS:
            ids = torch.tensor([tokenizer.encode(template.format(label=label))])
            projected = tiny.text_head(tiny.text_features(ids))  # [1, D]
            normalised = projected / projected.norm(dim=-1, keepdim=True)
            mean = normalised.mean(dim=0)
            rows.append(mean / mean.norm())
        W = torch.stack(rows)  # [C, D]
        A = _audio(tiny)
        # The scale is the value that was saved, not read back from the loaded model (which is what
        # the side under test uses), so the comparison also checks the checkpoint kept it.
        reference = torch.exp(torch.tensor(SAVED_AUDIO_LOG_SCALE)) * A @ W.T  # [B, C]

    prompts = PromptSet(target="emotion", templates=(template,))
    with torch.no_grad():
        W_ours = class_embeddings(encode_prompts(tiny, tokenizer, prompts))
        ours = zero_shot_logits(A, W_ours, tiny.audio_log_scale.exp())
    assert ours.shape == (5, len(EMOTIONS))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_tiny_fixture_reloads_its_non_default_audio_scale(tiny):
    assert tiny.audio_log_scale.item() == SAVED_AUDIO_LOG_SCALE


def test_templates_and_synonyms_are_averaged_then_renormalised(tiny, tokenizer):
    prompts = PromptSet(target="sentiment", templates=("A {label} voice", "Someone sounds {label}"),
                        classes={"neutral": ["neutral"], "positive": ["happy", "cheerful"], "negative": ["sad"]})
    per_class = encode_prompts(tiny, tokenizer, prompts)
    assert [tuple(e.shape) for e in per_class] == [(2, 1, 32), (2, 2, 32), (2, 1, 32)]
    with torch.no_grad():
        texts = ["A happy voice", "A cheerful voice", "Someone sounds happy", "Someone sounds cheerful"]
        embeds = [F.normalize(tiny.encode_text(torch.tensor([tokenizer.encode(t)]), normalize=False), dim=-1)
                  for t in texts]
        expected = F.normalize(torch.cat(embeds).mean(dim=0), dim=-1)
        second_only = F.normalize(torch.cat(embeds[2:]).mean(dim=0), dim=-1)
    torch.testing.assert_close(class_embeddings(per_class)[1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(class_embeddings(per_class, templates=[1])[1], second_only, rtol=1e-5, atol=1e-5)
    assert torch.allclose(class_embeddings(per_class).norm(dim=-1), torch.ones(3))


def test_shipped_prompt_sets():
    emotion = load_prompts()
    assert emotion.templates[0] == SEED_TEMPLATE == "A person talking in a {label} voice"
    assert emotion.labels == EMOTIONS
    assert emotion.names("joy") == ("happy", "joyful")
    assert emotion.names("fear") == ("scared", "fearful")
    assert emotion.texts("anger")[:2] == ["A person talking in a angry voice", "A person sounds angry"]
    sentiment = load_prompts(PROMPT_ROOT / "sentiment.yaml")
    assert sentiment.labels == SENTIMENTS and len(sentiment.templates) >= 2


@pytest.mark.parametrize("fields, message", [
    ({"templates": ["A {label} voice of {speaker}"]}, "exactly one field"),
    ({"templates": ["no field at all"]}, "exactly one field"),
    ({"templates": []}, "at least one template"),
    ({"classes": {"neutral": ["calm"]}}, "missing joy"),
    ({"target": "sentiment", "classes": {"neutral": ["calm"], "positive": ["happy"], "negative": []}}, "non-empty list"),
    ({"target": "sentiment", "classes": {"neutral": ["a"], "positive": ["b"], "negative": ["c"], "joy": ["d"]}},
     "unknown joy"),
    ({"templates": ["A {label!z} voice"]}, r"'A \{label!z\} voice' cannot be filled \(Unknown conversion specifier z\)"),
    ({"templates": ["A {label:%%} voice"]}, r"'A \{label:%%\} voice' cannot be filled \(Invalid format specifier"),
])
def test_bad_prompt_sets_are_refused(tmp_path, fields, message):
    import yaml

    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(fields))
    with pytest.raises(ConfigError, match=message):
        load_prompts(path)


@pytest.mark.parametrize("template, message", [
    ("{emotion!z}", r"'\{emotion!z\}' cannot be filled \(Unknown conversion specifier z\)"),
    ("{emotion:%%%}", r"'\{emotion:%%%\}' cannot be filled \(Invalid format specifier"),
    ("{} says {utterance}", r"'\{\} says \{utterance\}' uses unknown field\(s\) \{\}; known fields: utterance"),
])
def test_caption_templates_that_fail_only_when_filled_are_refused_at_load(template, message):
    from meld.captions import CaptionConfig

    with pytest.raises(ConfigError, match=f"templates: {message}"):
        CaptionConfig(templates=(template,))
