"""The training loop: build, resume, then step / log / evaluate / checkpoint until the budget."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_power import checkpoint, hardware, mup, plan, run_lock, runtime
from megatron_power.config import (
    FINISHED,
    Config,
    ConfigError,
    from_yaml,
    model_differences,
    model_vocab_size,
    parse_blend,
    to_yaml,
    world_size_from_env,
)
from megatron_power.continued_dataset import reordered, samples_read
from megatron_power.data import TokenizerInfo, build_datasets, micro_batches
from megatron_power.expert_load import ExpertLoad
from megatron_power.metrics import MetricsLogger
from megatron_power.model import build_model
from megatron_power.noise import FirstMicrobatchProbe, NoiseScaleAverage
from megatron_power.scheduler import TokenScheduler, phase_tokens, power_law_note
from megatron_power.signals import StopRequest


class NonFiniteError(RuntimeError):
    pass


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    noise_scale: dict = field(default_factory=lambda: asdict(NoiseScaleAverage()))
    # Training samples of each dataset that earlier stages read (continued_dataset.samples_read).
    samples_read_before: dict = field(default_factory=dict)


def build_optimizer(config: Config, model):
    hw = hardware.detect()
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=config.schedule.lr_max,
        min_lr=config.schedule.min_lr,
        weight_decay=config.optim.weight_decay,
        adam_beta1=config.optim.beta1,
        adam_beta2=config.optim.beta2,
        adam_eps=config.optim.eps,
        clip_grad=config.train.clip_grad,
        bf16=hw.bf16,
        params_dtype=hw.dtype,
        use_distributed_optimizer=config.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(optimizer_config, [model],
                                  config_overrides=mup.optimizer_overrides(config, optimizer_config))


def wrap_model(config: Config, model):
    """Megatron's DDP (and, for bf16, its Float16Module) around the GPTModel."""
    tconfig = model.config
    if tconfig.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=config.parallel.distributed_optimizer,
    )
    ddp = DistributedDataParallel(tconfig, ddp_config, model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    return ddp


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    per_token_loss = model(
        batch["tokens"].to(device), batch["position_ids"].to(device), None,
        labels=batch["labels"].to(device),
    )
    return per_token_loss, partial(_masked_mean, batch["loss_mask"].to(device))


def run_microbatches(config: Config, model, batches, forward_only: bool, step_func=forward_step):
    """One global batch through Megatron's schedule for this layout; the last stage gets the losses."""
    return get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=config.model.seq_length,
        micro_batch_size=config.train.micro_batch_size, forward_only=forward_only)


def _masked_mean(loss_mask, per_token_loss):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.float().view(-1) * mask) / mask.sum()
    # A copy: the schedule divides the returned loss by the number of micro-batches in place.
    return loss, {"lm loss": loss.detach().clone()}


def _global_mean_loss(losses, rt: runtime.Runtime, stop: bool = False):
    """The loss averaged over micro-batches and data-parallel ranks, known to every rank.

    One all-reduce also carries the stop request, so that every rank stops at the same step.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    if rt.is_last_stage and ps.get_tensor_model_parallel_rank() == 0 and losses:
        totals[0] = sum(float(x["lm loss"]) for x in losses) / len(losses)
        totals[1] = 1.0
    totals[2] = float(stop)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]), bool(totals[2] > 0)


def _update(optimizer, clip_grad: float, probe: FirstMicrobatchProbe = None) -> float:
    """Megatron's ChainedOptimizer.step(), with one addition: a non-finite grad norm (or a
    mixed-precision overflow) skips the update. Returns the grad norm."""
    if optimizer.prepare_grads():
        return math.inf
    if probe is not None:
        probe.read_global_batch(optimizer)
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return grad_norm
    if clip_grad > 0:
        for chained in optimizer.chained_optimizers:
            params = chained.get_parameters()
            if params and not getattr(chained, "is_stub_optimizer", False):
                megatron_optimizer.clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    return grad_norm


def _track_router(config: Config, step: int, num_microbatches: int, writer, expert_load: ExpertLoad) -> None:
    """The load-balancing loss of each MoE layer (Megatron's own tracker, reduced over the
    pipeline) and each expert's load to TensorBoard; every rank takes part, the logging rank writes."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, track_moe_metrics

    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=step, writer=writer,
                      per_layer_logging=True, force_initialize=True,
                      track_names=["load_balancing_loss"], num_layers=config.model.num_layers)
    clear_aux_losses_tracker()
    expert_load.write(writer, step)


