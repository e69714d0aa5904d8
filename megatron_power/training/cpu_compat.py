"""The one place that lets Megatron-Core's training path run where CUDA, or TE and Apex, are absent.

Megatron-Core places bookkeeping tensors on "cuda", synchronises streams and forks CUDA RNG
states, and in places assumes Transformer Engine or Apex. None of that is model math.
`install(hw)` bridges each of those sites for what the machine `hw` lacks: the CPU bridges
without CUDA, the others without a usable Transformer Engine. Each bridge names the Megatron
behaviour it addresses (file:line relative to megatron/core in megatron-core 0.19.2).
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

_installed = False


def install(hw) -> None:
    """Install the bridges `hw` (a `hardware.Hardware`) needs, once per process."""
    global _installed
    if _installed:
        return
    if not hw.cuda:
        _cuda_runtime_queries()
        _cuda_literal_devices()
        _rng_tracker()
        _torch_optimizer()
        _grad_clipping()
        _distributed_optimizer_param_types()
        _moe_split_sizes()
        _uneven_sequence_parallel_collectives()
    if not hw.transformer_engine:
        _moe_router_gemm()
    _distributed_optimizer_state_on_load()
    _checkpoint_results_queue()
    _installed = True


_COMPUTE_DEVICE = torch.device("cpu")  # what stands in for the GPU


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: on CPU every operation is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: _NullStream()

    def query(self):
        return True

    def synchronize(self):
        """Named, not left to __getattr__, so that probes/host_syncs.py can count the calls."""


def _cuda_runtime_queries() -> None:
    # `device=torch.cuda.current_device()` appears at ~150 sites (layers, rotary embedding,
    # attention buffers, p2p receive buffers); on CPU the current device is the CPU. A
    # torch.device, not the string: where Megatron writes device="cpu" it means the host on a GPU
    # run too, and probes/host_syncs.py tells the two apart by that.
    torch.cuda.current_device = lambda: _COMPUTE_DEVICE
    # parallel_state.py, distributed_data_parallel.py, p2p_communication.py, dist_checkpointing:
    # synchronisation and caches of a device that does not exist.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    # param_and_grad_buffer.py (grad-sync stream), token_dispatcher.py and moe_utils.py
    # (record_stream / side streams), utils.py (timers use events).
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    # distrib_optimizer.py:1374 and language_module.py:307 move helper tensors with `.cuda()`.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _on_cpu(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        kwargs["device"] = _COMPUTE_DEVICE
    return kwargs


class _TorchOnCpu(types.ModuleType):
    """`torch` as one Megatron module sees it: factory calls asking for device="cuda" get the CPU.

    Only the modules listed below see it, so the rest of the program keeps the real `torch`.
    """

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "empty_like", "full", "arange")

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:
            real = getattr(torch, name)
            setattr(self, name, lambda *a, _real=real, **kw: _real(*a, **_on_cpu(kw)))

    def __getattr__(self, name):
        return getattr(torch, name)


# Modules that create bookkeeping tensors with a literal device="cuda" on the paths a CPU run takes.
# Others do only on paths it never takes: grad_scaler (fp16 loss scaling), param_and_grad_buffer
# (NCCL user-buffer warm-up), dist_checkpointing's exchange_utils and save-plan reuse check (the
# fully parallel and cached-plan strategies, which checkpoint.py does not use).
_LITERAL_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens counters
    "megatron.core.optimizer.optimizer",  # FP32Optimizer._scale, found_inf, overflow buffers
    "megatron.core.optimizer.clip_grads",  # grad-norm accumulators
    "megatron.core.transformer.utils",  # default causal masks
    "megatron.core.utils",  # grad-norm and misc reductions
)


def _cuda_literal_devices() -> None:
    on_cpu = _TorchOnCpu()
    for name in _LITERAL_CUDA_MODULES:
        importlib.import_module(name).torch = on_cpu


def _rng_tracker() -> None:
    """tensor_parallel/random.py keeps per-parallel-region RNG states as CUDA generator states and
    forks them around dropout and weight init; keep them as CPU generator states instead."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            self.seeds_.add(seed)
            generator = torch.Generator().manual_seed(seed)
            self.states_[name] = generator.get_state()
            self._is_initialized = True

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recomputation (CheckpointFunction) saves and restores the CPU state, the CUDA
    # state and the tracker's; on CPU the first and last are the whole story.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def _torch_optimizer() -> None:
    """optimizer/__init__.py, optimizer.py, clip_grads.py and distrib_optimizer.py pick Transformer
    Engine's (or Apex's) FusedAdam and multi-tensor kernels whenever TE imports, which it can with
    CUDA hidden; those allocate on "cuda". Without CUDA they are torch's AdamW and Megatron's own
    local multi-tensor functions, as on a machine without TE."""
    from megatron.core import optimizer as moptimizer_package
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as moptimizer

    moptimizer_package.Adam, moptimizer_package.SGD = torch.optim.AdamW, torch.optim.SGD
    moptimizer_package.USING_PYTORCH_OPTIMIZER = True
    distrib_optimizer.Adam = torch.optim.Adam
    distrib_optimizer.HAVE_APEX_OR_TE = False
    distrib_optimizer.USING_TE_OPTIMIZER = distrib_optimizer.USING_APEX_OPTIMIZER = False
    for module in (clip_grads, moptimizer):
        module.multi_tensor_applier = utils.local_multi_tensor_applier
        module.multi_tensor_scale_impl = utils.local_multi_tensor_scale
    clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
    # With TE's kernels (every GPU run) get_grad_norm_fp32 returns the norm as a tensor, without
    # a host read; without them, a float. The CPU takes the GPU's branch, so that what reads the
    # norm is tested on the type a GPU run gives it (its scaling kernel is plain torch either way).
    clip_grads.multi_tensor_scale_tensor_impl = utils.local_multi_tensor_scale


