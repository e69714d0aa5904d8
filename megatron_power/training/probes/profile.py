"""`profile.start_step`: torch.profiler around a few training steps, then the host
synchronisations of the next step counted by their Python line.

Written under <run dir>/profile/ by each profiled rank:
  rank<r>.trace.json.gz   the Chrome trace (Perfetto, or TensorBoard's profiler plugin)
  rank<r>.json / .md      the summary (trace_summary.py) with the synchronising call sites

The counted step runs outside the profiler: the counter's Python hook slows the host, which would
show as device idle time in the profiled steps.

The profiler records operators and kernels but not Python frames (`with_stack`): on a GPU, two
steps of moe3b (32 layers, 4 micro-batches) did not finish exporting in 150 s, and a CPU run of
8 such layers gave 1.3M events, 60% of them Python frames (413 MB of JSON; 0.55M and 140 MB
without them). The kernels are placed by each module's forward instead, an annotation named by
its class (`TopKRouter`, `MoEAlltoAllTokenDispatcher`, `TEGroupedMLP`, ...), a few hundred per
micro-batch.
"""

from __future__ import annotations

import contextlib
import gzip
import json

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.profiler import ProfilerActivity, profile, record_function

from megatron_power.training.probes import trace_summary
from megatron_power.training.probes.host_syncs import HostSyncCounter, HostTensors


class StepProfiler:
    """`watching()` around the model's construction, `at(step)` at the top of each iteration of
    the training loop (every rank), `close()` after it: a profiled or counted step spans the whole
    iteration, logging and checkpointing included."""

    def __init__(self, settings, rank: int, cuda: bool, run_dir):
        self.first = settings.start_step
        self.last = settings.start_step + settings.steps - 1
        self.on = settings.start_step > 0 and rank in settings.ranks
        self.cuda = cuda
        self.out = run_dir / "profile"
        self.stem = f"rank{rank}"
        self.profiler = self.annotation = self.modules = self.counter = self.summary = None
        self.known = HostTensors() if self.on else None

    def watching(self):
        """Around the model's construction: which tensors Megatron's modules keep on the host."""
        return self.known if self.on else contextlib.nullcontext()

    def at(self, step: int) -> None:
        """Step `step` (1-based) is about to start: close what the step before opened, open what
        this one needs."""
        if not self.on:
            return
        self._finish(step - 1)
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.modules = ModuleAnnotations()
        if self.first <= step <= self.last:
            self.annotation = record_function(f"{trace_summary.STEP_PREFIX}{step}")
            self.annotation.__enter__()
        elif step == self.last + 1:
            self.counter = HostSyncCounter(self.known)
            self.counter.__enter__()

    def close(self) -> None:
        """After the loop: a run that ended inside the profiled steps still gets its summary."""
        if self.on:
            self._finish(self.last)

    def _finish(self, step: int) -> None:
        if self.annotation is not None:
            if self.cuda:
                torch.cuda.synchronize()  # the step's kernels inside its annotation
            self.annotation.__exit__(None, None, None)
            self.annotation = None
        if self.profiler is not None and step == self.last:
            self.modules.close()
            self.profiler.stop()
            self.out.mkdir(parents=True, exist_ok=True)
            raw = self.out / f"{self.stem}.trace.json"
            self.profiler.export_chrome_trace(str(raw))
            self.profiler = None
            text = raw.read_bytes()  # read once: summarised, then kept compressed
            self.summary = trace_summary.summarize(json.loads(text))
            raw.with_name(raw.name + ".gz").write_bytes(gzip.compress(text, compresslevel=1))
            raw.unlink()
            self._write(self.summary)  # again with the call sites after the counted step
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self._write(dict(self.summary, counted_step=self.last + 1,
                             host_sync_sites=dict(self.counter.sites.most_common())))
            self.counter = None

    def _write(self, summary: dict) -> None:
        (self.out / f"{self.stem}.json").write_text(json.dumps(summary, indent=1))
        title = f"steps {self.first}-{self.last} (rank {self.stem[4:]})"
        (self.out / f"{self.stem}.md").write_text(trace_summary.markdown(summary, title))


class ModuleAnnotations:
    """Every module's forward inside a profiler annotation named by its class, until close()."""

    def __init__(self):
        self.open = []
        self.hooks = [register_module_forward_pre_hook(self._enter), register_module_forward_hook(self._exit)]

    def _enter(self, module, args):
        annotation = record_function(type(module).__name__)
        annotation.__enter__()
        self.open.append(annotation)

    def _exit(self, module, args, output):
        if self.open:
            self.open.pop().__exit__(None, None, None)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        while self.open:  # a forward that raised inside the profiled steps
            self.open.pop().__exit__(None, None, None)