def _track_noise_scale(state: TrainState, probe: FirstMicrobatchProbe, log: MetricsLogger) -> None:
    grad_sq, trace = probe.estimates()
    average = NoiseScaleAverage(**state.noise_scale)
    average.update(grad_sq, trace, NOISE_SCALE_DECAY)
    state.noise_scale = asdict(average)
    log.noise_scale(state.step, state.consumed_tokens, grad_sq, trace, average.b_simple)


NOISE_SCALE_DECAY = 0.9  # per measurement; the estimate averages roughly the last ten


def evaluate(config: Config, model, dataset, rt: runtime.Runtime) -> float:
    model.eval()
    t = config.train
    losses = []
    with torch.no_grad():
        for k in range(t.eval_batches):
            batches = micro_batches(dataset, k * t.global_batch_size, t.global_batch_size,
                                    t.micro_batch_size, rt.dp, rt.dp_rank)
            losses.append(_global_mean_loss(run_microbatches(config, model, batches, True), rt)[0])
    model.train()
    return sum(losses) / len(losses)


def _restore(config: Config, model, optimizer, vocab_size: int):
    """Resume this run from its newest intact checkpoint; else start from checkpoint.init_from
    (stage 2: a stage-1 run, with its optimizer and tokens seen; stage 1: weights only); else
    fresh. Returns the state and the lines to log."""
    own, notes = checkpoint.newest(config.checkpoint_dir)
    if own is not None:
        _check_same_model(f"{own} (this run's checkpoint)", from_yaml(checkpoint.saved_state(own)["config"]),
                          config, vocab_size)
        state = TrainState(**checkpoint.load(own, model, optimizer)["train_state"])
        return state, notes + [f"resumed from {own} at step {state.step} ({state.consumed_tokens:,} tokens)"]
    if config.checkpoint.init_from is None:
        steps = config.train.tokens // config.tokens_per_step
        return TrainState(), [f"starting {config.name}: {steps} steps of {config.tokens_per_step:,} tokens"]
    source = checkpoint.resolve(Path(config.checkpoint.init_from))
    saved = checkpoint.saved_state(source)
    _check_same_model(f"checkpoint.init_from {source}", from_yaml(saved["config"]), config, vocab_size)
    if config.train.stage == 1:
        checkpoint.load(source, model, None)
        optimizer.reload_model_params()  # the optimizer's main copies of the weights
        return TrainState(), [f"starting {config.name} from the weights of {source}"]
    if "train_state" not in saved:
        raise checkpoint.CheckpointError(
            f"{source} holds weights only (no training progress); stage 2 needs a stage-1 training "
            f"checkpoint (use train.stage=1 to start from these weights)")
    state = TrainState(**checkpoint.load(source, model, optimizer)["train_state"])
    stage1 = from_yaml(saved["config"])
    state.samples_read_before = samples_read(parse_blend(stage1.data.train, "data.train"), state.consumed_samples,
                                             state.samples_read_before)
    state.consumed_samples = 0  # of stage 2's own blend, whose stage-1 datasets start past stage 1's samples
    decay_start = config.train.tokens - phase_tokens(config.schedule.decay, config.train.tokens)
    note = ("" if decay_start == state.consumed_tokens else
            f"; note: its decay starts at {decay_start:,} tokens, not where stage 1 ended")
    return state, [f"stage 2 from {source}: {state.consumed_tokens:,} tokens seen in stage 1, "
                   f"{config.train.tokens - state.consumed_tokens:,} to go{note}"]


def _check_same_model(source: str, saved: Config, config: Config, vocab_size: int) -> None:
    saved_vocab = saved.model.vocab_size
    problems = model_differences(config, saved)
    if saved_vocab is not None and saved_vocab != vocab_size:
        problems.append(f"vocabulary: expected {vocab_size}, found {saved_vocab}")
    if problems:
        raise checkpoint.CheckpointError(f"{source} holds a different model than this recipe: " + "; ".join(problems))


