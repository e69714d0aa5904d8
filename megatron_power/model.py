"""GPTModel from a recipe: TransformerConfig, layer spec (TE or local), layout-independent init."""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_power import mup
from megatron_power.norm import RMSNorm

VOCAB_PAD_MULTIPLE = 128  # as Megatron-LM's --make-vocab-size-divisible-by


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def transformer_engine_available() -> bool:
    """TE only on machines with CUDA: importing it without a driver fails (see DESIGN.md)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(config) -> TransformerConfig:
    m, p = config.model, config.parallel
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        sequence_parallel=p.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        softmax_scale=mup.softmax_scale(config),
        bf16=cuda,
        params_dtype=torch.bfloat16 if cuda else torch.float32,
        pipeline_dtype=torch.bfloat16 if cuda else torch.float32,
        # Megatron's own init also marks tensor-parallel weights (grad-norm and checkpoint logic
        # rely on that); `initialize_weights` then redraws them identically for every layout.
        perform_initialization=True,
        use_cpu_initialization=not cuda,
        bias_activation_fusion=cuda,
        masked_softmax_fusion=cuda,
        apply_rope_fusion=False,
        persist_layer_norm=cuda,
        gradient_accumulation_fusion=False,
        transformer_impl="transformer_engine" if transformer_engine_available() else "local",
        **moe_fields(config),
        **precision_fields(config),
    )


def precision_fields(config) -> dict:
    pr = config.precision
    fields = {}
    if pr.recompute == "selective":
        fields.update(recompute_granularity="selective")
    elif pr.recompute == "full":
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    # FP8 needs Transformer Engine's layers; elsewhere the recipe runs in bf16 / fp32.
    if pr.fp8 and transformer_engine_available():
        fields.update(fp8=pr.fp8, fp8_recipe=pr.fp8_recipe, first_last_layers_bf16=pr.fp8_bf16_first_last)
    return fields


def moe_fields(config) -> dict:
    m = config.model
    if m.num_experts is None:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_pre_softmax=False,  # top-k on logits, softmax over the chosen k (GraniteMoe)
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall" if config.parallel.ep > 1 else "allgather",
        moe_grouped_gemm=transformer_engine_available(),
    )


def block_spec(tconfig: TransformerConfig, config) -> TransformerBlockSubmodules:
    """This pipeline stage's layers. The local spec gets our RMSNorm (Megatron's torch norm refuses
    sequence parallelism); the TE spec keeps TE's fused norms."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = config.model.num_experts
    if tconfig.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=tconfig.moe_grouped_gemm)
        final_norm = TENorm
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        if experts:
            # The TE spec's MoE layers save their own pre-MLP norm key; the same keys here let a
            # checkpoint move between CPU and GPU (and keep conversion to one table).
            spec.submodules.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        final_norm = RMSNorm
    spec = mup.apply_to_layer_spec(spec, config)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(tconfig),
                                      layer_norm=final_norm)


def build_model(config, vocab_size: int, initialize: bool = True) -> GPTModel:
    """This rank's GPTModel. `initialize=False` skips the weight draw (for the meta-device
    planner, which only counts)."""
    tconfig = transformer_config(config)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(tconfig, config),
        vocab_size=padded_vocab_size(vocab_size, config.parallel.tp),
        max_sequence_length=config.model.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=config.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=config.model.rotary_base,
    )
    if initialize:
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        initialize_weights(model, config)
    mup.attach_multipliers(model, config)
    return model


def sharded_tensors(model: GPTModel):
    """This rank's parameters as dist_checkpointing ShardedTensors (global key, shape, offset;
    `data` is a view of the parameter)."""
    for value in model.sharded_state_dict(prefix="").values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from built if isinstance(built, list) else built.values()
        elif isinstance(value, ShardedTensor):
            yield value


def local_part(sh: ShardedTensor, full: torch.Tensor, skip_axes: int = 0) -> torch.Tensor:
    """This rank's part of the global tensor `full`, or of the slice of it at `sh`'s index along
    the first `skip_axes` axes (one layer; one layer's expert)."""
    offsets = sh.global_offset[skip_axes:]
    extents = ((1,) * sh.prepend_axis_num + tuple(sh.local_shape))[skip_axes:]  # prepended axes: extent 1
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, extents))].reshape(sh.data.shape)


@torch.no_grad()
def initialize_weights(model: GPTModel, config) -> None:
    """Fill every parameter from a generator seeded by its global checkpoint key and its layer
    (and expert) index.

    Each rank draws the whole of its layer's (expert's) tensor and keeps its own shard, so TP,
    PP, EP and DP layouts start from the same model and their losses can be compared step by
    step. Drawing per layer and expert, not per stacked key, keeps the cost at one model's worth.
    """
    seed = config.train.seed
    for sh in sharded_tensors(model):
        std = mup.init_std(sh.key, config)
        if std == 0.0:
            sh.data.fill_(1.0)
            continue
        whole = sh.prepend_axis_num  # layer and expert axes, never split within an index
        index = ".".join(map(str, sh.global_offset[:whole]))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{sh.key}@{index}".encode()))
        full = torch.randn(sh.global_shape[whole:], generator=generator, dtype=torch.float32) * std
        sh.data.copy_(local_part(sh, full, skip_axes=whole))
