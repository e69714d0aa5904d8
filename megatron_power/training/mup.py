"""muP as the paper (Shen et al. 2024) and IBM's code use it, wired through Megatron-Core, and
its depth extension (Dey et al. 2025, "Don't be lazy: CompleteP enables compute-efficient deep
transformers", arXiv 2505.01618, Table 1).

With m_width = d_model / d_base:
- embedding output x emb_mult                      (Megatron's native muP, TransformerConfig.use_mup)
- attention logits x 1/d_head, not 1/sqrt(d_head)  (native)
- output logits x 1/m_width                        (native)
- attention and MLP outputs x residual_mult        (ours: the layer spec's bias-dropout-add functions;
                                                    Megatron has no residual multiplier)
- init std init_std / sqrt(m_width) for hidden matrices, also / sqrt(2 * layers) for output
  projections; embeddings at init_std              (ours, model.initialize_weights: Megatron draws the
                                                    same stds, but not the same numbers in every layout)
- AdamW: hidden matrices at lr / m_width, the rest at lr; no weight decay on norms and biases
                                                   (ours, get_megatron_optimizer's config_overrides:
                                                    Megatron's muP overrides also divide Adam's epsilon
                                                    by m_width, which IBM's settings do not)
With muP off, every multiplier is 1 and the model is in standard parametrization.

Depth (mup.depth_alpha = alpha, m_depth = layers / mup.base_depth; alpha 0 keeps all of the above,
0.5 is depth-muP, 1 is CompleteP), each rule from the paper's Table 1:
- each block's output x m_depth^-alpha, folded into residual_mult (Hugging Face's Granite carries
  the product as its one residual_multiplier)
- hidden matrices' lr x m_depth^(alpha - 1); norm gains inside the blocks at lr x m_depth^(alpha - 1)
  (the final norm, embeddings and output layer keep lr)
- AdamW epsilon of hidden matrices x m_depth^-alpha
- init: no depth factor (the block multiplier takes its place), so the output projections keep the
  / sqrt(2 * base_depth) of the base model rather than / sqrt(2 * layers)
Weight decay has no depth factor in the table and keeps none here.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

# Megatron-Core is imported inside the functions that hook into it: the multipliers alone are
# what `convert to-hf` needs, and importing Megatron-Core costs it seconds.


def width_mult(config) -> float:
    mup = config.mup
    if not mup.enabled:
        return 1.0
    return mup.width_mult if mup.width_mult is not None else config.model.hidden_size / mup.base_width


def emb_mult(config) -> float:
    return config.mup.emb_mult if config.mup.enabled else 1.0


def depth_mult(config) -> float:
    """m_depth = num_layers / base_depth; 1 without depth scaling."""
    mup = config.mup
    if not mup.enabled or not mup.depth_alpha:
        return 1.0
    return config.model.num_layers / mup.base_depth


def depth_lr_mult(config) -> float:
    """The lr factor of hidden matrices and block norms: m_depth^(alpha - 1)."""
    return depth_mult(config) ** (config.mup.depth_alpha - 1.0)


def residual_mult(config) -> float:
    """Each block's output multiplier: Granite's residual_mult x m_depth^-alpha."""
    if not config.mup.enabled:
        return 1.0
    return config.mup.residual_mult * depth_mult(config) ** -config.mup.depth_alpha


def softmax_scale(config) -> Optional[float]:
    """1/d_head with muP (what Megatron's use_mup sets); None: Megatron's 1/sqrt(d_head)."""
    if not config.mup.enabled:
        return None
    return 1.0 / (config.model.hidden_size // config.model.num_attention_heads)


def is_norm(key: str) -> bool:
    return "norm" in ".".join(key.split(".")[-2:])  # input_layernorm, linear_qkv.layer_norm_weight


def is_embedding_or_output(key: str) -> bool:
    return key.startswith(("embedding.", "output_layer."))


def init_std(key: str, config) -> float:
    """Std of the normal init of the global parameter `key`; 0 means ones (norm weights)."""
    if is_norm(key):
        return 0.0
    std = config.model.init_std
    if is_embedding_or_output(key):
        return std
    std /= math.sqrt(width_mult(config))
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        depth = config.mup.base_depth if depth_mult(config) != 1.0 else config.model.num_layers
        std /= math.sqrt(2.0 * depth)
    return std


def scaled_bias_dropout_add(multiplier: float):
    """A bias-dropout-add spec entry that scales the block output before it joins the residual."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    def bias_dropout_add(training, fused):
        inner = get_bias_dropout_add(training, fused)

        def scaled(x_with_bias, residual, prob):
            x, bias = x_with_bias
            return inner((x * multiplier, None if bias is None else bias * multiplier), residual, prob)

        return scaled

    return bias_dropout_add


def apply_to_layer_spec(spec, config):
    """Residual multiplier on every attention and MLP output of a TransformerLayer spec."""
    if residual_mult(config) != 1.0:
        spec.submodules.self_attn_bda = scaled_bias_dropout_add(residual_mult(config))
        spec.submodules.mlp_bda = scaled_bias_dropout_add(residual_mult(config))
    return spec


def native_fields(config) -> dict:
    """TransformerConfig's own muP fields: embedding multiplier, attention 1/d_head, logits x
    1/m_width. The output multiplier is given, so that Megatron does not derive it again from
    hidden_size / mup_base_hidden_size (recipes may give m_width itself)."""
    if not config.mup.enabled:
        return {}
    m_width = width_mult(config)
    return dict(use_mup=True, mup_base_hidden_size=config.model.hidden_size / m_width,
                mup_embedding_mult=emb_mult(config), mup_output_mult=1.0 / m_width)


def _is_hidden_matrix(param) -> bool:
    return param.dim() >= 2 and not getattr(param, "is_embedding_or_output_parameter", False)


def _is_block_vector(param, name: str) -> bool:
    return param.dim() == 1 and ".layers." in name  # norm gains inside the blocks, not the final norm


def optimizer_overrides(config, optimizer_config) -> Dict:
    """Megatron's standard groups (no weight decay on norms and biases) plus, with muP, hidden
    matrices (attention, MLP, experts, router) at lr / m_width; with depth scaling, also their
    lr and Adam epsilon and the block norms' lr by the depth rules."""
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamPredicate, ParamWithNamePredicate

    overrides = get_standard_config_overrides(optimizer_config)
    m_width, m_depth = width_mult(config), depth_mult(config)
    hidden = {}
    if m_width != 1.0 or m_depth != 1.0:
        # As lr_mult (Megatron's own convention), not max_lr: Megatron tells groups apart on
        # checkpoint load by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr).
        hidden["lr_mult"] = depth_lr_mult(config) / m_width
    if m_depth != 1.0:
        hidden["eps"] = config.optim.eps * m_depth ** -config.mup.depth_alpha
        block_vectors = ParamKey(with_name_predicate=ParamWithNamePredicate(name="depth_block_vector",
                                                                            fn=_is_block_vector))
        overrides[block_vectors] = {"lr_mult": depth_lr_mult(config)}
    if hidden:
        overrides[ParamKey(predicate=ParamPredicate(name="mup_hidden_matrix", fn=_is_hidden_matrix))] = hidden
    return overrides


def group_base_lrs(config) -> Dict[str, float]:
    """Each kind of parameter's own base (peak) lr; the schedule's shape multiplies it."""
    lr = config.schedule.lr_max
    if depth_mult(config) != 1.0:
        return {"embeddings, final norm": lr, "block norms": lr * depth_lr_mult(config),
                "hidden matrices": lr * depth_lr_mult(config) / width_mult(config)}
    if width_mult(config) == 1.0:
        return {"all parameters": lr}
    return {"embeddings+norms": lr, "hidden matrices": lr / width_mult(config)}
