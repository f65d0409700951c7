"""How our parameter names map onto the reference checkpoint's ``state_dict`` keys.

Each of our tensors is one reference tensor, or several concatenated along dim 0 (the Perceiver's
fused self-attention ``qkv`` = reference ``to_q`` then ``to_kv``).  The map is derived from the
config, so importing and exporting are two directions of the same table.
"""

from __future__ import annotations

from clara.model_config import ClaraConfig

PREFIX = "model."


def _linear(ours: str, ref: str, bias: bool = True) -> dict[str, tuple[str, ...]]:
    table = {f"{ours}.weight": (f"{ref}.weight",)}
    if bias:
        table[f"{ours}.bias"] = (f"{ref}.bias",)
    return table


def _norm(ours: str, ref: str) -> dict[str, tuple[str, ...]]:
    return _linear(ours, ref)


def _geglu(ours: str, ref: str) -> dict[str, tuple[str, ...]]:
    return {**_norm(f"{ours}.norm", f"{ref}.norm"), **_linear(f"{ours}.fc1", f"{ref}.fn.net.0"), **_linear(f"{ours}.fc2", f"{ref}.fn.net.2")}


def reference_key_map(config: ClaraConfig) -> dict[str, tuple[str, ...]]:
    """Our state_dict key -> the reference keys (without the ``model.`` prefix) it is made of."""
    table: dict[str, tuple[str, ...]] = {
        "audio_log_scale": ("audio_tempeture",),
        "text_log_scale": ("text_tempeture",),
        "text.token_embedding.weight": ("text_embedding.weight",),
        "audio.position_embedding.weight": ("audio_positional_embedding.weight",),
        "audio.perceiver.latents": ("audio_encoder.latents",),
    }
    if config.text.positions == "learned":
        table["text.position_embedding.weight"] = ("text_positional_embedding.weight",)
    stack = "text_encoder.transformer_encoder.transformer_encoder"
    for i in range(config.text.layers):
        ours, ref = f"text.layers.{i}", f"{stack}.layers.{i}"
        table.update(
            {
                f"{ours}.qkv.weight": (f"{ref}.self_attn.in_proj_weight",),
                f"{ours}.qkv.bias": (f"{ref}.self_attn.in_proj_bias",),
                **_linear(f"{ours}.out", f"{ref}.self_attn.out_proj"),
                **_linear(f"{ours}.fc1", f"{ref}.linear1"),
                **_linear(f"{ours}.fc2", f"{ref}.linear2"),
                **_norm(f"{ours}.norm1", f"{ref}.norm1"),
                **_norm(f"{ours}.norm2", f"{ref}.norm2"),
            }
        )
    table.update(
        {
            **_norm("text.final_norm", f"{stack}.norm"),
            **_linear("text.project", "text_encoder.transformer_encoder.project"),
            **_norm("text.project_norm", "text_encoder.ln"),
            **_norm("text.pool_norm", "text_layer_norm"),
            **_linear("text.fc", "text_fc1"),
            **_linear("text_head", "text_transform.sequential.0"),
            **_linear("audio.conv1", "conv1"),
            **_linear("audio.conv2", "conv2"),
        }
    )
    cross = "audio_encoder.cross_attend_blocks"
    table.update(
        {
            **_norm("audio.perceiver.cross_attn.norm", f"{cross}.0.norm"),
            **_norm("audio.perceiver.cross_attn.norm_context", f"{cross}.0.norm_context"),
            **_linear("audio.perceiver.cross_attn.q", f"{cross}.0.fn.to_q", bias=False),
            **_linear("audio.perceiver.cross_attn.kv", f"{cross}.0.fn.to_kv", bias=False),
            **_linear("audio.perceiver.cross_attn.out", f"{cross}.0.fn.to_out"),
            **_geglu("audio.perceiver.cross_ff", f"{cross}.1"),
        }
    )
    for i in range(config.audio.layers):
        ours, ref = f"audio.perceiver.layers.{i}", f"audio_encoder.layers.{i}"
        table.update(
            {
                **_norm(f"{ours}.attn.norm", f"{ref}.0.norm"),
                f"{ours}.attn.qkv.weight": (f"{ref}.0.fn.to_q.weight", f"{ref}.0.fn.to_kv.weight"),
                **_linear(f"{ours}.attn.out", f"{ref}.0.fn.to_out"),
                **_geglu(f"{ours}.ff", f"{ref}.1"),
            }
        )
    table.update(
        {
            **_norm("audio.pool_norm", "audio_layer_norm"),
            **_linear("audio.fc", "audio_fc1"),
            **_linear("audio_head", "audio_transform.sequential.0"),
        }
    )
    return table
