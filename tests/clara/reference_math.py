"""A plain, eager re-statement of the reference CLARA forward pass, written from
``shared/reference/clara.md`` and working directly on a reference-format ``state_dict``.

It shares no code with ``clara.model``: tests compare the two on the same weights.  No masks, no
dropout (eval mode), einsum-style attention with explicit softmax, as the reference computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, sd, key, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _lin(x, sd, key, bias=True):
    return F.linear(x, sd[f"{key}.weight"], sd[f"{key}.bias"] if bias else None)


def _heads_attention(q, k, v, heads):
    """q [B, N, H*d], k/v [B, M, H*d] -> [B, N, H*d]; softmax(q kᵀ d^-½) v per head."""
    b, n, inner = q.shape
    d = inner // heads
    q = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    k = k.reshape(b, k.shape[1], heads, d).permute(0, 2, 1, 3)
    v = v.reshape(b, v.shape[1], heads, d).permute(0, 2, 1, 3)
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * d**-0.5
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
    return out.permute(0, 2, 1, 3).reshape(b, n, inner)


def _geglu(x, sd, key):
    h = _lin(x, sd, f"{key}.fn.net.0")
    a, gate = h.chunk(2, dim=-1)
    return _lin(a * F.gelu(gate), sd, f"{key}.fn.net.2")


def reference_encode_text(sd, tokens, *, layers, heads):
    """tokens [B, L] -> unit-norm text embedding [B, out]."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    x = sd["text_embedding.weight"][tokens] + sd["text_positional_embedding.weight"][: tokens.shape[1]][None]
    stack = "text_encoder.transformer_encoder.transformer_encoder"
    for i in range(layers):
        p = f"{stack}.layers.{i}"
        qkv = F.linear(x, sd[f"{p}.self_attn.in_proj_weight"], sd[f"{p}.self_attn.in_proj_bias"])
        q, k, v = qkv.chunk(3, dim=-1)
        attn = _lin(_heads_attention(q, k, v, heads), sd, f"{p}.self_attn.out_proj")
        x = _ln(x + attn, sd, f"{p}.norm1")
        ff = _lin(F.relu(_lin(x, sd, f"{p}.linear1")), sd, f"{p}.linear2")
        x = _ln(x + ff, sd, f"{p}.norm2")
    x = _ln(x, sd, f"{stack}.norm")
    x = _lin(x, sd, "text_encoder.transformer_encoder.project")
    x = _ln(x, sd, "text_encoder.ln")
    x = _ln(x, sd, "text_layer_norm")
    x = x.mean(1) + x.max(1).values
    x = F.leaky_relu(_lin(x, sd, "text_fc1"), 0.01)
    return F.normalize(_lin(x, sd, "text_transform.sequential.0"), dim=-1)


