"""Counts the calls in a training step that make the host wait for the GPU, by the Python line
that makes them.

A call that reads a GPU tensor's value on the host (`.item()`, `.tolist()`, `float(t)`, `if t:`),
copies it to the host (`.cpu()`), or whose output size depends on the values (`nonzero`,
`masked_select`, a boolean mask index, `repeat_interleave` without `output_size`) stalls the CPU
until the GPU has caught up, and the GPU then runs dry while the host queues the next kernels.
So does an explicit wait: `torch.cuda.synchronize()`, a stream's or an event's `synchronize()`
(Megatron's all-to-all dispatcher copies the tokens per expert on a side stream and waits on its
event). These are the same Python calls on a CPU run, so counting them there shows a new one
without a GPU (tests/test_moe.py holds a small MoE to a budget); on a GPU the profiler's
synchronise calls and device-to-host copies count the same stalls from the driver's side.

On a CPU run every tensor is on the host, so the counter follows which ones would be there on a
GPU too: those made by a factory without a device or with the literal "cpu" (`torch.zeros(n)`,
Megatron's host bookkeeping), copied with `.cpu()` or `.to("cpu", non_blocking=True)`, or computed
from such tensors only. Reading those is free and not counted, nor is what torch.optim does with
its step counts (host tensors unless `capturable`). Not counted either: a blocking `.to("cpu")`,
which a CPU run cannot tell from a copy to the compute device, and synchronising kernels inside
C++ operators; the GPU profile shows both.
"""

import collections
import os
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

_Tensor = torch.Tensor
# Read a value on the host, or produce an output whose size the host must learn first.
ALWAYS = {
    _Tensor.item, _Tensor.tolist, _Tensor.__bool__, _Tensor.__float__, _Tensor.__int__, _Tensor.__index__,
    _Tensor.cpu, _Tensor.nonzero, torch.nonzero, _Tensor.argwhere, torch.argwhere,
    _Tensor.masked_select, torch.masked_select, torch.unique, _Tensor.unique, torch.equal, _Tensor.equal,
}
_REPEAT_INTERLEAVE = {torch.repeat_interleave, _Tensor.repeat_interleave}
# Without a device argument these make host tensors, on a GPU run too.
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.linspace, torch.rand, torch.randn, torch.randint, torch.eye}
_TORCH = os.path.dirname(torch.__file__)
_OWN_FILES = (_TORCH, __file__)
_TORCH_OPTIM = os.path.join(_TORCH, "optim") + os.sep
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def synchronises(func, args, kwargs) -> bool:
    if func in ALWAYS:
        return True
    if func in _REPEAT_INTERLEAVE:
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
        return kwargs.get("output_size") is None and isinstance(repeats, torch.Tensor)
    if func is _Tensor.__getitem__:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _copied_to_host(func, args, kwargs) -> bool:
    """`.to("cpu", non_blocking=True)`: a copy to the host that the caller waits for elsewhere
    (on an event, counted there). A blocking one is not counted: see the module's docstring."""
    if func is not _Tensor.to or not kwargs.get("non_blocking", False):
        return False
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    return str(device).startswith("cpu")


def _call_site(call: str):
    """'file:line (function) call' for the innermost line outside torch and this file: where the
    synchronising call was made; None for a call from torch.optim."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_FILES):
        if frame.f_code.co_filename.startswith(_TORCH_OPTIM):
            return None
        frame = frame.f_back
    if frame is None:
        return f"? {call}"
    path = frame.f_code.co_filename
    marker = "site-packages" + os.sep
    path = path[path.rindex(marker) + len(marker):] if marker in path else os.path.relpath(path, _REPOSITORY)
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name}) {call}"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _host_factory(func, kwargs) -> bool:
    """A factory call without a device, or with the string "cpu": Megatron writes that for host
    bookkeeping (cpu_compat's stand-in for the GPU is a torch.device, so it is not mistaken)."""
    device = kwargs.get("device")
    return func in FACTORIES and (device is None or (isinstance(device, str) and device.startswith("cpu")))


class HostTensors(TorchFunctionMode):
    """Follows which tensors would be on the host on a GPU run, while it is entered. Entered
    around the model's construction, it knows the host tensors Megatron's modules keep."""

    def __init__(self, known: "HostTensors" = None):
        super().__init__()
        self._host = dict(known._host) if known else {}  # id -> weak reference

    def _on_host(self, tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _before(self, func, args, kwargs, from_host: bool) -> None:
        """Called before each call (HostSyncCounter counts here)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(_tensors((args, kwargs)))
        from_host = bool(inputs) and all(self._on_host(t) for t in inputs)
        self._before(func, args, kwargs, from_host)
        result = func(*args, **kwargs)
        if from_host or func is _Tensor.cpu or _copied_to_host(func, args, kwargs) or _host_factory(func, kwargs):
            for tensor in _tensors(result):
                self._host[id(tensor)] = weakref.ref(tensor)
        return result


class HostSyncCounter(HostTensors):
    """`with HostSyncCounter(known) as syncs: ...`; then `syncs.total` and `syncs.sites` (a Counter
    of 'file:line (function) call' -> calls). `known`: a HostTensors entered earlier."""

    def __init__(self, known: HostTensors = None):
        super().__init__(known)
        self.sites = collections.Counter()
        self._replaced = []

    def __enter__(self):
        # Compiled functions (Megatron's fusions) run as eager code while counting: otherwise
        # Dynamo traces this mode into them and recompiles at each call (new tensors fail its
        # guards) up to its limit, and the compilations' own synchronisations are counted.
        self._stance = torch.compiler.set_stance("force_eager")
        # Looked up now: on a CPU run cpu_compat has put its stand-ins in torch.cuda's place.
        owners = {id(owner): owner for owner in (torch.cuda.Stream, torch.cuda.Event)}
        for owner in [torch.cuda, *owners.values()]:
            original = owner.synchronize
            self._replaced.append((owner, original))
            owner.synchronize = self._counted(original, f"{getattr(owner, '__name__', owner)}.synchronize")
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, original in reversed(self._replaced):
            owner.synchronize = original
        self._replaced.clear()
        self._stance.__exit__(*exc)
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def _count(self, call: str) -> None:
        site = _call_site(call)
        if site is not None:
            self.sites[site] += 1

    def _counted(self, original, label: str):
        def wait(*args, **kwargs):
            self._count(label)
            return original(*args, **kwargs)
        return wait

    def _before(self, func, args, kwargs, from_host: bool) -> None:
        if not from_host and synchronises(func, args, kwargs):
            self._count(getattr(func, "__name__", str(func)))
