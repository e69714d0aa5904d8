"""Megatron-Core checkpoints <-> Hugging Face GraniteForCausalLM / GraniteMoeForCausalLM.

One table per architecture maps each Megatron checkpoint key to its Hugging Face tensors. Megatron
keys are those of `dist_checkpointing` (layer-spec independent: the local and the Transformer
Engine specs save the same keys); a `decoder.layers.` key holds every layer stacked on its first
axis, and its Hugging Face names carry `{i}` for the layer. How the tensors relate:
- copy:  the same tensor.
- qkv:   Megatron's `linear_qkv` stacks, for each query group, that group's query heads, then its
         key head and its value head; Hugging Face keeps q, k and v apart.
- glu:   Megatron's SwiGLU `linear_fc1` is [gate; up]; Hugging Face keeps gate and up apart.
- vocab: Megatron pads the vocabulary (to a multiple of 128 and of TP); Hugging Face does not.
GraniteMoe's fused experts (`input_linear [E, 2I, H]`, gate first, and `output_linear [E, H, I]`)
have exactly the layout of Megatron's stacked experts, so they are plain copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_power.errors import ConversionError
from megatron_power.training import mup


@dataclass(frozen=True)
class Entry:
    megatron: str
    hf: Tuple[str, ...]
    kind: str = "copy"  # copy | qkv | glu | vocab

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith("decoder.layers.")


_L = "model.layers.{i}."
ATTENTION = (
    Entry("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",)),
    Entry("decoder.layers.self_attention.linear_qkv.weight",
          (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"), "qkv"),
    Entry("decoder.layers.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
)
DENSE_MLP = (
    Entry("decoder.layers.mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",)),
    Entry("decoder.layers.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "glu"),
    Entry("decoder.layers.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",)),
)
MOE_MLP = (
    Entry("decoder.layers.pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
    Entry("decoder.layers.mlp.router.weight", (_L + "block_sparse_moe.router.layer.weight",)),
    Entry("decoder.layers.mlp.experts.experts.linear_fc1.weight", (_L + "block_sparse_moe.input_linear.weight",)),
    Entry("decoder.layers.mlp.experts.experts.linear_fc2.weight", (_L + "block_sparse_moe.output_linear.weight",)),
)
EMBEDDING = Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_NORM = Entry("decoder.final_layernorm.weight", ("model.norm.weight",))
OUTPUT = Entry("output_layer.weight", ("lm_head.weight",), "vocab")

ARCHITECTURES = {"GraniteForCausalLM": "granite", "GraniteMoeForCausalLM": "granitemoe"}
# The config.json fields that give a model its shape (no default stands in for them).
SHAPE = ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"]
MOE_SHAPE = ["num_local_experts", "num_experts_per_tok"]
# What GraniteMoeConfig assumes when config.json leaves router_aux_loss_coef out.
GRANITE_MOE_AUX_LOSS_COEF = 0.001
# transformers 5 names GraniteMoe's tensors differently in memory and may save them so; the
# published checkpoints (and this writer) use the names above.
HF_ALIASES = {
    "block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.input_linear.weight",
    "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight",
    "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight",
}


def table(model_config) -> List[Entry]:
    """Every tensor of a model of this shape, global tensors first."""
    mlp = MOE_MLP if model_config.num_experts else DENSE_MLP
    tied = [] if model_config.tie_embeddings else [OUTPUT]
    return [EMBEDDING, FINAL_NORM, *tied, *ATTENTION, *mlp]


def hf_names(entry: Entry, layer: Optional[int]) -> List[str]:
    return [name.format(i=layer) for name in entry.hf]


def canonical_hf_name(name: str) -> str:
    for alias, canonical in HF_ALIASES.items():
        if name.endswith(alias):
            return name[: -len(alias)] + canonical
    return name


def to_hf(entry: Entry, rows: Callable[[int, Optional[int]], torch.Tensor], model_config,
          vocab_size: int) -> List[torch.Tensor]:
    """One layer's (or a global) Megatron tensor -> its Hugging Face tensors, in `entry.hf` order.
    `rows(start, stop)` reads those rows of the Megatron tensor, so that a Hugging Face tensor
    made of some of its rows costs a read of those rows alone."""
    if entry.kind == "qkv":
        return list(split_qkv(rows(0, None), *_heads(model_config)))
    if entry.kind == "glu":
        ffn = model_config.ffn_hidden_size
        return [rows(0, ffn), rows(ffn, 2 * ffn)]
    if entry.kind == "vocab":
        return [rows(0, vocab_size)]
    return [rows(0, None)]


def from_hf(entry: Entry, tensors: List[torch.Tensor], model_config, padded_vocab: int) -> torch.Tensor:
    """The inverse of `to_hf`: Hugging Face tensors -> one layer's (or a global) Megatron tensor."""
    if entry.kind == "qkv":
        return merge_qkv(*tensors, *_heads(model_config))
    if entry.kind == "glu":
        return torch.cat(tensors, dim=0)
    if entry.kind == "vocab":
        (tensor,) = tensors
        padding = tensor.new_zeros(padded_vocab - tensor.shape[0], tensor.shape[1])
        return torch.cat([tensor, padding], dim=0)
    (tensor,) = tensors
    return tensor


