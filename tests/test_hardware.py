"""The machine policy (hardware.py), for each kind of machine a run may meet, and what the model,
the optimizer and the planner read from it. Every case runs here, on a CPU: the policy is
computed from which modules import, and Megatron's config is checked field by field."""

import subprocess
import sys
import textwrap
from dataclasses import replace

import torch

from helpers import ROOT
from megatron_power.config import load_config
from megatron_power.ops import plan
from megatron_power.training import hardware, runtime
from megatron_power.training.hardware import Hardware
from megatron_power.training.model import build_model, transformer_fields

CPU = hardware.CPU
GPU_ONLY = Hardware(cuda=True, transformer_engine=False, apex=False, fused_softmax=False,
                    gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_gib=79.1, gpus=1)
GPU_TE = Hardware(cuda=True, transformer_engine=True, apex=False, fused_softmax=False,
                  gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_gib=79.1, gpus=8)


def modules(*present):
    return lambda name: name in present


def test_policy_for_each_machine():
    assert hardware.decide(False, modules(hardware.TE_MODULE, hardware.APEX_MODULE)) == CPU
    assert (CPU.device_type, CPU.bf16, CPU.layer_impl) == ("cpu", False, "local")
    no_te = hardware.decide(True, modules())
    assert (no_te.cuda, no_te.bf16, no_te.transformer_engine, no_te.fused_softmax) == (True, True, False, False)
    assert no_te.layer_impl == "local"
    with_te = hardware.decide(True, modules(hardware.TE_MODULE))
    assert with_te.layer_impl == "transformer_engine" and with_te.bf16
    with_apex = hardware.decide(True, modules(hardware.APEX_MODULE, hardware.FUSED_SOFTMAX_MODULE))
    assert with_apex.apex and with_apex.fused_softmax and with_apex.layer_impl == "local"
    assert not with_apex.fused_wgrad
    assert hardware.decide(True, modules(hardware.FUSED_WGRAD_MODULE)).fused_wgrad


def test_the_start_up_names_transformer_engine_and_warns_when_it_is_not_paired():
    """A container brings its own TE: its version is in the run's hardware line, and one outside
    the gpu extra's range gets a warning line at start-up (not a refusal: it may well work)."""
    installed = {"transformer_engine": "2.20.2"}.get
    with_te = hardware.decide(True, modules(hardware.TE_MODULE), installed)
    assert with_te.te_version == "2.20.2" and "Transformer Engine 2.20.2 layers" in with_te.describe()
    assert hardware.decide(True, modules(), installed).te_version == ""  # installed, but not usable
    unknown = hardware.decide(True, modules(hardware.TE_MODULE), lambda name: "")  # no package metadata
    assert "Transformer Engine layers" in unknown.describe() and hardware.unpaired_te_warning("") is None
    for paired in ("2.12.0", "2.20.2", "2.16.0+3f1a2b"):  # the last as a build from git
        assert hardware.unpaired_te_warning(paired) is None, paired
    for unpaired in ("2.11.0", "2.21.0.dev0+3f1a2b", "3.0.0"):
        line = hardware.unpaired_te_warning(unpaired)
        assert line.startswith(f"warning: Transformer Engine {unpaired} is outside the releases megatron-core "
                               f"0.19.2 is paired with here (>=2.12,"), line
        assert "\n" not in line