def _grad_clipping() -> None:
    """clip_grads.clip_grad_by_total_norm_fp32 asserts `grad.type() == 'torch.cuda.FloatTensor'`.
    The CPU version applies the same scaling (max_norm / (norm + 1e-6) when below 1)."""
    from megatron.core.optimizer import optimizer as moptimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _cuda_type_names():
    """While active, `tensor.type()` names CPU tensors as their CUDA counterparts."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _distributed_optimizer_param_types() -> None:
    """DistributedOptimizer sorts parameters into fp32 / fp16 / bf16 shards by `param.type()`
    compared with 'torch.cuda.FloatTensor' etc. (distrib_optimizer.py:401, 466, 758) and rejects
    anything else; it sees CUDA type names while it sets up."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init = DistributedOptimizer.__init__
    build = DistributedOptimizer._build_model_and_main_param_groups.__func__

    def __init__(self, *args, **kwargs):
        with _cuda_type_names():
            init(self, *args, **kwargs)

    def _build_model_and_main_param_groups(cls, *args, **kwargs):
        with _cuda_type_names():
            return build(cls, *args, **kwargs)

    DistributedOptimizer.__init__ = __init__
    DistributedOptimizer._build_model_and_main_param_groups = classmethod(_build_model_and_main_param_groups)


def _moe_split_sizes() -> None:
    """The all-to-all token dispatcher hands split sizes to all_to_all_single as numpy arrays only
    for CUDA tensors (moe_utils.maybe_move_tensor_to_cpu); gloo needs them as lists too."""
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if not torch.is_tensor(tensor):
            return tensor
        # The copy the GPU path makes (a no-op here), so that probes/host_syncs.py sees host tensors.
        tensor = tensor.to("cpu", non_blocking=True)
        return tensor.numpy() if as_numpy else tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _moe_router_gemm() -> None:
    """moe_utils.RouterGatingLinearFunction takes TE's CUDA GEMM whenever `te_general_gemm` is
    bound (moe_utils.py:1326), which it is wherever Transformer Engine imports, used or not (CUDA
    hidden, or a broken extension). Without a usable TE the router takes its torch matmul."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


def _distributed_optimizer_state_on_load() -> None:
    """With torch's Adam (no TE or Apex), DistributedOptimizer.state_dict() reads the Adam `step`
    of every parameter's state (distrib_optimizer.py:838), but a freshly built torch optimizer has
    no state until its first step, so building the sharded state dict to load a checkpoint into
    fails. Megatron's FusedAdam keeps `step` in its parameter groups instead and has no such gap.
    Before a load, torch's Adam gets the state its first step would create (zeros, step 0), which
    the checkpoint then overwrites."""
    from megatron.core.optimizer import distrib_optimizer

    sharded_state_dict = distrib_optimizer.DistributedOptimizer.sharded_state_dict

    def with_initial_state(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
        if is_loading and not distrib_optimizer.HAVE_APEX_OR_TE and not self.optimizer.state:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                               "exp_avg_sq": torch.zeros_like(p)}
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, **kwargs)

    distrib_optimizer.DistributedOptimizer.sharded_state_dict = with_initial_state

    # Loading then copies every state tensor of a parameter from the checkpoint's canonical form
    # (distrib_optimizer.py:2405), which holds param, exp_avg and exp_avg_sq; torch's per-parameter
    # `step` is not among them. load_state_dict sets it from the parameter groups, as one tensor
    # shared by every parameter (distrib_optimizer.py:1024), which torch's foreach Adam would then
    # advance once per parameter each step: each parameter gets its own copy back.
    set_states = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_but_step(self, model_param, tensors):
        if distrib_optimizer.HAVE_APEX_OR_TE or "step" in tensors:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.clone()

    distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states = set_states_but_step


def _uneven_sequence_parallel_collectives() -> None:
    """With TP and experts, the token dispatcher gathers and reduce-scatters uneven token counts
    across TP ranks (tensor_parallel/mappings.py:154, :197) with list collectives that NCCL
    accepts and gloo refuses; on CPU they go through equal-size collectives instead."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        everything = input_.new_empty((longest * group.size(), *input_.shape[1:]))
        dist.all_gather_into_tensor(everything, padded.contiguous(), group=group)
        pieces = everything.split(longest)
        return torch.cat([piece[:n] for piece, n in zip(pieces, output_split_sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start: start + input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _checkpoint_results_queue() -> None:
    """dist_checkpointing's writer hands its results through a queue served by a
    multiprocessing.Manager, a ~275 MB process spawned at the first save
    (strategies/filesystem_async.py:65) that outlives a run killed with SIGKILL, as does its
    resource tracker. Saves here are synchronous: the results are put and taken by this process,
    and a plain queue does."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()
