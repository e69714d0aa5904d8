"""What a run reports: console lines, TensorBoard events (mirrored to Weights & Biases when the
recipe names a project) and metrics.jsonl under runs/<name>/."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import time

import psutil
import torch

from megatron_power.config.schema import format_count


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def group_names(optimizer) -> list:
    """Readable names for Megatron's parameter groups (for the lr of each in TensorBoard)."""
    names = []
    for i, group in enumerate(optimizer.param_groups):
        parts = ["expert" if group.get("is_expert_parallel") else "dense"]
        parts.append("no_wd" if group.get("wd_mult", 1.0) == 0 else "wd")
        if group.get("lr_mult", 1.0) != 1.0:
            parts.append(f"lr_x{group['lr_mult']:.3g}")
        names.append(f"{i}_" + "_".join(parts))
    return names


def _open_from(path, start_step: int):
    """metrics.jsonl for appending after `start_step`: rows a resumed run is about to redo (steps
    after its checkpoint) are dropped first, so that each step has one row."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return open(path, "a")


WANDB_RUN_ID = "wandb-run-id"


def _wandb_run(config):
    """The Weights & Biases run beside TensorBoard, or None. Started before the TensorBoard
    writer, wandb mirrors every event that writer writes (Megatron's router report included), each
    at its TensorBoard step as `global_step`: the two hold the same scalars by construction. Its id is
    kept in the run folder: a resumed run goes on in the same wandb run, a new run of the same name
    starts another."""
    wb = config.logging.wandb
    if wb.project is None:
        return None
    import wandb
    from omegaconf import OmegaConf

    id_file = config.run_dir / WANDB_RUN_ID
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(4))
    return wandb.init(project=wb.project, entity=wb.entity, mode=wb.mode, name=config.name,
                      id=id_file.read_text(), resume="allow", dir=str(config.run_dir), sync_tensorboard=True,
                      config=OmegaConf.to_container(OmegaConf.structured(config)))


class StartupClock:
    """Seconds of each part of a run's start-up, from the process's own start (so the imports
    count): where a 3B run's minute or more before its first step goes."""

    def __init__(self):
        self.last = psutil.Process().create_time()
        self.parts = {}

    def lap(self, part: str) -> None:
        now = time.time()
        self.parts[part] = round(now - self.last, 2)
        self.last = now


class MetricsLogger:
    """Only the logging rank (last pipeline stage) writes; other ranks keep quiet."""

    def __init__(self, config, rt, optimizer, start_step: int, final_step: int, start_tokens: int = 0):
        self.config, self.rt, self.optimizer = config, rt, optimizer
        self.active = rt.is_logger
        self.start_time = self.window_time = time.time()
        self.start_step = start_step
        self.start_tokens = self.window_tokens = start_tokens
        self.final_step = final_step
        self.names = group_names(optimizer)
        self.writer = None
        self.jsonl = None
        self.wandb_run = None
        if self.active:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = config.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = _wandb_run(config)
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.jsonl = _open_from(run_dir / "metrics.jsonl", start_step)

    def info(self, message: str) -> None:
        if self.active:
            print(message, flush=True)

    def _record(self, **row) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def startup(self, clock: StartupClock) -> None:
        if not self.active:
            return
        total = sum(clock.parts.values())
        print(f"start-up {total:.1f} s: " + ", ".join(f"{part} {s:.1f}" for part, s in clock.parts.items()), flush=True)
        self._record(step=self.start_step, startup_s=clock.parts)

    def reports(self, step: int) -> bool:
        """Whether `step` prints its line (and reports what is only summed up at the log interval):
        every train.log_interval steps, the first step of this run and the last. The same answer
        on every rank."""
        return step % self.config.train.log_interval == 0 or step in (self.start_step + 1, self.final_step)

    def step(self, step, tokens, loss, lr, grad_norm, skipped, batch) -> None:
        if not self.active:
            return
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/grad_norm", grad_norm, step)
        w.add_scalar("train/skipped_steps", skipped, step)
        w.add_scalar("train/tokens", tokens, step)
        w.add_scalar("train/global_batch_size", batch, step)
        w.add_scalar("batch-vs-tokens/global_batch_size", batch, tokens)
        for name, group in zip(self.names, self.optimizer.param_groups):
            w.add_scalar(f"lr/{name}", group["lr"], step)
            w.add_scalar(f"lr-vs-tokens/{name}", group["lr"], tokens)
        row = dict(step=step, tokens=tokens, batch=batch, loss=loss, lr=lr, grad_norm=grad_norm,
                   time=round(time.time() - self.start_time, 4))
        if self.rt.hardware.cuda:  # this rank's peak, to hold against the planner's estimate
            row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self._record(**row)

        if not self.reports(step):
            return
        now = time.time()
        tokens_per_s = (tokens - self.window_tokens) / max(now - self.window_time, 1e-9)
        w.add_scalar("throughput/tokens_per_s", tokens_per_s, step)
        # By tokens, which a growing batch keeps comparable from step to step.
        per_token = (now - self.start_time) / max(tokens - self.start_tokens, 1)
        print(f"step {step}/{self.final_step} | tokens {format_count(tokens, '.2f')} | loss {loss:.4f} | lr {lr:.3e} | "
              f"grad {grad_norm:.3f} | {format_count(tokens_per_s, '.2f')} tok/s | "
              f"elapsed {_duration(now - self.start_time)} | eta {_duration(per_token * (self.config.train.tokens - tokens))}",
              flush=True)
        self.window_time, self.window_tokens = now, tokens

    def validation(self, step, tokens, loss) -> None:
        if not self.active:
            return
        self.writer.add_scalar("valid/loss", loss, step)
        self._record(step=step, tokens=tokens, valid_loss=loss)
        print(f"step {step} | validation loss {loss:.4f}", flush=True)

    def merged_validation(self, step, tokens, loss, merged: str) -> None:
        if not self.active:
            return
        self.writer.add_scalar("valid/merged_loss", loss, step)
        self._record(step=step, tokens=tokens, valid_loss_merged=loss)
        print(f"step {step} | validation loss of the checkpoints merged ({merged}) {loss:.4f}", flush=True)

    def noise_scale(self, step, tokens, grad_sq, trace, b_simple) -> None:
        """This step's estimates of |G|^2 and tr(Sigma), and B_simple from their averages."""
        if not self.active:
            return
        w = self.writer
        w.add_scalar("noise_scale/b_simple", b_simple, step)
        w.add_scalar("noise_scale/b_simple_vs_tokens", b_simple, tokens)
        w.add_scalar("noise_scale/grad_sq", grad_sq, step)
        w.add_scalar("noise_scale/trace", trace, step)
        self._record(step=step, tokens=tokens, b_simple=b_simple, grad_sq=grad_sq, trace=trace)

    def close(self) -> None:
        if self.active:
            self.writer.close()
            self.jsonl.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