def reference_encode_audio(sd, mel, *, layers, cross_heads, latent_heads):
    """mel [B, 80, T] -> unit-norm audio embedding [B, out] (eval mode: every token kept)."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    x = F.gelu(F.conv1d(mel, sd["conv1.weight"], sd["conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, sd["conv2.weight"], sd["conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1)
    x = x + sd["audio_positional_embedding.weight"][: x.shape[1]][None]  # [B, T', C]
    enc = "audio_encoder"
    lat = sd[f"{enc}.latents"][None].expand(x.shape[0], -1, -1)
    c = f"{enc}.cross_attend_blocks"
    q = _lin(_ln(lat, sd, f"{c}.0.norm"), sd, f"{c}.0.fn.to_q", bias=False)
    k, v = _lin(_ln(x, sd, f"{c}.0.norm_context"), sd, f"{c}.0.fn.to_kv", bias=False).chunk(2, dim=-1)
    lat = _lin(_heads_attention(q, k, v, cross_heads), sd, f"{c}.0.fn.to_out") + lat
    lat = _geglu(_ln(lat, sd, f"{c}.1.norm"), sd, f"{c}.1") + lat
    for i in range(layers):
        p = f"{enc}.layers.{i}"
        h = _ln(lat, sd, f"{p}.0.norm")
        q = _lin(h, sd, f"{p}.0.fn.to_q", bias=False)
        k, v = _lin(h, sd, f"{p}.0.fn.to_kv", bias=False).chunk(2, dim=-1)
        lat = _lin(_heads_attention(q, k, v, latent_heads), sd, f"{p}.0.fn.to_out") + lat
        lat = _geglu(_ln(lat, sd, f"{p}.1.norm"), sd, f"{p}.1") + lat
    lat = _ln(lat, sd, "audio_layer_norm")
    pooled = lat.mean(dim=2) + lat.max(dim=2).values  # [B, num_latents]
    x = F.leaky_relu(_lin(pooled, sd, "audio_fc1"), 0.01)
    return F.normalize(_lin(x, sd, "audio_transform.sequential.0"), dim=-1)


def reference_state_dict_shapes(*, text_layers, text_heads, audio_layers, cross_heads, latent_heads,
                                width=512, text_ff=1024, vocab=50373, positions=4096, latents=512,
                                dim_head=64, n_mels=80, out=512, ff_mult=4):
    """The reference checkpoint's keys and shapes (clara.md's listing), generalised to any size."""
    shapes = {"model.audio_tempeture": (), "model.text_tempeture": ()}
    stack = "model.text_encoder.transformer_encoder.transformer_encoder"
    for i in range(text_layers):
        p = f"{stack}.layers.{i}"
        shapes.update({
            f"{p}.self_attn.in_proj_weight": (3 * width, width), f"{p}.self_attn.in_proj_bias": (3 * width,),
            f"{p}.self_attn.out_proj.weight": (width, width), f"{p}.self_attn.out_proj.bias": (width,),
            f"{p}.linear1.weight": (text_ff, width), f"{p}.linear1.bias": (text_ff,),
            f"{p}.linear2.weight": (width, text_ff), f"{p}.linear2.bias": (width,),
            f"{p}.norm1.weight": (width,), f"{p}.norm1.bias": (width,),
            f"{p}.norm2.weight": (width,), f"{p}.norm2.bias": (width,),
        })
    for key in (f"{stack}.norm", "model.text_encoder.ln", "model.text_layer_norm", "model.audio_layer_norm"):
        shapes.update({f"{key}.weight": (width,), f"{key}.bias": (width,)})
    for key in ("model.text_encoder.transformer_encoder.project", "model.text_fc1",
                "model.text_transform.sequential.0", "model.audio_fc1", "model.audio_transform.sequential.0"):
        rows = out if key.endswith("_transform.sequential.0") else width
        shapes.update({f"{key}.weight": (rows, width), f"{key}.bias": (rows,)})
    enc = "model.audio_encoder"
    cross_inner, latent_inner, hidden = cross_heads * dim_head, latent_heads * dim_head, width * ff_mult
    shapes.update({
        f"{enc}.latents": (latents, width),
        f"{enc}.cross_attend_blocks.0.fn.to_q.weight": (cross_inner, width),
        f"{enc}.cross_attend_blocks.0.fn.to_kv.weight": (2 * cross_inner, width),
        f"{enc}.cross_attend_blocks.0.fn.to_out.weight": (width, cross_inner),
        f"{enc}.cross_attend_blocks.0.fn.to_out.bias": (width,),
        f"{enc}.cross_attend_blocks.0.norm.weight": (width,), f"{enc}.cross_attend_blocks.0.norm.bias": (width,),
        f"{enc}.cross_attend_blocks.0.norm_context.weight": (width,), f"{enc}.cross_attend_blocks.0.norm_context.bias": (width,),
        f"{enc}.cross_attend_blocks.1.fn.net.0.weight": (2 * hidden, width), f"{enc}.cross_attend_blocks.1.fn.net.0.bias": (2 * hidden,),
        f"{enc}.cross_attend_blocks.1.fn.net.2.weight": (width, hidden), f"{enc}.cross_attend_blocks.1.fn.net.2.bias": (width,),
        f"{enc}.cross_attend_blocks.1.norm.weight": (width,), f"{enc}.cross_attend_blocks.1.norm.bias": (width,),
    })
    for i in range(audio_layers):
        p = f"{enc}.layers.{i}"
        shapes.update({
            f"{p}.0.fn.to_q.weight": (latent_inner, width), f"{p}.0.fn.to_kv.weight": (2 * latent_inner, width),
            f"{p}.0.fn.to_out.weight": (width, latent_inner), f"{p}.0.fn.to_out.bias": (width,),
            f"{p}.0.norm.weight": (width,), f"{p}.0.norm.bias": (width,),
            f"{p}.1.fn.net.0.weight": (2 * hidden, width), f"{p}.1.fn.net.0.bias": (2 * hidden,),
            f"{p}.1.fn.net.2.weight": (width, hidden), f"{p}.1.fn.net.2.bias": (width,),
            f"{p}.1.norm.weight": (width,), f"{p}.1.norm.bias": (width,),
        })
    shapes.update({
        "model.text_embedding.weight": (vocab, width), "model.text_positional_embedding.weight": (positions, width),
        "model.conv1.weight": (width, n_mels, 3), "model.conv1.bias": (width,),
        "model.conv2.weight": (width, width, 3), "model.conv2.bias": (width,),
        "model.audio_positional_embedding.weight": (positions, width),
    })
    return shapes


# The temperatures a random reference checkpoint carries (log scales, as the reference stores them).
# Distinct from each other and from the model's initial ln(1/0.07) = 2.6592600, so a loader that
# skipped them (the fresh model keeps its init) or swapped the two modalities would be caught.
REFERENCE_AUDIO_TEMPERATURE = 2.1
REFERENCE_TEXT_TEMPERATURE = 3.3


def random_reference_state_dict(shapes, seed=0):
    """Random weights of those shapes: LayerNorm gains near 1, everything else small noise; the two
    temperatures are ``REFERENCE_AUDIO_TEMPERATURE`` and ``REFERENCE_TEXT_TEMPERATURE``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("audio_tempeture"):
            sd[key] = torch.tensor(REFERENCE_AUDIO_TEMPERATURE)
        elif key.endswith("text_tempeture"):
            sd[key] = torch.tensor(REFERENCE_TEXT_TEMPERATURE)
        elif ("norm" in key or key.endswith(".ln.weight") or ".ln." in key) and key.endswith("weight") and len(shape) == 1:
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            if len(shape) == 3:
                fan_in = shape[1] * shape[2]
            std = (1.0 / fan_in) ** 0.5 if len(shape) > 1 else 0.02
            if key.endswith("embedding.weight") or key.endswith("latents"):
                std = 0.5
            sd[key] = std * torch.randn(shape, generator=g)
    return sd