def _heads(m) -> Tuple[int, int, int]:
    groups = m.num_query_groups or m.num_attention_heads
    return m.num_attention_heads, groups, m.hidden_size // m.num_attention_heads


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    per_group = heads // groups
    w = qkv.view(groups, per_group + 2, head_dim, -1)
    q = w[:, :per_group].reshape(heads * head_dim, -1)
    k = w[:, per_group].reshape(groups * head_dim, -1)
    v = w[:, per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    per_group = heads // groups
    hidden = q.shape[-1]
    stacked = torch.cat([q.view(groups, per_group, head_dim, hidden), k.view(groups, 1, head_dim, hidden),
                         v.view(groups, 1, head_dim, hidden)], dim=1)
    return stacked.reshape(-1, hidden)


def hf_config(config, vocab_size: int, **token_ids):
    """The Hugging Face config of a recipe's model: shape, muP multipliers, special token ids."""
    from transformers import GraniteConfig, GraniteMoeConfig

    m = config.model
    common = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon, rope_theta=float(m.rotary_base),
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, hidden_act="silu", attention_dropout=0.0,
        embedding_multiplier=mup.emb_mult(config), residual_multiplier=mup.residual_mult(config),
        attention_multiplier=mup.softmax_scale(config) or (m.hidden_size // m.num_attention_heads) ** -0.5,
        logits_scaling=mup.width_mult(config), **token_ids,
    )
    if m.num_experts:
        return GraniteMoeConfig(intermediate_size=m.moe_ffn_hidden_size, num_local_experts=m.num_experts,
                                num_experts_per_tok=m.moe_topk, router_aux_loss_coef=m.moe_aux_loss_coeff,
                                **common)
    return GraniteConfig(intermediate_size=m.ffn_hidden_size, mlp_bias=False, **common)


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling or params.get("rope_type", "default") != "default":
        raise ConversionError(f"RoPE scaling {scaling or params} is not supported (expected plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_settings(hf: dict) -> Dict[str, Dict]:
    """A Hugging Face config.json -> this project's `model` and `mup` settings for the same function."""
    by_model_type = {model_type: name for name, model_type in ARCHITECTURES.items()}
    arch = (hf.get("architectures") or [by_model_type.get(hf.get("model_type"))])[0]  # as transformers reads it
    if arch is None:
        raise ConversionError(f"config.json names no architecture (expected architectures {' or '.join(ARCHITECTURES)}, "
                              f"or model_type {' or '.join(ARCHITECTURES.values())})")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"architecture {arch} is not supported (expected one of {', '.join(ARCHITECTURES)})")
    missing = [key for key in SHAPE + (MOE_SHAPE if arch == "GraniteMoeForCausalLM" else []) if key not in hf]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)} (a {arch} config names them)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"{flag}=true is not supported (this project's models have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf['hidden_act']} is not supported (expected silu, SwiGLU)")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hidden // heads
    model = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
        rotary_base=int(_rope_theta(hf)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
    )
    if arch == "GraniteMoeForCausalLM":
        model.update(num_experts=hf["num_local_experts"], moe_topk=hf["num_experts_per_tok"],
                     moe_ffn_hidden_size=hf["intermediate_size"],
                     moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", GRANITE_MOE_AUX_LOSS_COEF)))
    else:
        model.update(ffn_hidden_size=hf["intermediate_size"])
    attention = float(hf.get("attention_multiplier", head_dim ** -0.5))
    emb, res, logits = (float(hf.get(k, 1.0)) for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling"))
    if math.isclose(attention, 1.0 / head_dim):
        mup_settings = dict(enabled=True, base_width=None, width_mult=logits, emb_mult=emb, residual_mult=res)
    elif math.isclose(attention, head_dim ** -0.5) and emb == res == logits == 1.0:
        mup_settings = dict(enabled=False)
    else:
        raise ConversionError(
            f"multipliers attention={attention}, embedding={emb}, residual={res}, logits={logits} are not "
            f"supported (expected muP with attention 1/head_dim = {1 / head_dim:g}, or all standard)")
    return {"model": model, "mup": mup_settings}