def test_transformer_engine_with_a_broken_torch_extension_is_not_used(tmp_path, monkeypatch):
    # As TE ships: the package's __init__ imports, its torch part fails to load its extension.
    package = tmp_path / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("try:\n    from . import pytorch\nexcept ImportError:\n    pass\n")
    (package / "pytorch" / "__init__.py").write_text(
        "raise ImportError('libtransformer_engine_torch.so: undefined symbol')\n")
    (package / "pytorch" / "fp8.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert hardware.importable("transformer_engine")
        assert not hardware.importable(hardware.TE_MODULE)
        assert hardware.decide(True).layer_impl == "local"
    finally:  # Megatron, imported by later tests, must not find this package
        for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
            del sys.modules[name]


def _fields(overrides, hw):
    return transformer_fields(load_config("proxy", overrides, check_paths=False), hw)


MOE = ["model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=128"]


def test_model_reads_the_policy():
    cpu = _fields(MOE + ["precision.fp8=hybrid", "precision.recompute=selective"], CPU)
    assert (cpu["bf16"], cpu["transformer_impl"], cpu["use_cpu_initialization"]) == (False, "local", True)
    assert "fp8" not in cpu and not cpu["moe_grouped_gemm"] and cpu["recompute_granularity"] == "selective"

    # A GPU without TE or Apex: bf16, and no flag whose kernel is missing. masked_softmax_fusion
    # would import Apex's scaled_masked_softmax_cuda in the first forward.
    gpu = _fields(MOE + ["precision.fp8=hybrid"], GPU_ONLY)
    assert gpu["bf16"] and gpu["transformer_impl"] == "local" and not gpu["use_cpu_initialization"]
    assert not any(gpu[f] for f in ("masked_softmax_fusion", "persist_layer_norm", "apply_rope_fusion",
                                    "gradient_accumulation_fusion", "moe_grouped_gemm", "moe_permute_fusion",
                                    "moe_router_fusion"))
    assert "fp8" not in gpu and gpu["moe_router_dtype"] == "fp32"

    te = _fields(MOE + ["precision.fp8=hybrid", "precision.recompute=selective"], GPU_TE)
    assert te["transformer_impl"] == "transformer_engine" and te["fp8"] == "hybrid"
    assert te["moe_grouped_gemm"] and te["moe_permute_fusion"] and te["moe_router_fusion"]
    assert te["moe_token_dispatcher_type"] == gpu["moe_token_dispatcher_type"] == "alltoall"
    # Without Apex's wgrad kernel, Megatron's output layer raises at construction if this is on.
    assert not te["gradient_accumulation_fusion"]
    with_apex = _fields(MOE, replace(GPU_TE, apex=True, fused_wgrad=True))
    assert with_apex["gradient_accumulation_fusion"]
    assert te["moe_router_dtype"] == "fp32"
    # Fused attention never stores the scores that selective recompute would drop.
    assert "recompute_granularity" not in te


def test_cuda_graphs_capture_what_megatron_accepts_for_each_layer_kind():
    """precision.cuda_graphs: a dense layer whole, an MoE layer's attention, router and dispatch
    preprocessing (dropless experts change shape), through TE's implementation and its RNG tracker;
    Megatron's own checks (what each kind of layer and the dispatcher allow in a graph) accept them.
    Off without TE, as FP8 is."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    for overrides, graphed in ((MOE, ["attn", "moe_router", "moe_preprocess"]), ([], ["attn", "mlp"])):
        te = _fields(overrides + ["precision.cuda_graphs=true"], GPU_TE)
        assert (te["cuda_graph_impl"], te["cuda_graph_modules"], te["use_te_rng_tracker"]) == \
            ("transformer_engine", graphed, True)
        # The fusions and FP8 are left out: their checks need Transformer Engine installed.
        checked = TransformerConfig(**{**te, "apply_rope_fusion": False, "moe_permute_fusion": False,
                                       "moe_router_fusion": False})
        assert [m.name for m in checked.cuda_graph_modules] == graphed
        for hw in (CPU, GPU_ONLY):
            assert "cuda_graph_impl" not in _fields(overrides + ["precision.cuda_graphs=true"], hw)
    assert "cuda_graph_impl" not in _fields(MOE, GPU_TE)


def test_experts_take_their_own_precision_from_megatrons_per_module_recipe():
    """precision.fp8_experts: Megatron's matcher gives the experts' GEMMs (TE's grouped ones, the
    local spec's per expert) and nothing else a TE precision of their own: bf16, or another scaling
    in the run's FP8 format. Set only where FP8 is."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.extensions.transformer_engine import TEQuantizationParams
    from megatron.core.quantization.utils import get_quant_config_or_none
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = load_config("proxy", MOE + ["model.num_layers=2"], check_paths=False)
    runtime.initialize(config, hw=CPU, alone=True)
    try:
        with torch.device("meta"):
            names = [name for name, _ in build_model(config, 512, initialize=False, hw=CPU).named_modules()
                     if name.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router"))]
    finally:
        runtime.shutdown()
    names += ["decoder.layers.1.mlp.experts.linear_fc1", "decoder.layers.1.mlp.experts.linear_fc2"]  # TEGroupedMLP's
    experts = [name for name in names if ".mlp.experts." in name]
    assert len(experts) == 2 * 2 * 4 + 2  # fc1 and fc2 of 4 experts in 2 layers, and the grouped pair

    for setting, scaling in (("bf16", None), ("blockwise", Fp8Recipe.blockwise)):
        fields = _fields(MOE + ["precision.fp8=hybrid", f"precision.fp8_experts={setting}"], GPU_TE)
        recipe = TransformerConfig(**{**fields, "fp8": None, "apply_rope_fusion": False, "moe_permute_fusion": False,
                                      "moe_router_fusion": False}).quant_recipe
        matched = {name: get_quant_config_or_none(name, recipe) for name in names}
        assert [name for name, found in matched.items() if found] == experts
        for name in experts:
            params = TEQuantizationParams.parse_from_config(matched[name]).training_recipe
            assert params.fp8_quantization_recipe == scaling and params.override_quantized_autocast
            assert not params.override_nonquantized_autocast  # bf16 layers keep bf16 experts
            assert scaling is None or params.fp8_format == "hybrid"
        for hw in (CPU, GPU_ONLY):
            assert "quant_recipe" not in _fields(MOE + ["precision.fp8=hybrid", f"precision.fp8_experts={setting}"], hw)
        assert "quant_recipe" not in _fields(MOE + [f"precision.fp8_experts={setting}"], GPU_TE)
    assert "quant_recipe" not in _fields(MOE + ["precision.fp8=hybrid"], GPU_TE)


def test_bridges_for_a_gpu_without_transformer_engine():
    # In a process of its own: the bridges change Megatron's modules for the rest of a process.
    script = textwrap.dedent("""
        import torch
        from megatron_power.training import cpu_compat
        from megatron_power.training.hardware import Hardware
        from megatron.core.transformer.moe import moe_utils
        current_device = torch.cuda.current_device
        cpu_compat.install(Hardware(cuda=True, transformer_engine=False, apex=False, fused_softmax=False))
        assert moe_utils.te_general_gemm is None  # the router's test of it no longer raises NameError
        assert torch.cuda.current_device is current_device  # no CPU bridge on a GPU machine
    """)
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True)


def test_training_refuses_a_layout_the_planner_says_does_not_fit():
    config = load_config("dense3b", ["parallel.tp=1", "parallel.pp=1"], 1, check_paths=False)
    refusal = plan.training_refusal(config, config.model.vocab_size, GPU_ONLY, 1)
    assert refusal.startswith("dense3b on 1 GPU needs") and "train.check_memory=false" in refusal
    assert plan.training_refusal(config, config.model.vocab_size, CPU, 1) is None
    unchecked = load_config("dense3b", ["parallel.tp=1", "parallel.pp=1", "train.check_memory=false"], 1,
                            check_paths=False)
    assert plan.training_refusal(unchecked, config.model.vocab_size, GPU_ONLY, 1) is None
    fits = load_config("dense3b", [], 64, check_paths=False)
    assert plan.training_refusal(fits, config.model.vocab_size, GPU_ONLY, 64) is None


def test_mfu_peak_is_that_of_the_exact_device():
    assert hardware.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert hardware.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert hardware.bf16_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert hardware.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert hardware.bf16_peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert hardware.bf16_peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_gpu_extra_takes_only_a_transformer_engine_megatron_core_supports():
    """Within what megatron-core declares (0.19.2: no bound), from 2.12 (below it 0.19 turns
    features off) up to and with 2.20, the release the GPU kit and current NGC containers hold."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    ours = next(Requirement(r) for r in extra if Requirement(r).name == "transformer-engine")
    theirs = next(Requirement(r) for r in importlib.metadata.requires("megatron-core")
                  if Requirement(r).name == "transformer-engine")
    candidates = [f"2.{minor}.{patch}" for minor in range(6, 25) for patch in range(3)]
    allowed = [v for v in candidates if ours.specifier.contains(v, prereleases=True)]
    assert allowed and all(theirs.specifier.contains(v, prereleases=True) for v in allowed)
    assert min(allowed, key=Version) == "2.12.0" and "2.20.2" in allowed