def train(config: Config, stop: StopRequest = None) -> TrainState:
    stop = stop or StopRequest()
    tokenizer = TokenizerInfo.from_sentencepiece(config.data.tokenizer)
    vocab_size = model_vocab_size(config, tokenizer.vocab_size)
    refusal = plan.training_refusal(config, vocab_size, hardware.detect(), world_size_from_env())
    if refusal:
        raise ConfigError(refusal)
    rt = runtime.initialize(config)
    run_lock.hold(config.run_dir, rt)
    gpt_model = build_model(config, vocab_size)
    model = wrap_model(config, gpt_model)
    m = config.model
    expert_load = ExpertLoad(gpt_model, m.num_layers, m.num_experts, rt.device) if m.num_experts else None
    optimizer = build_optimizer(config, model)
    t = config.train
    probe = None
    if t.noise_scale_interval:
        probe = FirstMicrobatchProbe(model, t.micro_batch_size, t.global_batch_size,
                                     t.global_batch_size // (t.micro_batch_size * rt.dp), config.parallel.ep, rt.device)
    scheduler = TokenScheduler(optimizer, config.schedule, t.tokens, config.optim.weight_decay)

    ckpt_dir = config.checkpoint_dir
    state, messages = _restore(config, model, optimizer, vocab_size)
    train_data, valid_data = build_datasets(config, tokenizer, state.samples_read_before)
    messages += [f"note: {prefix} spans more than one epoch, so this stage reads it in a new order, not "
                 f"past the samples earlier stages read" for prefix in reordered(train_data)]
    final_step = state.step + (t.tokens - state.consumed_tokens) // config.tokens_per_step
    log = MetricsLogger(config, rt, optimizer, start_step=state.step, final_step=final_step)
    for message in messages:
        log.info(message)
    log.info(f"hardware: {rt.hardware.describe()}")
    note = power_law_note(config.schedule, t.tokens, config.tokens_per_step)
    if note:
        log.info(note)
    if config.precision.fp8 and rt.hardware.cuda and not rt.hardware.transformer_engine:
        log.info(f"precision.fp8={config.precision.fp8} is ignored: Transformer Engine is not usable, so this "
                 f"run uses Megatron's local layer spec in bf16")
    if rt.rank == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "config.yaml").write_text(to_yaml(config))

    def save():
        if config.checkpoint.save:
            checkpoint.save(ckpt_dir, state.step, model, optimizer,
                            {"train_state": asdict(state), "config": to_yaml(config)}, config.checkpoint.keep)

    # The budget is in tokens, so a run resumed with another batch size ends where it should.
    while state.consumed_tokens + config.tokens_per_step <= t.tokens:
        lr = scheduler.step(state.consumed_tokens, config.tokens_per_step)
        batches = micro_batches(train_data, state.consumed_samples, t.global_batch_size,
                                t.micro_batch_size, rt.dp, rt.dp_rank)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        measure = probe is not None and (state.step + 1) % t.noise_scale_interval == 0
        losses = run_microbatches(config, model, batches, forward_only=False,
                                  step_func=probe.wrap(forward_step) if measure else forward_step)
        loss, stop_now = _global_mean_loss(losses, rt, stop.requested)
        grad_norm = _update(optimizer, t.clip_grad, probe if measure else None) if math.isfinite(loss) else math.nan

        state.step += 1
        state.consumed_samples += t.global_batch_size
        state.consumed_tokens += config.tokens_per_step
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            state.consecutive_nonfinite = 0
        else:
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
            log.info(f"step {state.step}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
                     f"({state.consecutive_nonfinite} in a row, {state.skipped_steps} in all)")
            if state.consecutive_nonfinite >= t.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or grad norm "
                    f"(last at step {state.step}); stopping. The last good checkpoint is "
                    f"{checkpoint.latest(ckpt_dir) or 'none (no checkpoint was saved yet)'}")
        log.step(state.step, state.consumed_tokens, loss, lr, grad_norm, state.skipped_steps)
        if measure and finite:
            _track_noise_scale(state, probe, log)
        if expert_load is not None:
            _track_router(config, state.step, len(batches), log.writer, expert_load)

        last = state.consumed_tokens + config.tokens_per_step > t.tokens
        if state.step % t.eval_interval == 0 or last:
            log.validation(state.step, state.consumed_tokens, evaluate(config, model, valid_data, rt))
        # A skipped step changed nothing worth saving; the last good checkpoint stays the latest.
        if (finite and (state.step % config.checkpoint.interval == 0 or last)) or stop_now:
            save()
        if stop_now and not last:
            saved = "checkpoint saved" if config.checkpoint.save else "nothing saved (checkpoint.save=false)"
            log.info(f"stop requested: {saved} at step {state.step}; exiting")
            break
    else:
        # Tells a SLURM job that stopped on a signal at the very end not to requeue itself.
        if rt.rank == 0:
            (config.run_dir / FINISHED).write_text(json.dumps({"step": state.step, "tokens": state.consumed_tokens}))
    saved_at = checkpoint.latest(ckpt_dir) if config.checkpoint.save else None
    log.info(f"run folder {config.run_dir}; " + (f"last checkpoint {saved_at}" if saved_at else "no checkpoint"))
    log.close()
    run_lock.release()
    runtime.shutdown()
    return state
