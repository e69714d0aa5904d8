"""What this machine can run, decided once at start-up.

Every choice that depends on the machine (device, bf16 or fp32, Transformer Engine's layers or
Megatron's local ones, which fused kernels, FP8, grouped-GEMM experts) is read from the one
`Hardware` that `detect()` returns, so the model, the optimizer, the tests and the log lines cannot
disagree about it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# What Megatron-Core imports to decide that Transformer Engine is there (its `HAVE_TE`). The bare
# `transformer_engine` package imports even when its torch extension is missing or was built
# against another torch, so it proves nothing.
TE_MODULE = "transformer_engine.pytorch.fp8"
FUSED_SOFTMAX_MODULE = "scaled_masked_softmax_cuda"  # Apex's kernel behind masked_softmax_fusion
# Apex's kernel behind gradient_accumulation_fusion: Megatron's own output layer requires it once
# the flag is on; without it only Transformer Engine's layers fuse (optim.accumulate_wgrads_in_te_gemms).
FUSED_WGRAD_MODULE = "fused_weight_gradient_mlp_cuda"
APEX_MODULE = "apex"


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    transformer_engine: bool  # usable: only ever True with CUDA
    apex: bool
    fused_softmax: bool
    fused_wgrad: bool = False
    gpu_name: str = ""
    gpu_memory_gib: float = 0.0
    gpus: int = 0
    te_version: str = ""  # of the usable Transformer Engine

    @property
    def device_type(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def bf16(self) -> bool:
        """Training precision: bf16 on GPUs; fp32 on CPUs, where the tests compare exact losses."""
        return self.cuda

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def layer_impl(self) -> str:
        return "transformer_engine" if self.transformer_engine else "local"

    def describe(self) -> str:
        if not self.cuda:
            return "CPU, fp32, Megatron's local layers"
        te = " ".join(filter(None, ["Transformer Engine", self.te_version]))  # a TE without metadata: no version
        layers = f"{te} layers" if self.transformer_engine else \
            "Megatron's local layers (Transformer Engine is not usable: no FP8, no grouped-GEMM experts)"
        return f"{self.gpus} x {self.gpu_name} ({self.gpu_memory_gib:.0f} GiB), bf16, {layers}"


def importable(module: str) -> bool:
    """Whether `module` imports; a compiled extension that fails to load counts as absent."""
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or OSError / RuntimeError from a shared library that fails to load
        return False
    return True


def installed_version(distribution: str) -> str:
    """The installed version of `distribution`, or "" where it is not installed as one."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def decide(cuda: bool, can_import: Callable[[str], bool] = importable,
           version_of: Callable[[str], str] = installed_version) -> Hardware:
    """The policy for a machine with or without CUDA, given which optional modules import (and
    which version of a distribution is installed).

    Nothing optional is imported without CUDA: Transformer Engine fails there, and the CPU path is
    Megatron's local spec in fp32.
    """
    if not cuda:
        return Hardware(cuda=False, transformer_engine=False, apex=False, fused_softmax=False)
    props = torch.cuda.get_device_properties(torch.cuda.current_device()) if torch.cuda.is_available() else None
    te = can_import(TE_MODULE)
    return Hardware(
        cuda=True,
        transformer_engine=te,
        te_version=version_of("transformer_engine") if te else "",
        apex=can_import(APEX_MODULE),
        fused_softmax=can_import(FUSED_SOFTMAX_MODULE),
        fused_wgrad=can_import(FUSED_WGRAD_MODULE),
        gpu_name=props.name if props else "",
        gpu_memory_gib=props.total_memory / 2**30 if props else 0.0,
        gpus=torch.cuda.device_count() if props else 0,
    )


@functools.cache
def detect() -> Hardware:
    """This process's machine, probed once."""
    return decide(torch.cuda.is_available())


CPU = decide(cuda=False)


def unpaired_te_warning(te_version: str) -> Optional[str]:
    """A line for a Transformer Engine outside the releases this repository pairs with its
    megatron-core (the `gpu` extra's range; a container brings its own TE). An unpaired TE can
    work until late in a run: with megatron-core 0.16.1 and a newer TE, FP8 grouped-GEMM MoE runs
    failed at their first checkpoint. None when paired, or when the range is unknown (this
    package's metadata absent)."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires("megatron-power") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paired = next((r.specifier for r in map(Requirement, requires)
                   if r.name == "transformer-engine" and r.marker and r.marker.evaluate({"extra": "gpu"})), None)
    # A build from git (an NGC container's) carries a local version or a pre-release tag.
    if paired is None or not te_version or paired.contains(te_version, prereleases=True):
        return None
    wanted = ",".join(sorted((str(s) for s in paired), reverse=True))
    return (f"warning: Transformer Engine {te_version} is outside the releases megatron-core "
            f"{installed_version('megatron-core')} is paired with here ({wanted}, the gpu extra); an "
            f"unpaired TE can fail late (FP8 MoE runs have failed at their first checkpoint): install "
            f"one in range (pip install --no-build-isolation -e '.[gpu]') or use a container that has one")


# Dense bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by what
# torch.cuda.get_device_name() says; the first match wins, so variants come before their family.
BF16_PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H200.*NVL", 835.0),
    (r"H800.*PCIe", 756.0),
    (r"GH200|H200|H100|H800", 989.0),  # SXM parts and Grace Hopper
    (r"A100", 312.0),
)


def bf16_peak_tflops(gpu_name: str):
    """The dense bf16 peak of the GPU named `gpu_name`, or None for a GPU not in the table."""
    for pattern, tflops in BF16_PEAK_TFLOPS:
        if re.search(pattern, gpu_name):
            return tflops
    return None
