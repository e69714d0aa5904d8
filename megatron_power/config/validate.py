"""Every problem with a config, one line each. Each section's owner checks its own values (the
schedule, the data files, the checkpoint to start from); the data and checkpoint checks import
Megatron, so they are imported only when a config names paths to check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

from megatron_power.config.schema import NAME_PATTERN, Config, DataConfig, parse_blend, parse_steps, world_size_from_env
from megatron_power.errors import ConfigError
from megatron_power.training import batch_schedule, merge, schedule
from megatron_power.writable import unwritable


def validate(c: Config, world_size: Optional[int] = None, check_paths: bool = True) -> List[str]:
    """Every problem with a config, one line each; empty when the config is usable."""
    errors = []
    m, p, t = c.model, c.parallel, c.train
    world_size = world_size or world_size_from_env()

    def need(ok: bool, message: str):
        if not ok:
            errors.append(message)

    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length"):
        need(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    for name in ("tp", "pp", "ep"):
        need(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    for name in ("global_batch_size", "micro_batch_size", "log_interval", "eval_interval", "eval_batches", "tokens"):
        need(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
    if errors:
        return errors

    # Values torch or Megatron would take and fail on later (at init, at the first step), or
    # train with to no purpose.
    for name in ("init_std", "norm_epsilon", "rotary_base"):
        need(0 < getattr(m, name) < math.inf, f"model.{name} must be positive, got {getattr(m, name)}")
    o = c.optim
    for name in ("beta1", "beta2"):
        need(0 <= getattr(o, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    need(0 < o.eps < math.inf, f"optim.eps must be positive, got {o.eps}")
    need(0 <= o.weight_decay < math.inf, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")

    groups = m.num_query_groups or m.num_attention_heads
    need(m.hidden_size % m.num_attention_heads == 0,
         f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads})")
    need(m.num_attention_heads % groups == 0,
         f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by model.num_query_groups ({groups})")
    need(m.num_attention_heads % p.tp == 0,
         f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by parallel.tp ({p.tp})")
    need(groups % p.tp == 0, f"model.num_query_groups ({groups}) must be divisible by parallel.tp ({p.tp})")
    need(m.ffn_hidden_size % p.tp == 0,
         f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by parallel.tp ({p.tp})")
    need(m.num_layers % p.pp == 0, f"model.num_layers ({m.num_layers}) must be divisible by parallel.pp ({p.pp})")

    if m.num_experts is None:
        need(p.ep == 1, f"parallel.ep ({p.ep}) needs a MoE model (model.num_experts)")
    else:
        need(m.num_experts >= 1 and m.num_experts % p.ep == 0,
             f"model.num_experts ({m.num_experts}) must be divisible by parallel.ep ({p.ep})")
        need(1 <= m.moe_topk <= m.num_experts,
             f"model.moe_topk ({m.moe_topk}) must be between 1 and model.num_experts ({m.num_experts})")
        need(m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size > 0 and m.moe_ffn_hidden_size % p.tp == 0,
             f"model.moe_ffn_hidden_size ({m.moe_ffn_hidden_size}) must be set, positive and divisible by "
             f"parallel.tp ({p.tp})")
        need(0 <= m.moe_aux_loss_coeff < math.inf,
             f"model.moe_aux_loss_coeff must be >= 0, got {m.moe_aux_loss_coeff}")
        need(p.tp == 1 or p.sequence_parallel,
             "MoE with parallel.tp > 1 needs parallel.sequence_parallel=true (Megatron-Core requires it)")
    need(not p.sequence_parallel or m.seq_length % p.tp == 0,
         f"model.seq_length ({m.seq_length}) must be divisible by parallel.tp ({p.tp}) for sequence parallelism")
    model_parallel = p.tp * p.pp
    if world_size % model_parallel:
        errors.append(f"world size {world_size} must be a multiple of parallel.tp x parallel.pp "
                      f"({p.tp} x {p.pp} = {model_parallel})")
    elif world_size % (model_parallel * p.ep):
        errors.append(f"world size {world_size} must be a multiple of parallel.tp x parallel.ep x parallel.pp "
                      f"({p.tp} x {p.ep} x {p.pp} = {model_parallel * p.ep})")
    else:
        dp = world_size // model_parallel
        need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
             f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})")
        need(t.noise_scale_interval == 0 or t.global_batch_size >= (p.pp + 1) * t.micro_batch_size * dp,
             f"train.noise_scale_interval needs at least parallel.pp + 1 = {p.pp + 1} micro-batches per "
             f"data-parallel rank (it reads the first one's gradient before the last has run); got "
             f"train.global_batch_size {t.global_batch_size} = {t.micro_batch_size} x {dp} ranks x "
             f"{t.global_batch_size // max(t.micro_batch_size * dp, 1)}")
        probe_minimum = (p.pp + 1) * t.micro_batch_size * dp if t.noise_scale_interval else 0
        errors += batch_schedule.validate(t, m.seq_length, t.micro_batch_size * dp, probe_minimum)
    need(c.train_steps >= 1, f"train.tokens ({t.tokens}) is less than one step "
         f"(global_batch_size x seq_length = {c.tokens_per_step} tokens)")
    need(c.checkpoint.interval > 0, f"checkpoint.interval must be positive, got {c.checkpoint.interval}")
    need(c.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {c.checkpoint.keep}")
    need(t.stage in (1, 2), f"train.stage must be 1 or 2, got {t.stage}")
    if t.stage == 2:
        need(c.checkpoint.init_from is not None,
             "train.stage 2 needs checkpoint.init_from (the stage-1 checkpoint to continue from)")
        need(c.schedule.decay > 0, "train.stage 2 needs schedule.decay (the tokens over which it decays)")
    if c.checkpoint.init_from is not None and check_paths:
        from megatron_power.errors import CheckpointError
        from megatron_power.training.checkpoint import resolve

        try:
            resolve(Path(c.checkpoint.init_from))
        except CheckpointError as e:
            errors.append(f"checkpoint.init_from: {e}")
    need(t.noise_scale_interval >= 0, f"train.noise_scale_interval must be >= 0, got {t.noise_scale_interval}")
    need(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    try:
        skipped = parse_steps(t.skip_steps)
    except ValueError as e:
        errors.append(f"train.skip_steps: {e}")
        skipped = []
    pf = c.profile
    need(pf.start_step >= 0 and pf.steps >= 1,
         f"profile.start_step must be >= 0 (0: off) and profile.steps >= 1, got {pf.start_step} and {pf.steps}")
    # The profiler times trained steps, and counts the host synchronisations of the one after them.
    profiled = range(pf.start_step, pf.start_step + pf.steps + 1) if pf.start_step > 0 else range(0)
    need(not any(step in steps for step in profiled for steps in skipped),
         f"profile.start_step {pf.start_step} with profile.steps {pf.steps} profiles steps {profiled.start}-"
         f"{profiled.stop - 1} (the last counts host synchronisations), which train.skip_steps "
         f"({t.skip_steps}) passes over: profile steps that train")
    need(all(0 <= r < world_size for r in pf.ranks),
         f"profile.ranks {list(pf.ranks)} must be ranks of this run (0 to {world_size - 1})")
    mg = c.checkpoint.merge
    if mg.interval:
        need(mg.interval > 0 and mg.interval % c.checkpoint.interval == 0,
             f"checkpoint.merge.interval ({mg.interval}) must be a multiple of checkpoint.interval "
             f"({c.checkpoint.interval}): it merges saved checkpoints")
        need(2 <= mg.last <= c.checkpoint.keep, f"checkpoint.merge.last ({mg.last}) must be at least 2 and at "
             f"most checkpoint.keep ({c.checkpoint.keep}), the checkpoints kept to merge")
        need(c.checkpoint.save, "checkpoint.merge needs checkpoint.save (it merges saved checkpoints)")
        try:
            merge.coefficients(mg.weights, mg.last)
        except ConfigError as e:
            errors.append(f"checkpoint.merge.weights: {e}")
    wb = c.logging.wandb
    need(wb.mode in ("online", "offline"), f"logging.wandb.mode must be online or offline, got '{wb.mode}'")
    if wb.project is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            errors.append("logging.wandb.project is set but wandb is not installed: pip install 'megatron-power[wandb]'")
    need(bool(NAME_PATTERN.fullmatch(c.name)),
         f"name '{c.name}' must be letters, digits, '.', '_' or '-' (it names the run directory)")

    if c.mup.depth_alpha:
        need(c.mup.enabled, "mup.depth_alpha needs mup.enabled (depth scaling composes with width muP)")
        need(0 < c.mup.depth_alpha <= 1, f"mup.depth_alpha must be in (0, 1] (0.5: depth-muP, 1: CompleteP), "
             f"got {c.mup.depth_alpha}")
        need(c.mup.base_depth is not None and c.mup.base_depth >= 1,
             f"mup.depth_alpha needs mup.base_depth (the depth the hyperparameters were tuned at), got "
             f"{c.mup.base_depth}")
    if c.mup.enabled:
        given = [f for f in ("base_width", "width_mult") if getattr(c.mup, f) is not None]
        need(len(given) == 1, f"mup.enabled needs exactly one of mup.base_width and mup.width_mult, got "
             f"{' and '.join(given) or 'neither'}")
        for name in ("base_width", "width_mult", "emb_mult", "residual_mult"):
            value = getattr(c.mup, name)
            need(value is None or value > 0, f"mup.{name} must be positive, got {value}")
    pr = c.precision
    need(pr.fp8 in (None, "hybrid", "e4m3"), f"precision.fp8 '{pr.fp8}' is unknown; expected null, hybrid or e4m3")
    need(pr.fp8_recipe in ("tensorwise", "delayed", "blockwise", "mxfp8"),
         f"precision.fp8_recipe '{pr.fp8_recipe}' is unknown; expected tensorwise, delayed, blockwise or mxfp8")
    need(pr.fp8_experts in (None, "bf16", "tensorwise", "blockwise", "mxfp8"),
         f"precision.fp8_experts '{pr.fp8_experts}' is unknown; expected null, bf16, tensorwise, blockwise or mxfp8 "
         f"(Megatron-Core's per-module recipes take no delayed scaling)")
    need(pr.fp8_experts is None or m.num_experts,
         f"precision.fp8_experts={pr.fp8_experts} sets the MoE experts' precision, and model.num_experts is not set; "
         f"expected precision.fp8_experts null for a dense model")
    need(pr.recompute in ("none", "selective", "full"),
         f"precision.recompute '{pr.recompute}' is unknown; expected none, selective or full")
    need(not (pr.cuda_graphs and pr.recompute == "full"),
         "precision.cuda_graphs=true cannot replay a fully recomputed layer; expected precision.recompute "
         "none or selective with it")
    need(pr.cuda_graph_warmup_steps >= 1,
         f"precision.cuda_graph_warmup_steps must be >= 1 (eager steps before the capture), got "
         f"{pr.cuda_graph_warmup_steps}")
    # Under a pipeline schedule each micro-batch in flight has graphs of its own, as many as the
    # capture's step had; a batch that changes their number would replay them out of that order.
    need(not (pr.cuda_graphs and p.pp > 1 and t.batch_schedule is not None),
         "precision.cuda_graphs=true with parallel.pp > 1 needs a fixed batch (the graphs are captured for "
         "one number of micro-batches); expected train.batch_schedule null, or parallel.pp 1")
    errors += schedule.validate(c.schedule, t.tokens)
    if check_paths:
        errors += _validate_data(c.data, m.vocab_size)
        problem = unwritable(c.run_dir)
        need(problem is None, f"out_dir: cannot create the run folder {c.run_dir}: {problem}")
        for setting, folder in (("checkpoint.dir", c.checkpoint.dir), ("data.cache_dir", c.data.cache_dir)):
            problem = folder and unwritable(Path(folder))
            need(not problem, f"{setting}: cannot write to {folder}: {problem}")
    return errors


def _validate_data(d: DataConfig, model_vocab: Optional[int]) -> List[str]:
    """The tokenizer is a sentencepiece model; each dataset's index is whole, its .bin as long as
    the index says, and its token ids inside the model's vocabulary."""
    from megatron_power.training.data import TokenizerInfo, indexed_dataset_problem

    errors = []
    vocab = None
    if not Path(d.tokenizer).is_file():
        errors.append(f"data.tokenizer: {d.tokenizer} not found (expected a sentencepiece .model file)")
    else:
        try:
            vocab = max(TokenizerInfo.from_sentencepiece(d.tokenizer).vocab_size, model_vocab or 0)
        except ValueError as e:
            errors.append(f"data.tokenizer: {e}")
    for name in ("train", "valid"):
        try:
            prefixes, _ = parse_blend(getattr(d, name), f"data.{name}")
        except ConfigError as e:
            errors.append(str(e))
            continue
        for prefix in prefixes:
            missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
            if missing:
                errors.append(f"data.{name}: {prefix}{'/'.join(missing)} not found (expected an indexed "
                              f"dataset prefix with .bin and .idx; `make data` builds the default one)")
            elif vocab is not None:
                problem = indexed_dataset_problem(prefix, vocab)
                if problem:
                    errors.append(f"data.{name}: {problem}")
    return errors
