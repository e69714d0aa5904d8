"""The training loop: build, resume, then step / log / evaluate / checkpoint until the budget."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_power.config.schema import (
    FINISHED,
    Config,
    from_yaml,
    model_vocab_size,
    parse_blend,
    parse_steps,
    setting_changes,
    to_yaml,
    world_size_from_env,
)
from megatron_power.errors import CheckpointError, ConfigError, NonFiniteError
from megatron_power.ops import plan
from megatron_power.training import checkpoint, hardware, merge, run_lock, runtime
from megatron_power.training.batch_schedule import NOISE_SCALE, change_line, grown_batch, scheduled_batch, steps_left
from megatron_power.training.continued_dataset import reordered, samples_read
from megatron_power.training.cuda_graphs import LayerGraphs, graphed_modules
from megatron_power.training.data import TokenizerInfo, build_datasets, micro_batches
from megatron_power.training.metrics import MetricsLogger, StartupClock
from megatron_power.training.model import build_model, model_differences, precision_overrides
from megatron_power.training.optim import build_optimizer, wrap_model
from megatron_power.training.probes.expert_load import ExpertLoad
from megatron_power.training.probes.noise_scale import FirstMicrobatchProbe, NoiseScaleAverage
from megatron_power.training.probes.profile import StepProfiler
from megatron_power.training.schedule import TokenScheduler, decay_undone_warning, phase_tokens, power_law_note
from megatron_power.training.signals import StopRequest
from megatron_power.training.step import evaluate, train_step


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
    global_batch_size: int = 0  # of the next step (0: not yet decided)
    batch_changes: list = field(default_factory=list)  # {"step", "tokens", "batch"}: the first step at a new batch

    def advance(self, batch: int, seq_length: int) -> None:
        """Count a step of `batch` sequences, trained or passed over (train.skip_steps)."""
        self.step += 1
        self.consumed_samples += batch
        self.consumed_tokens += batch * seq_length


NOISE_SCALE_DECAY = 0.9  # per measurement; the estimate averages roughly the last ten


def _track_router(config: Config, step: int, num_microbatches: int, writer, expert_load: ExpertLoad) -> None:
    """The load-balancing loss of each MoE layer (Megatron's own tracker, reduced over the
    pipeline) and each expert's load to TensorBoard, over the `num_microbatches` since the last
    report; every rank takes part, the logging rank writes."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    get_moe_metrics_tracker().report(loss_scale=1.0 / num_microbatches, iteration=step, writer=writer,
                                     per_layer_logging=True, force_initialize=True,
                                     track_names=["load_balancing_loss"], num_layers=config.model.num_layers)
    expert_load.write(writer, step)


def _track_noise_scale(state: TrainState, probe: FirstMicrobatchProbe, log: MetricsLogger) -> float:
    """Adds this step's measurement to the running averages; returns the averaged B_simple."""
    grad_sq, trace = probe.estimates()
    average = NoiseScaleAverage(**state.noise_scale)
    average.update(grad_sq, trace, NOISE_SCALE_DECAY)
    state.noise_scale = asdict(average)
    log.noise_scale(state.step, state.consumed_tokens, grad_sq, trace, average.b_simple)
    return average.b_simple


def _next_batch(config: Config, state: TrainState, b_simple=None) -> int:
    """The global batch of the step after `state`: the token schedule's (or the fixed one), or,
    growing with the noise scale, the batch in force unless this step's measurement grows it."""
    t = config.train
    if t.batch_schedule != NOISE_SCALE:
        return scheduled_batch(t, config.model.seq_length, state.consumed_tokens)
    current = state.global_batch_size or t.global_batch_size
    if b_simple is None:
        return current
    last_change = state.batch_changes[-1]["tokens"] if state.batch_changes else 0
    return grown_batch(current, b_simple, state.consumed_tokens, last_change, t, config.model.seq_length)


def _batch_after(config: Config, state: TrainState, batch: int, log: MetricsLogger, b_simple=None) -> int:
    """The global batch of the next step, kept in `state` and logged where it changes."""
    state.global_batch_size = _next_batch(config, state, b_simple)
    if state.global_batch_size != batch:
        state.batch_changes.append({"step": state.step + 1, "tokens": state.consumed_tokens,
                                    "batch": state.global_batch_size})
        log.info(change_line(state.step + 1, state.consumed_tokens, batch, state.global_batch_size, b_simple))
        log.final_step = state.step + steps_left(config.train, config.model.seq_length, state.consumed_tokens,
                                                 state.global_batch_size)
    return state.global_batch_size


