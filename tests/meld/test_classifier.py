"""The classifier: fusion heads, top-k unfreezing, layer-wise LR decay, zero-shot init, a local transformers encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clara import Clara, load_model_config
from clara.engine import TrainConfig, Trainer
from clara.optim import param_groups
from clara.tokenizer import Tokenizer
from meld.classifier import (
    MeldClassifier, input_dims, input_names, parameter_depth, set_trainable, zero_shot_init,
)
from meld.fusion import FusionHead
from meld.hf_text import HFTextEncoder, load_hf_tokenizer
from meld.layer_decay import decayed_groups
from meld.labels import EMOTIONS


def _batch(size: int = 3) -> dict:
    return {"mel": torch.randn(size, 80, 40), "mel_lengths": torch.tensor([40, 30, 20][:size]),
            "tokens": torch.randint(0, 1000, (size, 7)), "token_lengths": torch.tensor([7, 5, 3][:size])}


def _classifier(inputs=("audio", "text"), fusion="concat", features="projected", hf_text=None) -> MeldClassifier:
    clara = Clara(load_model_config("tiny"))
    head = FusionHead(input_dims(clara, hf_text, inputs, features), 7, fusion=fusion, fusion_dim=16)
    return MeldClassifier(clara, head, inputs=inputs, features=features, hf_text=hf_text)


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
@pytest.mark.parametrize("features", ["projected", "pooled"])
def test_every_fusion_gives_logits(fusion, features):
    # Plumbing through the whole classifier only; each head's arithmetic is checked against a hand-computed
    # reference in the gated and attention tests below.
    model = _classifier(fusion=fusion, features=features).eval()
    logits = model(_batch())
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
@pytest.mark.parametrize("features", ["projected", "pooled"])
def test_padding_does_not_change_an_items_logits(fusion, features):
    # Each item run alone, cut to its own length, against the batch padded to its longest (and then some,
    # as data.frames_multiple / tokens_multiple pad): the masks keep padded frames and tokens out.
    torch.manual_seed(0)
    model = _classifier(fusion=fusion, features=features).eval()
    batch = {"mel": torch.randn(3, 80, 64), "mel_lengths": torch.tensor([50, 37, 20]),
             "tokens": torch.randint(1, 1000, (3, 12)), "token_lengths": torch.tensor([9, 5, 3])}
    with torch.no_grad():
        batched = model(batch)  # [3, 7]
        for i in range(3):
            frames, tokens = int(batch["mel_lengths"][i]), int(batch["token_lengths"][i])
            alone = model({"mel": batch["mel"][i : i + 1, :, :frames], "mel_lengths": batch["mel_lengths"][i : i + 1],
                           "tokens": batch["tokens"][i : i + 1, :tokens],
                           "token_lengths": batch["token_lengths"][i : i + 1]})
            assert torch.allclose(alone[0], batched[i], atol=1e-5)


def _randomised_head(fusion: str, fusion_dim: int) -> tuple[FusionHead, dict, torch.Tensor, torch.Tensor]:
    """A tiny eval-mode head with every parameter random (LayerNorm affine and the modality embedding too,
    which start at 1/0), and a batch: (head, embeddings, normed audio [3, 4], normed text [3, 6])."""
    torch.manual_seed(0)
    head = FusionHead({"audio": 4, "text": 6}, 3, fusion=fusion, fusion_dim=fusion_dim).eval()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn_like(parameter))
    embeddings = {"audio": torch.randn(3, 4), "text": torch.randn(3, 6)}
    audio = F.layer_norm(embeddings["audio"], (4,), head.norms["audio"].weight, head.norms["audio"].bias)
    text = F.layer_norm(embeddings["text"], (6,), head.norms["text"].weight, head.norms["text"].bias)
    return head, embeddings, audio, text


def test_gated_fusion_mixes_two_inputs_with_a_sigmoid_gate():
    # The documented two-input form, written out from the head's own weights: each input projected and
    # squashed, tanh(W_m x_m + b_m) [B, H], mixed per unit by g = sigmoid(gate_audio - gate_text), where
    # the gate logits are one linear layer on both normed inputs. Independent of the softmax the code uses.
    head, embeddings, audio, text = _randomised_head("gated", fusion_dim=5)
    with torch.no_grad():
        fused = head.fuse(embeddings)
        proj_audio = torch.tanh(audio @ head.proj["audio"].weight.T + head.proj["audio"].bias)  # [B, H]
        proj_text = torch.tanh(text @ head.proj["text"].weight.T + head.proj["text"].bias)
        gate_logits = torch.cat([audio, text], dim=1) @ head.gate.weight.T + head.gate.bias  # [B, 2H]: audio, text
        g = torch.sigmoid(gate_logits[:, :5] - gate_logits[:, 5:])  # [B, H]
        expected = g * proj_audio + (1 - g) * proj_text
        torch.testing.assert_close(fused, expected)
        torch.testing.assert_close(head.last_gates, torch.stack([g, 1 - g], dim=1))  # [B, 2, H], what it inspects
        # The logits are the linear head on that mix (eval: no dropout).
        torch.testing.assert_close(head(embeddings), expected @ head.classifier.weight.T + head.classifier.bias)
    assert not torch.allclose(g, torch.full_like(g, 0.5), atol=0.05)  # a real mix, not a plain average


def test_attention_fusion_is_one_learned_query_attending_over_the_modality_tokens():
    # Eager multi-head attention of the learned query over [audio, text] tokens (projection plus the
    # modality embedding), from the head's own weights; then the residual query and a LayerNorm.
    head, embeddings, audio, text = _randomised_head("attention", fusion_dim=8)
    attend = head.attend
    heads, width = attend.num_heads, 8 // attend.num_heads
    assert heads == 4
    with torch.no_grad():
        tokens = torch.stack([audio @ head.proj["audio"].weight.T + head.proj["audio"].bias,
                              text @ head.proj["text"].weight.T + head.proj["text"].bias], dim=1)  # [B, 2, H]
        tokens = tokens + head.modality
        w_q, w_k, w_v = attend.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attend.in_proj_bias.chunk(3)
        query = head.query[0, 0]  # [H]
        q = (query @ w_q.T + b_q).view(heads, width)  # [h, d]: one query, the same for every example
        k = (tokens @ w_k.T + b_k).view(3, 2, heads, width)  # [B, M, h, d]
        v = (tokens @ w_v.T + b_v).view(3, 2, heads, width)
        weights = (torch.einsum("hd,bmhd->bhm", q, k) / width**0.5).softmax(dim=-1)  # [B, h, M]
        mixed = torch.einsum("bhm,bmhd->bhd", weights, v).reshape(3, 8)  # [B, H]
        out = mixed @ attend.out_proj.weight.T + attend.out_proj.bias
        expected = F.layer_norm(out + query, (8,), head.attend_norm.weight, head.attend_norm.bias)
        torch.testing.assert_close(head.fuse(embeddings), expected)
        torch.testing.assert_close(head(embeddings), expected @ head.classifier.weight.T + head.classifier.bias)
    assert not torch.allclose(weights, torch.full_like(weights, 0.5), atol=0.05)  # the query does choose


def test_head_accepts_cached_embeddings_without_towers():
    model = _classifier().eval()
    embeddings = {"audio": torch.randn(2, 32), "text": torch.randn(2, 32)}
    assert torch.equal(model({"embeddings": embeddings}), model.head(embeddings))


def test_input_names():
    assert input_names("both", False, "replace") == ("audio", "text")
    assert input_names("text", True, "replace") == ("hf_text",)
    assert input_names("both", True, "beside") == ("audio", "text", "hf_text")
    assert input_names("audio", True, "beside") == ("audio",)


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_partial_unfreezes_the_top_k_layers_of_each_tower():
    model = _classifier()
    set_trainable(model, "partial", 1)
    trainable = _trainable(model)
    assert "clara.text.layers.1.qkv.weight" in trainable and "clara.text.layers.0.qkv.weight" not in trainable
    assert "clara.audio.perceiver.layers.1.attn.qkv.weight" in trainable
    assert "clara.audio.perceiver.layers.0.attn.qkv.weight" not in trainable
    assert {"clara.text.fc.weight", "clara.audio_head.weight", "head.classifier.weight"} <= trainable
    assert "clara.text.token_embedding.weight" not in trainable and "clara.audio.conv1.weight" not in trainable
    assert "clara.audio_log_scale" not in trainable  # the contrastive temperatures never train here

    set_trainable(model, "partial", 0)
    assert "clara.text.layers.1.qkv.weight" not in _trainable(model) and "clara.text.fc.weight" in _trainable(model)
    set_trainable(model, "linear_probe")
    assert all(name.startswith("head.") for name in _trainable(model))
    set_trainable(model, "full")
    assert "clara.text.token_embedding.weight" in _trainable(model)


def test_frozen_layers_compute_as_in_evaluation_while_training():
    # A partial fine-tune's frozen layers are a fixed feature extractor: their dropout stayed on in training,
    # so the trained top learned on noisier features than it was evaluated on.
    model = _classifier(inputs=("text",))
    set_trainable(model, "partial", 0)  # only the text tower's pooling and projection train
    batch = _batch()
    expected = model.eval().embed(batch)["text"]
    torch.manual_seed(0)
    assert torch.equal(model.train().embed(batch)["text"], expected)
    assert model.training and model.clara.text.training and not model.clara.text.layers[0].training

    set_trainable(model, "partial", 1)
    model.train()
    assert model.clara.text.layers[1].training and not model.clara.text.layers[0].training
    assert not torch.equal(model.embed(batch)["text"], expected)  # the trained layer's dropout is on
    model.eval()
    assert not any(module.training for module in model.modules())


def test_token_dropout_still_applies_in_front_of_a_frozen_cross_attention():
    model = _classifier(inputs=("audio",))
    set_trainable(model, "partial", 1)
    model.train()
    perceiver = model.clara.audio.perceiver
    assert perceiver.training and perceiver.layers[1].training
    assert not perceiver.cross_attn.training and not perceiver.layers[0].training
    set_trainable(model, "full")
    model.train()
    assert all(module.training for module in model.clara.audio.modules())
    assert not model.clara.text.training  # an unused tower is frozen, so it runs as in evaluation


def test_unused_tower_is_frozen():
    model = _classifier(inputs=("text",))
    set_trainable(model, "full")
    assert not any(name.startswith("clara.audio") for name in _trainable(model))


@pytest.mark.parametrize("features", ["projected", "pooled"])
@pytest.mark.parametrize("strategy", ["full", "partial"])
def test_every_trainable_parameter_gets_a_gradient(features, strategy):
    # Trainable means used: with pooled features CLARA's projection heads are outside the graph, and left
    # trainable they got no gradient (DDP then fails at its second step waiting for them).
    model = _classifier(features=features)
    set_trainable(model, strategy, 1)
    model(_batch()).sum().backward()
    trainable = _trainable(model)
    assert trainable == {name for name, p in model.named_parameters() if p.grad is not None}
    assert ("clara.audio_head.weight" in trainable) == (features == "projected")


def test_layer_decay_scales_each_depth():
    model = _classifier()
    set_trainable(model, "full")
    groups = decayed_groups(model, 0.5, 0.01)
    assert groups[0]["lr_scale"] == 1.0 and any(p is model.head.classifier.weight for p in groups[0]["params"])
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # text: top = 3 (2 layers + 1); layer 1 is depth 2 -> 0.5 ** 2, embeddings depth 0 -> 0.5 ** 4
    assert scale_of[id(named["clara.text.layers.1.qkv.weight"])] == 0.5**2
    assert scale_of[id(named["clara.text.token_embedding.weight"])] == 0.5**4
    assert scale_of[id(named["clara.audio.perceiver.cross_attn.q.weight"])] == 0.5**4  # audio top 4, depth 1
    assert parameter_depth("head.classifier.weight", model) is None


@pytest.mark.parametrize("decay_1d", [False, True])
def test_layer_decay_groups_follow_decay_1d_as_the_engine_does(decay_1d):
    model = _classifier()
    set_trainable(model, "full")
    decay_of = {id(p): g["weight_decay"] for g in decayed_groups(model, 0.5, 0.01, decay_1d=decay_1d) for p in g["params"]}
    engine = {id(p): g["weight_decay"] for g in param_groups(model, 0.01, decay_1d=decay_1d) for p in g["params"]}
    assert decay_of == engine
    bias = dict(model.named_parameters())["head.classifier.bias"]
    assert decay_of[id(bias)] == (0.01 if decay_1d else 0.0)


def test_decayed_groups_set_each_groups_rate_in_the_engine(tmp_path):
    model = _classifier(inputs=("text",))
    set_trainable(model, "full")
    data = [{"tokens": torch.tensor([1, 2, 3]), "label": 0}] * 4
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-2, warmup_steps=0, out_dir=str(tmp_path), progress=False)
    trainer = Trainer(config, model, object(), data, env=None, groups=decayed_groups(model, 0.5, 0.0))
    rates = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
    # head 1; text top (depth 3) 0.5, layer 1 (depth 2) 0.25, layer 0 0.125, embeddings (depth 0) 0.0625
    assert set(rates) == {1.0, 0.5, 0.25, 0.125, 0.0625}
    assert all(rate == pytest.approx(1e-2 * scale) for scale, rate in rates.items())


def test_zero_shot_init_writes_class_prompts_into_the_audio_block():
    model = _classifier().eval()
    zero_shot_init(model, EMOTIONS, "a person talking in a {label} voice", Tokenizer())
    weight = model.head.output.weight  # [7, 64]: audio block then text block
    tokens, lengths = Tokenizer().encode_batch([f"a person talking in a {e} voice" for e in EMOTIONS])
    prompts = model.clara.encode_text(tokens, lengths)
    scale = model.clara.audio_log_scale.exp() / 32**0.5
    assert torch.allclose(weight[:, :32], prompts * scale, atol=1e-6)
    assert torch.equal(weight[:, 32:], torch.zeros(7, 32)) and torch.equal(model.head.output.bias, torch.zeros(7))


def tiny_bert(path):
    """A randomly initialised 2-layer BERT and a 30-word tokenizer saved to ``path`` (no download)."""
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "am", "so", "happy", "sad", "angry", "this", "is",
             "great", "hello", "oh", "no", "yay", "what", "!", "?", ".", ",", "you", "me", "the", "a", "it", "was", "ok"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_local_transformers_encoder_mean_pools_real_tokens(tmp_path):
    folder = tiny_bert(tmp_path / "bert")
    encoder = HFTextEncoder.from_folder(folder).eval()
    tokenizer = load_hf_tokenizer(folder)
    short = torch.tensor([tokenizer("i am happy")["input_ids"]])
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(short), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = encoder(short, torch.ones_like(short))
        batched = encoder(padded, mask)
    assert alone.shape == (1, 16) and torch.allclose(alone, batched, atol=1e-5)

    model = _classifier(inputs=("text", "hf_text"), fusion="attention", hf_text=encoder).eval()
    batch = {**_batch(1), "hf_ids": short, "hf_mask": torch.ones_like(short)}
    assert model(batch).shape == (1, 7)
    set_trainable(model, "partial", 1)
    trainable = _trainable(model)
    assert "hf_text.model.encoder.layer.1.attention.self.query.weight" in trainable
    assert "hf_text.model.encoder.layer.0.attention.self.query.weight" not in trainable


@pytest.mark.parametrize("strategy", ["full", "partial"])
def test_every_trainable_transformers_parameter_gets_a_gradient_and_one_rate(tmp_path, strategy):
    # The encoder mean-pools the last hidden states: BERT's pooler ([CLS] -> dense -> tanh) is outside the
    # graph. Left trainable, it got no gradient (DDP waits for it) and a learning-rate group of its own.
    encoder = HFTextEncoder.from_folder(tiny_bert(tmp_path / "bert"))
    model = _classifier(inputs=("text", "hf_text"), hf_text=encoder)
    set_trainable(model, strategy, 1)
    ids = torch.tensor([[2, 5, 6, 8, 3], [2, 9, 3, 0, 0], [2, 7, 8, 3, 0]])
    model({**_batch(), "hf_ids": ids, "hf_mask": (ids != 0).long()}).sum().backward()
    trainable = _trainable(model)
    assert trainable == {name for name, p in model.named_parameters() if p.grad is not None}
    assert "hf_text.model.encoder.layer.1.output.dense.weight" in trainable
    assert not any(".pooler." in name for name in trainable)
    groups = decayed_groups(model, 0.5, 0.01)
    grouped = [id(p) for g in groups for p in g["params"]]  # each trainable parameter exactly once
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # BERT: top = 3 (2 layers + 1); layer 1 is depth 2 -> 0.5 ** 2, layer 0 depth 1 -> 0.5 ** 3
    assert scale_of[id(named["hf_text.model.encoder.layer.1.output.dense.weight"])] == 0.5**2
    if strategy == "full":
        assert scale_of[id(named["hf_text.model.encoder.layer.0.output.dense.weight"])] == 0.5**3
        assert scale_of[id(named["hf_text.model.embeddings.word_embeddings.weight"])] == 0.5**4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_transformers_folder_trains_float32_weights(tmp_path, dtype):
    # transformers 5 loads a checkpoint saved in bf16 / fp16 in that dtype (and builds it so from the saved
    # config). AdamW on such weights rounded away every update below their half-precision step: at lr 1e-5
    # most of them did not move at all.
    import transformers
    from safetensors.torch import load_file

    folder = tiny_bert(tmp_path / "bert")
    transformers.BertModel.from_pretrained(folder).to(dtype).save_pretrained(folder)
    stored = load_file(str(folder / "model.safetensors"))  # the half-precision values on disk
    encoder = HFTextEncoder.from_folder(folder).train()
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    weights = dict(encoder.model.named_parameters())
    for name, value in stored.items():
        assert value.dtype == dtype and torch.equal(weights[name].detach(), value.float()), name
    assert {p.dtype for p in HFTextEncoder.from_config_folder(folder).parameters()} == {torch.float32}

    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, weight_decay=0.0)
    weight = weights["encoder.layer.1.output.dense.weight"]
    before = weight.detach().clone()
    ids = torch.tensor([[2, 5, 6, 8, 3], [2, 9, 3, 0, 0]])
    encoder(ids, (ids != 0).long()).pow(2).sum().backward()
    grad = weight.grad.clone()
    optimizer.step()
    # AdamW's first step, bias-corrected: every weight moves by lr * g / (|g| + eps).
    torch.testing.assert_close(before - weight.detach(), 1e-5 * grad / (grad.abs() + 1e-8), rtol=1e-3, atol=1e-8)


def test_local_transformers_encoder_keeps_cudnn_attention_out(tmp_path, sdpa_calls):
    # Its batches change length all the time, and cuDNN's attention plans anew for every shape.
    encoder = HFTextEncoder.from_folder(tiny_bert(tmp_path / "bert")).eval()
    if getattr(encoder.model.config, "_attn_implementation", "sdpa") != "sdpa":
        pytest.skip("this transformers version does not run BERT through SDPA")
    ids = torch.tensor([[2, 5, 6, 8, 3], [2, 9, 3, 0, 0]])
    encoder(ids, (ids != 0).long())
    assert [call["cudnn"] for call in sdpa_calls] == [False, False]  # one call per layer, cuDNN never allowed


def test_a_folder_that_is_not_a_model_is_one_clear_error(tmp_path):
    from clara.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a local transformers model"):
        HFTextEncoder.from_folder(tmp_path)


def test_modality_dropout_zeroes_one_input_per_example_in_training_only():
    head = FusionHead({"audio": 4, "text": 6}, 3, fusion="concat", modality_dropout=0.999)
    embeddings = {"audio": torch.randn(8, 4), "text": torch.randn(8, 6)}
    fused = head.train().fuse(embeddings)  # [8, 10]
    zero_blocks = (fused[:, :4].abs().sum(1) == 0).int() + (fused[:, 4:].abs().sum(1) == 0).int()
    assert zero_blocks.tolist() == [1] * 8
    assert (head.eval().fuse(embeddings).abs().sum(1) > 0).all()


def test_unimodal_logits_of_a_linear_concat_head_are_its_blocks():
    torch.manual_seed(0)
    head = FusionHead({"audio": 4, "text": 6}, 3, fusion="concat").eval()
    assert head.unimodal is None  # no parameters beyond the fused head's
    embeddings = {"audio": torch.randn(5, 4), "text": torch.randn(5, 6)}
    own = head.unimodal_logits(embeddings)
    weight, bias = head.classifier.weight, head.classifier.bias  # [3, 10], [3]
    audio = F.layer_norm(embeddings["audio"], (4,), head.norms["audio"].weight, head.norms["audio"].bias)
    text = F.layer_norm(embeddings["text"], (6,), head.norms["text"].weight, head.norms["text"].bias)
    assert torch.allclose(own["audio"], audio @ weight[:, :4].T + bias, atol=1e-6)
    assert torch.allclose(own["text"], text @ weight[:, 4:].T + bias, atol=1e-6)
    # Late fusion: the fused logits are the sum of the per-input ones, the bias counted once.
    assert torch.allclose(head(embeddings), own["audio"] + own["text"] - bias, atol=1e-6)


@pytest.mark.parametrize("fusion, hidden_dim", [("gated", 0), ("attention", 0), ("concat", 8)])
def test_other_heads_get_one_linear_head_per_input_for_unimodal_logits(fusion, hidden_dim):
    dims = {"audio": 4, "text": 6}
    embeddings = {"audio": torch.randn(5, 4), "text": torch.randn(5, 6)}
    with pytest.raises(ValueError, match="unimodal_heads=True"):
        FusionHead(dims, 3, fusion=fusion, hidden_dim=hidden_dim, fusion_dim=8).unimodal_logits(embeddings)
    head = FusionHead(dims, 3, fusion=fusion, hidden_dim=hidden_dim, fusion_dim=8, unimodal_heads=True).eval()
    own = head.unimodal_logits(embeddings)
    text = F.layer_norm(embeddings["text"], (6,), head.norms["text"].weight, head.norms["text"].bias)
    assert torch.allclose(own["text"], head.unimodal["text"](text), atol=1e-6)
    assert own["audio"].shape == (5, 3)


def test_classifier_returns_fused_and_unimodal_logits_from_one_pass():
    model = _classifier().eval()
    batch = _batch()
    logits, own = model(batch, unimodal=True)
    assert torch.equal(logits, model(batch))
    assert set(own) == {"audio", "text"}
    assert torch.allclose(logits, own["audio"] + own["text"] - model.head.classifier.bias, atol=1e-5)


def _saved(tmp_path, options: dict) -> tuple[MeldClassifier, object]:
    """A tiny audio + text classifier saved with meld.classifier_io; returns it and its model/ folder."""
    from meld.classifier_io import classifier_spec, save_classifier
    from meld.dataset import DataConfig

    torch.manual_seed(0)
    clara = Clara(load_model_config("tiny"))
    dims = input_dims(clara, None, ("audio", "text"), "projected")
    model = MeldClassifier(clara, FusionHead(dims, 7, **options), inputs=("audio", "text")).eval()
    spec = classifier_spec(model, target="emotion", class_names=EMOTIONS, head={"dims": dims, "options": options},
                           data=DataConfig())
    return model, save_classifier(tmp_path / "model", model, spec)


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
def test_a_saved_classifier_reloads_to_the_same_logits(tmp_path, fusion):
    from meld.classifier_io import load_classifier

    model, folder = _saved(tmp_path, {"fusion": fusion, "fusion_dim": 8, "hidden_dim": 5, "unimodal_heads": True})
    loaded, _, _ = load_classifier(folder)
    assert not loaded.training
    batch = _batch()
    with torch.no_grad():
        logits, own = model(batch, unimodal=True)
        again, own_again = loaded(batch, unimodal=True)
    assert torch.equal(logits, again) and all(torch.equal(own[name], own_again[name]) for name in own)


@pytest.mark.parametrize("options", [{"hidden_dim": -1}, {"fusion": "gated", "fusion_dim": -2},
                                     {"fusion": "attention", "fusion_dim": 0}])
def test_head_options_out_of_range_in_a_saved_spec_are_one_error_naming_the_file(tmp_path, options):
    # They raised RuntimeError (a negative tensor size) or ZeroDivisionError deep in torch, past the
    # CheckpointError that meld.predict turns into one line.
    import json

    from clara.checkpoint import CheckpointError
    from meld.classifier_io import SPEC_FILE, load_classifier

    _, folder = _saved(tmp_path, {"fusion": "concat", "fusion_dim": 8})
    spec = json.loads((folder / SPEC_FILE).read_text())
    spec["head"]["options"].update(options)
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError) as caught:
        load_classifier(folder)
    assert str(caught.value).startswith(f"{folder / SPEC_FILE}: field 'head' does not describe a head (ValueError: "
                                        "fusion_dim must be >= 1, hidden_dim >= 0, dropout and modality_dropout in")
