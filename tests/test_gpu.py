"""The GPU path, run where CUDA is (skipped elsewhere): bf16 with Transformer Engine's layer spec
where it is installed (Megatron's local spec otherwise), FP8 and grouped-GEMM experts, each against
the same model trained in fp32 on the CPU from the same weights and batches.

Tolerances: step 1 (same weights, no update yet) within 0.02 nats, bf16's rounding of the forward;
the next nine steps within 0.1 nats (0.15 in FP8), where rounding has compounded through the
updates. Wrong μP multipliers, a wrong layer spec or a broken router move losses far more.
"""

import importlib.util

import pytest
import torch

from conftest import SMALL, metrics, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine")

STEPS = 10
DENSE = SMALL + [f"train.tokens={STEPS * 16 * 128}", "schedule.warmup=0", "schedule.decay=0"]
MOE = DENSE + ["model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=128"]
ON_CPU = {"CUDA_VISIBLE_DEVICES": ""}


def losses(tmp_path, name, overrides, env_vars=None):
    run_train(tmp_path, name, overrides, env_vars=env_vars)
    train = metrics(tmp_path / name)[0]
    assert sorted(train) == list(range(1, STEPS + 1))
    return train


def assert_close(gpu, cpu, later_tolerance):
    assert gpu[1] == pytest.approx(cpu[1], abs=0.02)
    for step in range(2, STEPS + 1):
        assert gpu[step] == pytest.approx(cpu[step], abs=later_tolerance), f"step {step}"
    assert gpu[STEPS] < gpu[1] - 1.0


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_bf16_trains_like_fp32_on_cpu(default_data, tmp_path, model):
    cpu = losses(tmp_path, "cpu", model, ON_CPU)
    gpu = losses(tmp_path, "gpu", model + ["precision.fp8=null"])
    assert_close(gpu, cpu, 0.1)


@needs_te
def test_fp8_trains_like_fp32_on_cpu(default_data, tmp_path):
    cpu = losses(tmp_path, "cpu", DENSE, ON_CPU)
    gpu = losses(tmp_path, "gpu", DENSE + ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"])
    assert_close(gpu, cpu, 0.15)