def _restore(config: Config, model, optimizer, vocab_size: int):
    """Resume this run from its newest intact checkpoint; else start from checkpoint.init_from
    (stage 2: a stage-1 run, with its optimizer and tokens seen; stage 1: weights only); else
    fresh. Returns the state and the lines to log."""
    own, notes = checkpoint.newest(config.checkpoint_dir)
    if own is not None:
        saved_yaml = checkpoint.saved_state(own)["config"]
        saved_config = from_yaml(saved_yaml)
        check_same_model(f"{own} (this run's checkpoint)", saved_config, config, vocab_size,
                         "to train this model, give it another name=; this run's checkpoints stay as they are")
        state = TrainState(**checkpoint.load(own, model, optimizer)["train_state"])
        notes.append(f"resumed from {own} at step {state.step} ({state.consumed_tokens:,} tokens)")
        # out_dir: the same folder, spelled relative here and absolute in a SLURM job's overrides.
        changes = setting_changes(saved_yaml, to_yaml(config), ignore=("out_dir",))
        if changes:  # a changed override may be meant (a longer run, a lower lr) or forgotten: say which
            notes.append(f"settings changed since the checkpoint of step {state.step}, this run uses the new ones: "
                         + "; ".join(changes))
            batch_tokens = (state.global_batch_size or config.train.global_batch_size) * config.model.seq_length
            warning = decay_undone_warning(saved_config, config, state.consumed_tokens, batch_tokens)
            notes += [warning] if warning else []
        return state, notes
    if config.checkpoint.init_from is None:
        t = config.train
        if t.batch_schedule is None:
            return TrainState(), [f"starting {config.name}: {config.train_steps} steps of {config.tokens_per_step:,} tokens"]
        growth = (f"growing with the noise scale up to {t.batch_growth.ceiling}" if t.batch_schedule == NOISE_SCALE
                  else f"{steps_left(t, config.model.seq_length, 0, t.global_batch_size)} steps")
        return TrainState(), [f"starting {config.name}: {t.tokens:,} tokens, batch {t.global_batch_size}, {growth}"]
    source = checkpoint.resolve(Path(config.checkpoint.init_from))
    saved = checkpoint.saved_state(source)
    source_config = from_yaml(saved["config"])
    check_same_model(f"checkpoint.init_from {source}", source_config, config, vocab_size)
    if config.train.stage == 1:
        checkpoint.load(source, model, None)
        optimizer.reload_model_params()  # the optimizer's main copies of the weights
        return TrainState(), [f"starting {config.name} from the weights of {source}"]
    if "train_state" not in saved:
        raise CheckpointError(
            f"{source} holds weights only (no training progress); stage 2 needs a stage-1 training "
            f"checkpoint (use train.stage=1 to start from these weights)")
    state = TrainState(**checkpoint.load(source, model, optimizer)["train_state"])
    state.samples_read_before = samples_read(parse_blend(source_config.data.train, "data.train"), state.consumed_samples,
                                             state.samples_read_before)
    state.consumed_samples = 0  # of stage 2's own blend, whose stage-1 datasets start past stage 1's samples
    decay_start = config.train.tokens - phase_tokens(config.schedule.decay, config.train.tokens)
    note = ("" if decay_start == state.consumed_tokens else
            f"; note: its decay starts at {decay_start:,} tokens, not where stage 1 ended")
    return state, [f"stage 2 from {source}: {state.consumed_tokens:,} tokens seen in stage 1, "
                   f"{config.train.tokens - state.consumed_tokens:,} to go{note}"]


def check_same_model(source: str, saved: Config, config: Config, vocab_size: int, remedy: str = "") -> None:
    saved_vocab = saved.model.vocab_size
    problems = model_differences(config, saved)
    if saved_vocab is not None and saved_vocab != vocab_size:
        problems.append(f"vocabulary: expected {vocab_size}, found {saved_vocab}")
    if problems:
        raise CheckpointError(f"{source} holds a different model than this recipe: " + "; ".join(problems)
                              + (f" ({remedy})" if remedy else ""))


