"""The Megatron GPTModel <-> Hugging Face GraniteForCausalLM parameter mapping (dense).

Megatron's `linear_qkv` stacks, for each query group, that group's query heads, then its key and
value head; its SwiGLU `linear_fc1` is [gate; up]. Granite carries the muP multipliers in its config.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_power import mup

# Megatron name (local layer spec, one layer) -> Granite name; {i} is the layer index.
LAYER_TABLE = {
    "decoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GLOBAL_TABLE = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def hf_config(config, vocab_size: int):
    from transformers import GraniteConfig

    m = config.model
    return GraniteConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon, rope_theta=float(m.rotary_base),
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        embedding_multiplier=mup.emb_mult(config), residual_multiplier=mup.residual_mult(config),
        attention_multiplier=mup.softmax_scale(config) or (m.hidden_size // m.num_attention_heads) ** -0.5,
        logits_scaling=mup.width_mult(config), attention_dropout=0.0,
    )


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Megatron's per-group [q..., k, v] rows -> (q, k, v) weights."""
    per_group = heads // groups
    w = qkv.view(groups, per_group + 2, head_dim, -1)
    q = w[:, :per_group].reshape(heads * head_dim, -1)
    k = w[:, per_group].reshape(groups * head_dim, -1)
    v = w[:, per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


def to_hf(state_dict: Dict[str, torch.Tensor], config, vocab_size: int) -> Dict[str, torch.Tensor]:
    """A single-shard Megatron state dict (local spec names) -> GraniteForCausalLM tensors."""
    m = config.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head_dim = m.hidden_size // heads
    out = {}
    for src, dst in GLOBAL_TABLE.items():
        if src in state_dict:
            tensor = state_dict[src]
            out[dst] = tensor[:vocab_size] if src.startswith(("embedding", "output_layer")) else tensor
    for i in range(m.num_layers):
        for src, dst in LAYER_TABLE.items():
            out[dst.format(i=i)] = state_dict[src.format(i=i)]
        q, k, v = split_qkv(state_dict[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], heads, groups, head_dim)
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = q
        out[f"model.layers.{i}.self_attn.k_proj.weight"] = k
        out[f"model.layers.{i}.self_attn.v_proj.weight"] = v
        gate, up = state_dict[f"decoder.layers.{i}.mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[f"model.layers.{i}.mlp.gate_proj.weight"] = gate
        out[f"model.layers.{i}.mlp.up_proj.weight"] = up
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
