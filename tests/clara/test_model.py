"""The model against the reference math, presets, masking and the attention backends."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from clara.attention import attention, gelu_attention
from clara.checkpoint import load_checkpoint
from clara.model import Clara
from clara.model_config import ClaraConfig, load_model_config
from clara.perceiver import keep_random_tokens
from tests.clara.reference_math import (
    REFERENCE_AUDIO_TEMPERATURE,
    REFERENCE_TEXT_TEMPERATURE,
    random_reference_state_dict,
    reference_encode_audio,
    reference_encode_text,
    reference_state_dict_shapes,
)

REFERENCE_SIZES = {
    # name: (reference hyper_parameters, shape arguments)
    "tiny": (
        dict(text_encoder_embedding=32, text_encoder_pos_embedding_size=512, text_encoder_layers=2,
             text_encoder_heads=2, text_encoder_out_channels=32, text_encoder_project=32, output_dim=16,
             audio_encoder_layers=2, audio_encoder_embedding=32, audio_encoder_pos_embedding_size=512,
             audio_encoder_num_latents=32, audio_encoder_latent_dim=32, audio_encoder_project=32,
             audio_encoder_cross_heads=1, audio_encoder_latent_heads=2, audio_encoder_cross_dim_head=64,
             audio_encoder_latent_dim_head=64, audio_encoder_weight_tie_layers=False),
        dict(text_layers=2, text_heads=2, audio_layers=2, cross_heads=1, latent_heads=2, width=32,
             positions=512, latents=32, out=16),
    ),
    "medium": (
        dict(text_encoder_embedding=512, text_encoder_pos_embedding_size=4096, text_encoder_layers=10,
             text_encoder_heads=8, text_encoder_out_channels=512, text_encoder_project=512, output_dim=512,
             vocab_size=50373, n_mels=80, audio_encoder_layers=10, audio_encoder_embedding=512,
             audio_encoder_pos_embedding_size=4096, audio_encoder_num_latents=512, audio_encoder_latent_dim=512,
             audio_encoder_project=512, audio_encoder_cross_heads=2, audio_encoder_latent_heads=16,
             audio_encoder_cross_dim_head=64, audio_encoder_latent_dim_head=64,
             audio_encoder_weight_tie_layers=False, audio_encoder_seq_dropout_prob=0.5,
             text_encoder_seq_dropout_prob=0.5, text_encoder_project_dropout_prob=0.8, learning_rate=1e-4),
        dict(text_layers=10, text_heads=8, audio_layers=10, cross_heads=2, latent_heads=16),
    ),
}


def write_reference_checkpoint(tmp_path, size):
    hparams, shape_args = REFERENCE_SIZES[size]
    state = random_reference_state_dict(reference_state_dict_shapes(**shape_args))
    path = tmp_path / f"clara-{size}.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 3, "global_step": 1000}, path)
    return path, state, shape_args


@pytest.mark.parametrize("name,expected", [("small", 67_281_410), ("medium", 109_419_522), ("large", 641_476_610)])
def test_preset_parameter_counts_match_the_reference(name, expected):
    with torch.device("meta"):
        model = Clara(load_model_config(name))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_tiny_preset_is_tiny():
    assert sum(p.numel() for p in Clara(load_model_config("tiny")).parameters()) < 2_000_000


@pytest.mark.parametrize("size", ["tiny", "medium"])
@pytest.mark.parametrize("mask_padding", [True, False])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_reference_checkpoint_matches_reference_math(tmp_path, size, mask_padding, backend):
    path, state, args = write_reference_checkpoint(tmp_path, size)
    model = load_checkpoint(path, overrides=[f"mask_padding={str(mask_padding).lower()}", f"attention={backend}"])
    torch.manual_seed(1)
    mel = torch.randn(2, 80, 282)  # 3 s at 48 kHz
    tokens = torch.randint(1, 50373, (2, 17))
    with torch.no_grad():
        ours_audio = model.encode_audio(mel)
        ours_text = model.encode_text(tokens)
        ref_audio = reference_encode_audio(state, mel, layers=args["audio_layers"],
                                           cross_heads=args["cross_heads"], latent_heads=args["latent_heads"])
        ref_text = reference_encode_text(state, tokens, layers=args["text_layers"], heads=args["text_heads"])
    assert (ours_audio - ref_audio).abs().max() <= 1e-5
    assert (ours_text - ref_text).abs().max() <= 1e-5
    # The temperatures are the reference's, as scales: `audio_tempeture` is the audio one and
    # `text_tempeture` the text one (clara.md).  The checkpoint's values differ from each other and
    # from the model's init, so a loader that skipped or swapped them fails here.
    assert REFERENCE_AUDIO_TEMPERATURE != REFERENCE_TEXT_TEMPERATURE
    init = math.log(1.0 / model.config.init_temperature)  # what a fresh model holds
    assert min(abs(REFERENCE_AUDIO_TEMPERATURE - init), abs(REFERENCE_TEXT_TEMPERATURE - init)) > 0.1
    with torch.no_grad():
        out = model(mel, tokens)
    expected_audio = torch.tensor(REFERENCE_AUDIO_TEMPERATURE).exp()
    expected_text = torch.tensor(REFERENCE_TEXT_TEMPERATURE).exp()
    torch.testing.assert_close(out.audio_scale, expected_audio, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.text_scale, expected_text, rtol=1e-6, atol=0)


def test_unmasked_mode_reproduces_reference_on_padded_batches(tmp_path):
    path, state, args = write_reference_checkpoint(tmp_path, "tiny")
    model = load_checkpoint(path, overrides=["mask_padding=false"])
    mel = torch.randn(2, 80, 100)
    mel[1, :, 60:] = 0  # zero-padded, as the reference's collate does
    tokens = torch.randint(1, 50373, (2, 9))
    tokens[0, 5:] = 0
    with torch.no_grad():
        ours = model.encode_audio(mel, torch.tensor([100, 60]))
        ref = reference_encode_audio(state, mel, layers=2, cross_heads=1, latent_heads=2)
        ours_t = model.encode_text(tokens, torch.tensor([5, 9]))
        ref_t = reference_encode_text(state, tokens, layers=2, heads=2)
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours_t - ref_t).abs().max() <= 1e-5


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return Clara(load_model_config("tiny")).eval()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_masked_batching_leaves_each_item_unchanged(tiny_model, backend):
    tiny_model.set_attention(backend)
    frames = [37, 120, 81, 120]  # odd and even lengths exercise the stride-2 conv's edge
    mels = [torch.randn(80, n) for n in frames]
    batch = torch.zeros(len(mels), 80, max(frames))
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    texts = [torch.randint(1, 50373, (n,)) for n in (3, 11, 1, 7)]
    tokens = torch.zeros(len(texts), 11, dtype=torch.long)
    for i, t in enumerate(texts):
        tokens[i, : len(t)] = t
    with torch.no_grad():
        batched_audio = tiny_model.encode_audio(batch, torch.tensor(frames))
        batched_text = tiny_model.encode_text(tokens, torch.tensor([3, 11, 1, 7]))
        for i in range(len(frames)):
            alone_audio = tiny_model.encode_audio(mels[i][None])
            alone_text = tiny_model.encode_text(texts[i][None])
            assert (batched_audio[i] - alone_audio[0]).abs().max() <= 1e-5
            assert (batched_text[i] - alone_text[0]).abs().max() <= 1e-5


def test_without_masks_padding_changes_the_embedding(tiny_model):
    """The control for the test above: the reference behaviour does depend on the batch."""
    mel = torch.randn(1, 80, 40)
    padded = torch.cat([mel, torch.zeros(1, 80, 60)], dim=2)
    with torch.no_grad():
        masked = tiny_model.encode_audio(padded, torch.tensor([40]))
        tiny_model.config = dataclasses.replace(tiny_model.config, mask_padding=False)
        unmasked = tiny_model.encode_audio(padded, torch.tensor([40]))
        alone = tiny_model.encode_audio(mel)
    assert (masked - alone).abs().max() <= 1e-5
    assert (unmasked - alone).abs().max() > 1e-3


def test_embeddings_are_unit_norm_and_heads_project(tiny_model):
    with torch.no_grad():
        a = tiny_model.encode_audio(torch.randn(3, 80, 50))
        t = tiny_model.encode_text(torch.randint(1, 1000, (3, 6)))
        raw = tiny_model.encode_text(torch.randint(1, 1000, (3, 6)), normalize=False)
    assert a.shape == (3, 32) and t.shape == (3, 32)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)


def test_temperatures_start_at_log_inverse_0_07():
    model = Clara(load_model_config("tiny"))
    assert model.audio_log_scale.item() == pytest.approx(2.659260, abs=1e-6)
    assert model.text_log_scale.item() == pytest.approx(2.659260, abs=1e-6)


def test_temperatures_are_not_clamped():
    """clara.md: the scales are exp() of the two parameters with no clamp (CLIP clamps at 100).  At
    ln(1000) and ln(300) the model gives those scales, and the loss's gradient reaches both
    parameters: d/dθ of CE(e^θ·S) is e^θ·(Σ_j p_ij S_ij - S_ii) per row, averaged (and halved)."""
    from clara.loss import ContrastiveLoss

    model = Clara(load_model_config("tiny"))
    with torch.no_grad():
        model.audio_log_scale.fill_(math.log(1000.0))
        model.text_log_scale.fill_(math.log(300.0))
    torch.manual_seed(0)
    out = model(torch.randn(3, 80, 20), torch.randint(1, 1000, (3, 5)))
    torch.testing.assert_close(out.audio_scale, torch.tensor(1000.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.text_scale, torch.tensor(300.0), rtol=1e-6, atol=0)
    ContrastiveLoss()(out.audio_embeds, out.text_embeds, out.audio_scale, out.text_scale).backward()
    similarity = (out.audio_embeds @ out.text_embeds.T).detach().double()  # [3, 3]
    for scale, sim, grad in ((1000.0, similarity, model.audio_log_scale.grad),
                             (300.0, similarity.T, model.text_log_scale.grad)):  # fmt: skip
        probs = (scale * sim).softmax(dim=1)
        expected = scale * ((probs * sim).sum(dim=1) - sim.diagonal()).mean() / 2
        assert abs(float(expected)) > 1e-3
        assert float(grad) == pytest.approx(float(expected), rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_matches_eager_attention(with_mask):
    q, k, v = torch.randn(3, 4, 7, 16), torch.randn(3, 4, 13, 16), torch.randn(3, 4, 13, 16)
    mask = torch.arange(13)[None] < torch.tensor([13, 5, 1])[:, None] if with_mask else None
    eager = attention(q, k, v, key_mask=mask, backend="eager")
    for backend in ("sdpa", "sdpa_cudnn"):
        assert (attention(q, k, v, key_mask=mask, backend=backend) - eager).abs().max() <= 1e-5
    # flash_attn without a GPU falls back to sdpa rather than failing.
    assert (attention(q, k, v, key_mask=mask, backend="flash_attn") - eager).abs().max() <= 1e-5


def _eager_and_backend(backend: str, q, k, v, mask, grad_out) -> list[tuple[torch.Tensor, ...]]:
    """(output, dq, dk, dv) of the eager reference and of ``backend`` for ``grad_out``, checked to agree
    within 1e-5."""
    results = []
    for name in ("eager", backend):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, key_mask=mask, backend=name)
        out.backward(grad_out)
        results.append((out.detach(), *(t.grad for t in inputs)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return results


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_cudnn", "flash_attn"])
def test_fast_attention_gradients_match_eager_and_skip_padded_keys(backend):
    """The fused kernels' backward against the eager reference's, through a padded key mask: q, k, v
    gradients within 1e-5, and exactly zero for every padded key and value (those positions take no
    part in the softmax, so nothing may flow back into them).  flash_attn runs as sdpa on the CPU."""
    lengths = torch.tensor([13, 5, 1])
    mask = torch.arange(13)[None] < lengths[:, None]  # [B, Lk]
    q, k, v = torch.randn(3, 4, 7, 16), torch.randn(3, 4, 13, 16), torch.randn(3, 4, 13, 16)
    grad_out = torch.randn(3, 4, 7, 16)
    results = _eager_and_backend(backend, q, k, v, mask, grad_out)
    for dq, dk, dv in (results[0][1:], results[1][1:]):
        assert dk[~mask[:, None, :, None].expand_as(dk)].abs().max() == 0
        assert dv[~mask[:, None, :, None].expand_as(dv)].abs().max() == 0
        assert dk[1, :, :5].abs().max() > 0  # real keys do get gradients


@pytest.mark.parametrize("backend, cudnn", [("sdpa", False), ("sdpa_cudnn", True)])
def test_sdpa_leaves_cudnn_out_and_sdpa_cudnn_does_not(sdpa_calls, backend, cudnn):
    # cuDNN's attention builds a plan per new shape, so `sdpa` must call PyTorch's kernel with it
    # disabled (and the rest enabled); `sdpa_cudnn` leaves PyTorch's choice alone.
    q = torch.randn(2, 2, 3, 8)
    attention(q, q, q, key_mask=torch.ones(2, 3, dtype=torch.bool), backend=backend)
    assert sdpa_calls == [{"cudnn": cudnn, "flash": True, "efficient": True, "math": True}]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the call


def test_sdpa_narrows_a_callers_kernel_choice_rather_than_widening_it(sdpa_calls):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 2, 3, 8)
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]):  # e.g. the math kernel, for determinism
        attention(q, q, q, backend="sdpa")
        attention(q, q, q, backend="sdpa_cudnn")
    assert sdpa_calls == [{"cudnn": False, "flash": False, "efficient": False, "math": True},
                          {"cudnn": True, "flash": False, "efficient": False, "math": True}]  # fmt: skip


@pytest.mark.parametrize("option", ["", "activation_checkpointing=true", "selective_recompute=true"])
def test_default_model_never_offers_cudnn_attention(sdpa_calls, option):
    # Every attention of both towers (cross, latent and text self-attention) goes through `sdpa`,
    # also when the backward pass recomputes blocks (then SDPA is called again).
    config = load_model_config("tiny", [option] if option else [])
    model = Clara(config).train()
    out = model(torch.randn(2, 80, 50), torch.randint(1, 1000, (2, 7)), torch.tensor([50, 20]), torch.tensor([7, 3]))
    forward_calls = len(sdpa_calls)
    (out.audio_embeds.sum() + out.text_embeds.sum()).backward()
    assert forward_calls == 1 + config.audio.layers + config.text.layers
    assert len(sdpa_calls) > forward_calls if option else len(sdpa_calls) == forward_calls
    assert not any(call["cudnn"] for call in sdpa_calls)


def test_sdpa_kernel_choice_compiles_without_graph_breaks():
    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8)
    mask = torch.arange(5)[None] < torch.tensor([5, 2])[:, None]
    step = torch.compile(lambda q, k, m: attention(q, k, k, key_mask=m, backend="sdpa"), fullgraph=True, backend="aot_eager")
    assert (step(q, k, mask) - attention(q, k, k, key_mask=mask, backend="eager")).abs().max() <= 1e-5


def test_masked_attention_ignores_padded_keys():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False]])
    out = attention(q, k, v, key_mask=mask, backend="eager")
    ref = torch.softmax(q @ k[:, :, :3].transpose(-1, -2) / 8**0.5, -1) @ v[:, :, :3]
    assert (out - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_cudnn", "flash_attn"])
def test_a_query_row_without_real_keys_gives_zeros_like_eager(backend):
    """An item whose keys are all padding (length 0): every backend gives its queries zeros and sends
    no gradient anywhere from them, as the eager reference does (it used to spread their weight evenly
    over the padded keys while SDPA gave zeros).  Outputs and q, k, v gradients within 1e-5 of eager's;
    flash_attn runs as sdpa on the CPU."""
    mask = torch.arange(9)[None] < torch.tensor([9, 0, 3])[:, None]  # [B, Lk], item 1 has no real key
    q, k, v = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    grad_out = torch.randn(3, 2, 4, 16)
    results = _eager_and_backend(backend, q, k, v, mask, grad_out)
    out, dq, dk, dv = results[0]
    assert out[1].abs().max() == 0 and dq[1].abs().max() == 0 and dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    assert out[0].abs().max() > 0 and dv[2, :, :3].abs().max() > 0  # the other items are untouched


@pytest.mark.parametrize("backend", ["eager", "sdpa", "sdpa_cudnn", "flash_attn"])
def test_a_float_key_mask_is_refused_by_every_backend(backend):
    """key_mask is bool (True = a real key).  A 0/1 float mask must not reach SDPA, which would add it
    to the scores as a bias (attending to every key) where eager fails on it."""
    q = torch.randn(2, 2, 3, 8)
    mask = torch.arange(3)[None] < torch.tensor([3, 1])[:, None]
    with pytest.raises(TypeError, match="key_mask must be bool"):
        attention(q, q, q, key_mask=mask.float(), backend=backend)


def test_flash_attn_varlen_path_packs_keys_by_cu_seqlens_and_matches_eager(monkeypatch):
    """clara.attention's flash-attn path for a padded batch, run on the CPU with flash-attn's functions
    replaced by the math they compute over each cu_seqlens segment: for key lengths [3, 1, 4] of 5 (two
    masks not prefixes) and 2 queries, it passes the hand-computed cu_seqlens_q [0, 2, 4, 6],
    cu_seqlens_k [0, 3, 4, 8], max lengths 2 and 4, and the real keys packed in batch order; output and
    q, k, v gradients equal eager's on the bf16-rounded inputs (flash-attn computes fp32 inputs in bf16)
    within 2e-2, and padded keys get exactly zero gradient."""
    import sys
    import types

    from clara.attention import _flash

    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0):
        # q [total_q, H, D], k, v [total_k, H, D]; segment i is rows cu[i]:cu[i + 1].
        calls.append(dict(k=k.detach().clone(), cu_q=cu_q.tolist(), cu_k=cu_k.tolist(), max_q=max_q, max_k=max_k,
                          dtypes={q.dtype, k.dtype, v.dtype, cu_q.dtype, cu_k.dtype}, dropout_p=dropout_p))  # fmt: skip
        out = []
        for i in range(len(cu_q) - 1):
            qs, ks, vs = (t[cu[i] : cu[i + 1]].float().transpose(0, 1) for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
            probs = torch.softmax(qs @ ks.transpose(-1, -2) * qs.shape[-1] ** -0.5, dim=-1)  # [H, Lq_i, Lk_i]
            out.append((probs @ vs).transpose(0, 1))  # [Lq_i, H, D]
        return torch.cat(out).to(q.dtype)

    def dense(*args, **kwargs):
        raise AssertionError("a padded batch must take the varlen kernel")

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func, fake.flash_attn_varlen_func = dense, varlen
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    mask = torch.tensor([[True, True, True, False, False],
                         [False, False, True, False, False],
                         [True, False, True, True, True]])  # fmt: skip
    q, k, v = torch.randn(3, 2, 2, 12), torch.randn(3, 2, 5, 12), torch.randn(3, 2, 5, 12)
    grad_out = torch.randn(3, 2, 2, 12)
    results = []
    for run in (lambda *t: _flash(*t, mask, 0.0), lambda *t: attention(*t, key_mask=mask, backend="eager")):
        inputs = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]
        out = run(*inputs)
        out.backward(grad_out)
        results.append((out.detach(), *(t.grad for t in inputs)))
    (call,) = calls
    assert (call["cu_q"], call["cu_k"], call["max_q"], call["max_k"]) == ([0, 2, 4, 6], [0, 3, 4, 8], 2, 4)
    assert call["dtypes"] == {torch.bfloat16, torch.int32} and call["dropout_p"] == 0.0
    packed = torch.cat([k[0, :, :3], k[1, :, 2:3], k[2, :, [0, 2, 3, 4]]], dim=1).transpose(0, 1)  # [8, H, D]
    assert torch.equal(call["k"], packed.bfloat16())
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for grad in results[0][2:]:  # dk, dv [B, H, Lk, D]
        assert grad[~mask[:, None, :, None].expand_as(grad)].abs().max() == 0

def test_gelu_attention_is_what_its_docstring_says():
    q, k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    out = gelu_attention(q, k, v, key_mask=mask)
    for b, n in ((0, 6), (1, 2)):
        w = torch.nn.functional.gelu(q[b, 0] @ k[b, 0, :n].T * 0.5)  # d = 4 -> scale 1/2
        assert torch.allclose(out[b, 0], w @ v[b, 0, :n] / n, atol=1e-6)


def test_gelu_cross_attention_option_runs_and_differs():
    torch.manual_seed(0)
    softmax_model = Clara(load_model_config("tiny")).eval()
    gelu_model = Clara(load_model_config("tiny", ["audio.cross_attention=gelu"])).eval()
    gelu_model.load_state_dict(softmax_model.state_dict())
    mel = torch.randn(2, 80, 64)
    with torch.no_grad():
        assert (softmax_model.encode_audio(mel) - gelu_model.encode_audio(mel)).abs().max() > 1e-4


def test_sinusoidal_text_positions_option():
    model = Clara(load_model_config("tiny", ["text.positions=sinusoidal"])).eval()
    assert model.text.position_embedding is None
    table = model.text.position_table
    assert torch.allclose(table[0, 0::2], torch.zeros(16)) and torch.allclose(table[0, 1::2], torch.ones(16))
    assert table[3, 0].item() == pytest.approx(torch.sin(torch.tensor(3.0)).item(), abs=1e-6)
    with torch.no_grad():
        assert model.encode_text(torch.randint(1, 100, (2, 5))).shape == (2, 32)
    assert "text.position_table" not in model.state_dict()


def test_training_keeps_the_configured_fraction_of_real_tokens():
    tokens = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1)
    mask = torch.arange(10)[None] < torch.tensor([10, 4])[:, None]
    kept, kept_mask = keep_random_tokens(tokens, mask, 0.5)
    assert kept.shape == (2, 5, 1)
    assert kept_mask.sum(1).tolist() == [5, 2]
    # Every kept, unmasked token of item 1 is one of its 4 real tokens (values 10..13).
    real = kept[1, kept_mask[1], 0]
    assert ((real >= 10) & (real <= 13)).all() and len(set(real.tolist())) == 2
    # Odd lengths: K = int(0.5 * 7) = 3 (the reference's count); the shorter item keeps ceil(0.5 * 3) = 2,
    # the longest min(ceil(3.5), K) = 3.
    mask = torch.arange(7)[None] < torch.tensor([7, 3])[:, None]
    kept, kept_mask = keep_random_tokens(torch.zeros(2, 7, 1), mask, 0.5)
    assert kept.shape == (2, 3, 1) and kept_mask.sum(1).tolist() == [3, 2]


def test_training_mode_drops_tokens_and_eval_does_not():
    torch.manual_seed(0)
    model = Clara(load_model_config("tiny", ["audio.token_keep=0.5"]))
    mel = torch.randn(1, 80, 64)
    model.eval()
    with torch.no_grad():
        a, b = model.encode_audio(mel), model.encode_audio(mel)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, d = model.encode_audio(mel), model.encode_audio(mel)
    assert not torch.equal(c, d)


def test_unknown_config_key_is_rejected_with_its_name():
    from clara.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key.*lyers"):
        load_model_config("tiny", ["audio.lyers=3"])


def test_default_config_is_medium():
    assert load_model_config("medium") == ClaraConfig()


def embeds_and_gradients(model: Clara, *inputs: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward of a contrastive-like objective from a fixed RNG state:
    (audio embeds [B, out], text embeds [B, out], {parameter name: gradient})."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(*inputs)
    (out.audio_embeds @ out.text_embeds.T).logsumexp(-1).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.audio_embeds.detach(), out.text_embeds.detach(), grads


# Every ClaraConfig setting that exists for speed (clara.model_config.EXECUTION_KEYS), alone and as
# the bench's fastest rows stack them.  On the CPU flash_attn runs as sdpa, and geglu_kernel=triton as
# its closed forms (the kernels themselves: test_geglu_kernel's interpreter test).
SPEED_OPTIONS = [
    ["attention=sdpa"], ["attention=sdpa_cudnn"], ["attention=flash_attn"],
    ["activation_checkpointing=true"], ["selective_recompute=true"], ["audio.latent_qkv=split"],
    ["audio.geglu_kernel=triton"],
    ["attention=sdpa_cudnn", "selective_recompute=true", "audio.latent_qkv=split", "audio.geglu_kernel=triton"],
]  # fmt: skip


@pytest.mark.parametrize("options", SPEED_OPTIONS, ids=lambda options: ",".join(options))
def test_speed_options_match_the_eager_fp32_reference(options):
    """Each option changes the kernels, what is kept for backward or how Q, K, V are computed, not the
    numbers: from the same weights, on a padded batch of varied lengths with masks on, embeddings and
    every gradient equal the eager-attention fp32 model's (embeddings rtol 1e-5 / atol 1e-6, gradients
    rtol 1e-5 / atol 1e-6).  Dropout and token dropout off: the fused kernels draw their own masks."""
    overrides = ["audio.token_keep=1.0", "text.dropout=0.0"]
    torch.manual_seed(0)
    reference = Clara(load_model_config("tiny", [*overrides, "attention=eager"])).train()
    fast = Clara(load_model_config("tiny", [*overrides, *options])).train()
    fast.load_state_dict(reference.state_dict())
    if "selective_recompute=true" in options:
        assert all(block.selective_recompute for block in fast.audio.perceiver.layers)
    if "audio.latent_qkv=split" in options:
        assert all(block.attn.split for block in fast.audio.perceiver.layers)
    inputs = (torch.randn(3, 80, 50), torch.randint(1, 1000, (3, 7)), torch.tensor([50, 31, 12]), torch.tensor([7, 3, 5]))
    want_audio, want_text, want_grads = embeds_and_gradients(reference, *inputs)
    got_audio, got_text, got_grads = embeds_and_gradients(fast, *inputs)
    torch.testing.assert_close(got_audio, want_audio, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_text, want_text, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()  # the temperatures are not in this objective
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert len(want_grads) > 50


@pytest.mark.parametrize("option", ["activation_checkpointing=true", "selective_recompute=true"])
def test_recomputation_replays_dropout_and_token_dropout(option):
    """Recomputing blocks in the backward pass must draw the same random numbers as their forward
    pass did (text dropout 0.1 inside the checkpointed text layers, audio token dropout before the
    Perceiver): from one seed, embeddings and gradients equal the plain model's bit for bit, and
    the run leaves the global RNG where the plain run leaves it."""
    torch.manual_seed(0)
    plain = Clara(load_model_config("tiny", ["attention=eager"])).train()
    assert plain.config.text.dropout > 0 and plain.config.audio.token_keep < 1
    recomputed = Clara(load_model_config("tiny", ["attention=eager", option])).train()
    recomputed.load_state_dict(plain.state_dict())
    inputs = (torch.randn(3, 80, 50), torch.randint(1, 1000, (3, 7)), torch.tensor([50, 31, 12]), torch.tensor([7, 3, 5]))
    # Each run: (audio embeds, text embeds, gradients, the next random draw after its backward).
    (audio, text, grads, after), (audio_r, text_r, grads_r, after_r) = (
        (*embeds_and_gradients(model, *inputs), torch.rand(4)) for model in (plain, recomputed))  # fmt: skip
    assert torch.equal(audio_r, audio) and torch.equal(text_r, text) and torch.equal(after_r, after)
    assert grads_r.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_r[name], grad), name
    # The control: another seed gives other dropout masks, so the comparison above can fail.
    assert not torch.equal(embeds_and_gradients(plain, *inputs, seed=2)[1], text)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_padded_items_get_the_gradients_of_the_item_alone(tiny_model, backend):
    """The masks exclude padding in the backward pass too: a loss on one item of a padded batch
    gives every parameter the gradient that item gives alone (rtol 1e-5, atol 1e-6), and the
    padding token's embedding row, used only at padded positions, gets none."""
    tiny_model.set_attention(backend)
    frames, words = [37, 120, 81], [3, 11, 6]
    mels = [torch.randn(80, n) for n in frames]
    texts = [torch.randint(1, 50373, (n,)) for n in words]
    mel = torch.stack([torch.nn.functional.pad(m, (0, max(frames) - m.shape[1])) for m in mels])  # [B, 80, T]
    tokens = torch.stack([torch.nn.functional.pad(t, (0, max(words) - len(t))) for t in texts])  # [B, L], pad id 0
    weights = torch.linspace(-1, 1, tiny_model.config.output_dim)

    def gradients(mel, tokens, lengths, token_lengths, item):
        tiny_model.zero_grad()
        out = tiny_model(mel, tokens, lengths, token_lengths)
        ((out.audio_embeds[item] + out.text_embeds[item]) * weights).sum().backward()
        return {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}

    for item in (0, 2):  # both padded in audio and in text (item 1 is the longest of each)
        batched = gradients(mel, tokens, torch.tensor(frames), torch.tensor(words), item)
        alone = gradients(mels[item][None], texts[item][None], None, None, item=0)
        assert batched.keys() == alone.keys()
        for name, grad in alone.items():
            torch.testing.assert_close(batched[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        assert batched["text.token_embedding.weight"][0].abs().max() == 0


@pytest.mark.parametrize("stream", ["autocast", "fp32"])
def test_latent_stream_dtype_under_autocast_and_parity_with_fp32(stream):
    """Under bf16 autocast the latents' residual stream is bf16 with ``audio.latent_stream=autocast``,
    and the embeddings stay within bf16 precision of the fp32 model's: relative error below 2e-2
    (measured 7e-3 for the small preset with either stream)."""
    torch.manual_seed(0)
    model = Clara(load_model_config("small", [f"audio.latent_stream={stream}"])).eval()
    seen = []
    model.audio.perceiver.layers[-1].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    mel, lengths = torch.randn(3, 80, 150), torch.tensor([150, 90, 40])
    with torch.no_grad():
        reference = model.encode_audio(mel, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model.encode_audio(mel, lengths).float()
    expected = torch.bfloat16 if stream == "autocast" else torch.float32
    assert seen == [torch.float32, expected]
    relative = ((fast - reference).norm() / reference.norm()).item()
    assert 1e-4 < relative < 2e-2  # bf16 really ran, and stayed close