def _evaluate_merged(config: Config, model, valid_data, rt, state: TrainState, log: MetricsLogger) -> None:
    """The validation loss of the newest checkpoint.merge.last checkpoints merged, once that many
    are saved (the run's own, not those of the stage it started from)."""
    mg = config.checkpoint.merge
    saved = checkpoint.complete(config.checkpoint_dir)
    if len(saved) < mg.last:
        log.info(f"step {state.step} | merged validation loss: {len(saved)} of the {mg.last} checkpoints saved")
        return
    paths = merge.last_checkpoints(config.checkpoint_dir, mg.last)
    loss = merge.evaluate_merged(model, paths, merge.coefficients(mg.weights, mg.last),
                                 lambda: evaluate(config, model, valid_data, rt))
    log.merged_validation(state.step, state.consumed_tokens, loss, f"last {mg.last}, {mg.weights}")


def train(config: Config, stop: StopRequest = None) -> TrainState:
    stop = stop or StopRequest()
    clock = StartupClock()
    clock.lap("imports and checks")
    tokenizer = TokenizerInfo.from_sentencepiece(config.data.tokenizer)
    vocab_size = model_vocab_size(config, tokenizer.vocab_size)
    refusal = plan.training_refusal(config, vocab_size, hardware.detect(), world_size_from_env())
    if refusal:
        raise ConfigError(refusal)
    rt = runtime.initialize(config)
    run_lock.hold(config.run_dir, rt)
    clock.lap("distributed")
    profiler = StepProfiler(config.profile, rt.rank, rt.hardware.cuda, config.run_dir)
    with profiler.watching():
        gpt_model = build_model(config, vocab_size)
    clock.lap("model and init")
    model = wrap_model(config, gpt_model)
    m = config.model
    expert_load = ExpertLoad(gpt_model, m.num_layers, m.num_experts, rt.device) if m.num_experts else None
    optimizer = build_optimizer(config, model)
    graphs = LayerGraphs(config, model, optimizer, rt.dp) if graphed_modules(config, rt.hardware) else None
    clock.lap("DDP and optimizer")
    t = config.train
    seq = config.model.seq_length
    scheduler = TokenScheduler(optimizer, config.schedule, t.tokens, config.optim.weight_decay)

    ckpt_dir = config.checkpoint_dir
    state, messages = _restore(config, model, optimizer, vocab_size)
    clock.lap("resume")
    train_data, valid_data = build_datasets(config, tokenizer, state.samples_read_before)
    clock.lap("data")
    messages += [f"note: {prefix} spans more than one epoch, so this stage reads it in a new order, not "
                 f"past the samples earlier stages read" for prefix in reordered(train_data)]
    state.global_batch_size = _next_batch(config, state)
    batch = state.global_batch_size
    final_step = state.step + steps_left(t, seq, state.consumed_tokens, batch)
    log = MetricsLogger(config, rt, optimizer, start_step=state.step, final_step=final_step,
                        start_tokens=state.consumed_tokens)
    for message in messages:
        log.info(message)
    log.info(f"hardware: {rt.hardware.describe()}")
    unpaired = hardware.unpaired_te_warning(rt.hardware.te_version)  # te_version is empty without TE
    if unpaired:
        log.info(unpaired)
    log.startup(clock)
    note = power_law_note(config.schedule, t.tokens, config.tokens_per_step)
    if note:
        log.info(note)
    if config.precision.fp8 and rt.hardware.cuda and not rt.hardware.transformer_engine:
        log.info(f"precision.fp8={config.precision.fp8} is ignored: Transformer Engine is not usable, so this "
                 f"run uses Megatron's local layer spec in bf16")
    overridden = precision_overrides(gpt_model)
    if overridden:
        pr = config.precision
        log.info(f"precision.fp8_experts={pr.fp8_experts}: the experts' {overridden} GEMM modules run in "
                 f"{pr.fp8_experts}, the rest of the FP8 layers in {pr.fp8_recipe} scaling")
    if rt.rank == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "config.yaml").write_text(to_yaml(config))
    routed_microbatches = 0  # since the router statistics were last reported

    def save():
        if config.checkpoint.save:
            checkpoint.save(ckpt_dir, state.step, model, optimizer,
                            {"train_state": asdict(state), "config": to_yaml(config)}, config.checkpoint.keep)

    if state.consumed_tokens + batch * seq > t.tokens:  # a finished run started again, or a smaller budget
        log.info(f"nothing to train: {config.name} has seen {state.consumed_tokens:,} tokens, and another step "
                 f"({batch * seq:,} tokens) would pass train.tokens ({t.tokens:,}); a larger train.tokens trains on")
    elif rt.rank == 0:
        # A finished run given a larger budget is unfinished until it reaches it: a SLURM job stopped
        # before then must requeue, and a sweep must not take it for done.
        (config.run_dir / FINISHED).unlink(missing_ok=True)
    skips = parse_steps(t.skip_steps)
    # The budget is in tokens, so a run resumed with another batch size ends where it should.
    while state.consumed_tokens + batch * seq <= t.tokens:
        passing = next((steps for steps in skips if state.step + 1 in steps), None)
        if passing is not None:
            if state.step + 1 == passing.start or state.step == log.start_step:
                first, last = state.step + 1, passing[-1]
                log.info(f"step{f's {first}-{last}' if last > first else f' {first}'}: data passed over "
                         f"(train.skip_steps), nothing trained")
            state.advance(batch, seq)
            batch = _batch_after(config, state, batch, log)
            if state.consumed_tokens + batch * seq > t.tokens:
                # Ended on passed-over steps: validated and saved at its last step, as any run, so
                # that the steps trained since the last checkpoint are kept.
                log.validation(state.step, state.consumed_tokens, evaluate(config, model, valid_data, rt))
                save()
            continue
        if graphs and graphs.before_step(batch):
            log.info(f"CUDA graphs of each layer's {', '.join(graphed_modules(config, rt.hardware))} captured "
                     f"before step {state.step + 1}; training steps from there replay them")
            if expert_load is not None:
                expert_load.restart()
                routed_microbatches = 0
        profiler.at(state.step + 1)
        lr = scheduler.step(state.consumed_tokens, batch * seq)
        batches = micro_batches(train_data, state.consumed_samples, batch, t.micro_batch_size, rt.dp, rt.dp_rank)
        probe = None
        if t.noise_scale_interval and (state.step + 1) % t.noise_scale_interval == 0:
            probe = FirstMicrobatchProbe(model, t.micro_batch_size, batch, len(batches), config.parallel.ep, rt.device)
        result = train_step(config, model, optimizer, batches, rt, stop.requested, probe)

        state.advance(batch, seq)
        if result.finite:
            state.consecutive_nonfinite = 0
        else:
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
            log.info(f"step {state.step}: non-finite loss {result.loss} / grad norm {result.grad_norm}; update "
                     f"skipped ({state.consecutive_nonfinite} in a row, {state.skipped_steps} in all)")
            if state.consecutive_nonfinite >= t.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or grad norm "
                    f"(last at step {state.step}); stopping. The last good checkpoint is "
                    f"{checkpoint.latest(ckpt_dir) or 'none (no checkpoint was saved yet)'}; `megatron-power "
                    f"rewind {config.run_dir}` lists earlier ones to go on from, with a lower schedule.lr_max say")
        log.step(state.step, state.consumed_tokens, result.loss, lr, result.grad_norm, state.skipped_steps, batch)
        b_simple = _track_noise_scale(state, probe, log) if probe and result.finite else None
        if expert_load is not None:
            routed_microbatches += len(batches)
            if log.reports(state.step) or result.stop:
                _track_router(config, state.step, routed_microbatches, log.writer, expert_load)
                routed_microbatches = 0
        # Decided before the checkpoint, which then holds the batch the next step uses.
        batch = _batch_after(config, state, batch, log, b_simple)

        last = state.consumed_tokens + batch * seq > t.tokens
        saving = (result.finite and (state.step % config.checkpoint.interval == 0 or last)) or result.stop
        merging = saving and config.checkpoint.merge.interval and state.step % config.checkpoint.merge.interval == 0
        if state.step % t.eval_interval == 0 or last or merging:
            log.validation(state.step, state.consumed_tokens, evaluate(config, model, valid_data, rt))
        # A skipped step changed nothing worth saving; the last good checkpoint stays the latest.
        if saving:
            save()
        if merging:
            _evaluate_merged(config, model, valid_data, rt, state, log)
        if result.stop and not last:
            saved = "checkpoint saved" if config.checkpoint.save else "nothing saved (checkpoint.save=false)"
            log.info(f"stop requested: {saved} at step {state.step}; exiting")
            break
    else:
        # Tells a SLURM job that stopped on a signal at the very end not to requeue itself.
        if rt.rank == 0:
            (config.run_dir / FINISHED).write_text(json.dumps({"step": state.step, "tokens": state.consumed_tokens}))
    profiler.close()
    if graphs:
        graphs.close()
    saved_at = checkpoint.latest(ckpt_dir) if config.checkpoint.save else None
    log.info(f"run folder {config.run_dir}; " + (f"last checkpoint {saved_at}" if saved_at else "no checkpoint"))
    log.close()
    run_lock.release()
    runtime.shutdown()
    return state
