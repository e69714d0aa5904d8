"""The profile summary of a GPU trace (training/probes/trace_summary.py), before a GPU is lent.

A CPU run's trace has no kernels (tests/test_moe.py summarises a real one); this one is written in
the Chrome-trace layout Kineto gives for CUDA: kernels on the device's stream, each tied to its
cudaLaunchKernel on the host by a correlation id, the launch inside the operators and the module
annotations (training/probes/profile.py) that made it, the step inside the annotation the training
loop puts around it.
"""

import pytest

from helpers import ROOT
from megatron_power.training.probes import host_syncs, trace_summary

HOST, STREAM = {"pid": 100, "tid": 100}, {"pid": 0, "tid": 7}


def host(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args, **HOST}


def kernel(name, ts, dur, correlation, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}, **STREAM}


def launch(ts, correlation, name="cudaLaunchKernel"):
    return host("cuda_runtime", name, ts, 2, correlation=correlation)


# One 1000 us step: a grouped expert GEMM, a plain GEMM, a flash-attention kernel, a permute kernel
# launched from Megatron's token dispatcher, an NCCL all-reduce and a D2H copy behind a stream sync.
# The device is busy 100+200+100+50+150 (+50 copy) = 650 us of it.
TRACE = {"traceEvents": [
    host("user_annotation", "megatron-power step 5", 0, 1000),
    host("user_annotation", "TEGroupedMLP", 10, 100),
    host("user_annotation", "GroupedLinear", 20, 50),
    launch(30, 1), kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 100, 100, 1),
    host("cpu_op", "aten::mm", 150, 20), launch(155, 2), kernel("nvjet_tst_128x256_64x4", 210, 200, 2),
    host("user_annotation", "TEDotProductAttention", 200, 40),
    launch(210, 3), kernel("flash_fwd_kernel<Flash_fwd_kernel_traits>", 420, 100, 3),
    host("user_annotation", "MoEAlltoAllTokenDispatcher", 300, 40),
    launch(310, 4), kernel("void moe_permute_row_map<float>", 530, 50, 4),
    host("cpu_op", "c10d::allreduce_", 400, 30), launch(405, 5),
    kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 600, 150, 5),
    host("cpu_op", "aten::_local_scalar_dense", 500, 300), launch(505, 6, "cudaMemcpyAsync"),
    kernel("Memcpy DtoH (Device -> Pageable)", 760, 50, 6, cat="gpu_memcpy"),
    host("cuda_runtime", "cudaStreamSynchronize", 510, 280),
]}


def test_gpu_trace_is_summarised_by_category_idle_time_and_synchronisations():
    summary = trace_summary.summarize(TRACE)
    assert summary["device"] == "gpu" and summary["steps"] == 1 and summary["step_ms"] == 1.0
    ms = {label: c["ms_per_step"] for label, c in summary["categories"].items()}
    assert ms == {"grouped GEMM": 0.1, "GEMM": 0.2, "attention": 0.1, "MoE routing / permute / dispatch": 0.05,
                  "communication": 0.15, "norms, elementwise, other": 0.05}
    assert summary["device_idle_share"] == pytest.approx(1 - 0.65)
    assert summary["launches_per_step"] == 5  # the copy is a cudaMemcpyAsync, not a launch
    assert summary["syncs_per_step"] == {"synchronize calls": 1, "device-to-host copies": 1,
                                         "aten::_local_scalar_dense (.item() and friends)": 1}
    assert summary["top"][0]["name"] == "nvjet_tst_128x256_64x4"
    text = trace_summary.markdown(summary, "dense3b bf16")
    assert "device idle 35.0% of the step" in text and "| grouped GEMM | 0.10 | 15.4% |" in text


def test_the_summary_says_which_module_issued_the_work_and_spent_the_host_time():
    """Per module (the innermost annotation) and autograd node: the host's own time in it (less
    the modules inside), its launches and their kernels' device time: where a host-bound step's
    time goes (moe3b on the H200: the device idle 88% of the step)."""
    backward_thread = {"pid": 100, "tid": 101}
    trace = {"traceEvents": [
        host("user_annotation", "megatron-power step 3", 0, 1000),
        host("user_annotation", "TEGroupedMLP", 10, 100),
        host("user_annotation", "GroupedLinear", 20, 50), launch(30, 1), kernel("grouped_gemm", 100, 100, 1),
        launch(200, 2), kernel("vectorized_elementwise_kernel", 210, 200, 2),
        {**host("cpu_op", "autograd::engine::evaluate_function: GroupedLinearBackward", 300, 100), **backward_thread},
        {**launch(310, 3), **backward_thread}, kernel("grouped_gemm_dgrad", 450, 50, 3),
    ]}
    rows = {r["issued_by"]: (r["host_ms_per_step"], r["launches_per_step"], r["device_ms_per_step"])
            for r in trace_summary.summarize(trace)["issued_by"]}
    assert rows == {"GroupedLinearBackward (backward)": (0.1, 1, 0.05), "GroupedLinear": (0.05, 1, 0.1),
                    "TEGroupedMLP": (0.05, 0, 0.0), "outside modules": (0.0, 1, 0.2)}
    text = trace_summary.markdown(trace_summary.summarize(trace), "moe3b bf16")
    assert "| `GroupedLinearBackward (backward)` | 0.10 | 1 | 0.05 |" in text

def test_a_trace_without_step_annotations_is_refused():
    with pytest.raises(ValueError, match="megatron-power step"):
        trace_summary.summarize({"traceEvents": [launch(0, 1)]})


def test_host_sync_counter_counts_device_reads_not_host_ones():
    import torch

    device_tensor = torch.ones(4, device="cpu")  # a device given: on a GPU run, on the GPU
    with host_syncs.HostSyncCounter() as syncs:
        counts = device_tensor.long().cpu()  # the copy waits
        counts.sum().item()  # a host tensor: free
        float(device_tensor.sum())  # waits
        device_tensor[device_tensor > 0]  # a boolean mask: waits for the output size
        torch.zeros(3).tolist()  # made on the host: free
    assert syncs.total == 3, syncs.sites
    assert all(site.startswith("tests/test_profile.py:") for site in syncs.sites), syncs.sites



def test_host_sync_counter_runs_compiled_functions_eagerly():
    """On the H200, Dynamo traced the counter's mode inside Megatron's compiled fusions and
    recompiled them to its limit of 8 in the counted step, and the recompilations' own
    synchronisations were counted as the step's. Inside the counter, compiled functions run as
    plain eager code: nothing is compiled, and their operations are counted like any others."""
    import torch
    from torch._dynamo.utils import counters

    @torch.compile
    def swiglu(x, y):
        return torch.nn.functional.silu(x) * y

    swiglu(torch.randn(8, 8), torch.randn(8, 8))
    graphs = counters["stats"]["unique_graphs"]
    inputs = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(3)]  # made outside: device tensors
    with host_syncs.HostSyncCounter() as syncs:
        outputs = [swiglu(x, y) for x, y in inputs]
        for out in outputs:
            out.sum().item()
    assert counters["stats"]["unique_graphs"] == graphs
    assert syncs.total == 3, syncs.sites
    assert all(torch.equal(out, torch.nn.functional.silu(x) * y) for out, (x, y) in zip(outputs, inputs))

@pytest.fixture
def bench(monkeypatch):
    """A script of bench/ by name, importable for the test that asks for it only, not the rest of the suite."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module


@pytest.fixture
def gpu_check(bench):
    return bench("gpu_check")


def test_gpu_check_report_holds_the_mfu_rows_and_start_up_a_gpu_run_writes(tmp_path, gpu_check):
    """bench/gpu_check.py's report from bench/gpu_mfu.py's JSON (a row as the H100 run of
    megatron-core 0.16.1 wrote it, one with this version's micro-batch, rows per expert and start-up,
    and a failed one) and from the GPU tests' log (one pytest process per test, each with its
    summary), rendered here so that a lent GPU's minutes do not find a formatting error."""
    import json

    old = {"recipe": "dense3b", "layers": "35/40", "precision": "bf16", "planned_gib": 64.07, "tokens_per_s": 18533,
           "tflops": 379.9, "mfu": 0.384, "peak_gib": 65.42, "peak_vs_plan": 1.021}
    new = {"recipe": "moe3b", "layers": "13/32", "precision": "bf16", "micro_batch": 1, "expert_rows": 819,
           "planned_gib": 70.5, "tokens_per_s": 41000, "tflops": 266.7, "mfu": 0.27, "peak_gib": 66.1,
           "peak_vs_plan": 0.938, "startup_s": {"imports and checks": 9.5, "model and init": 21.25, "data": 0.4}}
    failed = {"recipe": "moe3b", "layers": "31/32", "precision": "fp8", "micro_batch": 1, "expert_rows": 819,
              "planned_gib": 70.1, "failed": True}
    table = {"device": "NVIDIA H100 80GB HBM3", "bf16_peak_tflops": 989.0}
    graphed = {**new, "precision": "bf16, CUDA graphs", "micro_batch": 4, "expert_rows": 3277, "tokens_per_s": 52000}
    (tmp_path / "mfu.json").write_text(json.dumps({**table, "rows": [old, failed, graphed]}))
    (tmp_path / "micro-batch-1.json").write_text(json.dumps({**table, "rows": [new]}))
    (tmp_path / "tests.log").write_text(
        "tests/test_gpu.py::test_bf16_trains_like_fp32_on_cpu[dense] FAILED       [100%]\n"
        "FAILED tests/test_gpu.py::test_bf16_trains_like_fp32_on_cpu[dense] - AssertionError: step 3\n"
        "tests/test_gpu.py::test_fp8_trains_like_fp32_on_cpu PASSED [100%]\n"
        "PASSED tests/test_gpu.py::test_fp8_trains_like_fp32_on_cpu\n")
    gpu_check.write_report(tmp_path, {"policy": "1 x H100"}, [], 60.0)
    report = (tmp_path / "report.md").read_text()
    assert "| dense3b | 35/40 | bf16 |  |  | 18,533 | 379.9 | 38.4% |  | 65.42 | 64.07 | 1.02 |" in report
    assert "| moe3b | 31/32 | fp8 | 1 | 819 | failed | | | | | 70.10 | |" in report
    assert "| moe3b | 13/32 | bf16 | 1 | 819 | 41,000 | 266.7 | 27.0% | 31 | 66.10 | 70.50 | 0.94 |" in report
    assert "- moe3b bf16, micro-batch 1: imports and checks 10, model and init 21, data 0" in report
    assert "| moe3b | 13/32 | bf16, CUDA graphs | 4 | 3277 | 52,000 |" in report
    tests = report.split("## Tests")[1].split("##")[0]
    assert [line.split()[1] for line in tests.strip().splitlines()] == ["FAILED", "PASSED"]


def test_gpu_check_stops_a_test_over_its_limit_with_the_processes_it_started(tmp_path, gpu_check):
    """A GPU test over `--test-timeout` is stopped with its training processes (they would hold the
    GPU for the parts after it); the tests before it keep their output and the report names it."""
    import sys
    import time

    import psutil

    child = tmp_path / "child.pid"
    hangs = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); " \
            f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(600); " \
            f"print('tests/test_gpu.py::test_hangs')"
    start = time.time()
    part = gpu_check.run("tests", [[sys.executable, "-c", "print('tests/test_gpu.py::test_quick PASSED [ 50%]')"],
                                   [sys.executable, "-c", hangs, "tests/test_gpu.py::test_hangs"]], tmp_path, limit=5)
    assert part["exit_code"] == 124 and time.time() - start < 60
    # SIGKILL is delivered when the process is next scheduled: on a busy machine it can still read
    # "running" just after the kill, so it is given a few seconds to go (it would sleep 600 s if left).
    try:
        grandchild = psutil.Process(int(child.read_text()))
        grandchild.wait(timeout=10)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:  # gone but not reaped (a container without an init)
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
    gpu_check.write_report(tmp_path, {"policy": "1 x H100"}, [part], 6.0)
    tests = (tmp_path / "report.md").read_text().split("## Tests")[1].split("##")[0].split()
    assert tests == ["tests/test_gpu.py::test_quick", "PASSED", "[", "50%]", "tests/test_gpu.py::test_hangs", "TIMEOUT",
                     "after", "5", "s"]


def test_gpu_check_runs_gpu_tests_side_by_side_and_keeps_their_order(tmp_path, gpu_check):
    """`--test-jobs` GPU tests at a time: two that each wait for the other to have started pass only
    when run together (one after the other, the first would reach its limit); the log lists them in
    the order given, not the order they ended."""
    import sys

    def meets(me: str, other: str, then_sleeps: float) -> list:
        waits = (f"import pathlib, time; d = pathlib.Path({str(tmp_path)!r}); (d / {me!r}).touch(); "
                 f"[time.sleep(0.1) for _ in range(300) if not (d / {other!r}).exists()]; "
                 f"assert (d / {other!r}).exists(); time.sleep({then_sleeps}); "
                 f"print('tests/test_gpu.py::test_{me} PASSED')")
        return [sys.executable, "-c", waits]

    part = gpu_check.run("tests", [meets("first", "second", 2), meets("second", "first", 0)], tmp_path, limit=20,
                         jobs=2)
    assert part["exit_code"] == 0
    log = (tmp_path / "tests.log").read_text().split()
    assert log == ["tests/test_gpu.py::test_first", "PASSED", "tests/test_gpu.py::test_second", "PASSED"]



def test_gpu_check_time_limit_stops_what_runs_starts_nothing_more_and_keeps_what_ended(tmp_path, gpu_check):
    """`--time-limit`: the part running at the deadline is stopped with its processes, the parts
    after it start none of their commands, and the report keeps the MFU rows the stopped part wrote
    (bench/gpu_mfu.py writes its table as each row comes)."""
    import json
    import sys
    import time

    row = {"recipe": "dense3b", "layers": "35/40", "precision": "bf16", "micro_batch": 1, "planned_gib": 64.07,
           "tokens_per_s": 20000, "tflops": 410.0, "mfu": 0.415, "peak_gib": 65.0, "peak_vs_plan": 1.015}
    (tmp_path / "first-row.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "bf16_peak_tflops": 989.0,
                                                         "rows": [row]}))
    one_row_then_hangs = (f"import shutil, time; shutil.copy({str(tmp_path / 'first-row.json')!r}, "
                          f"{str(tmp_path / 'mfu.json')!r}); time.sleep(600)")
    deadline = time.time() + 3
    mfu = gpu_check.run("mfu", [sys.executable, "-c", one_row_then_hangs], tmp_path, deadline=deadline)
    assert mfu["exit_code"] == 124 and time.time() - deadline < 30
    started = tmp_path / "started"
    test = [sys.executable, "-c", f"open({str(started)!r}, 'w')", "tests/test_gpu.py::test_late"]
    tests = gpu_check.run("tests", [test, test], tmp_path, limit=100, jobs=2, deadline=deadline)
    assert tests["exit_code"] == 124 and not started.exists()
    gpu_check.write_report(tmp_path, {"policy": "1 x H100"}, [mfu, tests], 5.0)
    report = (tmp_path / "report.md").read_text()
    assert "| mfu | stopped at its time limit |" in report and "| tests | stopped at its time limit |" in report
    assert "| dense3b | 35/40 | bf16 | 1 |  | 20,000 | 410.0 | 41.5% |" in report
    assert "tests/test_gpu.py::test_late TIMEOUT: not started" in report.split("## Tests")[1]


def test_fp8_gemms_times_each_recipes_layer_at_its_micro_batch_and_moe_experts_in_both_layouts(bench):
    """bench/fp8_gemms.py's GEMMs come from the recipes: dense3b's at 2 x 4096 tokens; moe3b's
    experts as one GPU holds all 40 (3,276 rows each) and as a GPU of its EP-8 layout holds 5 (8
    times the rows), the same expert rows, hence FLOPs, in both; a recipe that fails leaves its cells
    blank."""
    fp8_gemms = bench("fp8_gemms")
    Gemm = fp8_gemms.Gemm
    assert fp8_gemms.layer_gemms("dense3b") == {"one layer": [
        Gemm("qkv", 2304, 6912, 8192), Gemm("attention out", 2304, 2304, 8192),
        Gemm("mlp fc1 (SwiGLU)", 2304, 18432, 8192), Gemm("mlp fc2", 9216, 2304, 8192)]}
    one_gpu, layout = fp8_gemms.layer_gemms("moe3b").values()
    assert one_gpu[:2] == layout[:2] == [Gemm("qkv", 1536, 2560, 16384), Gemm("attention out", 1536, 1536, 16384)]
    assert one_gpu[2:] == [Gemm("experts fc1 (SwiGLU), 40 grouped", 1536, 1024, 3276, 40),
                           Gemm("experts fc2, 40 grouped", 512, 1536, 3276, 40)]
    assert [(g.fan_in, g.fan_out, g.experts) for g in layout[2:]] == [(1536, 1024, 5), (512, 1536, 5)]

    def flops(gemms):
        return sum(g.fan_in * g.fan_out * g.rows * max(g.experts, 1) for g in gemms)

    assert flops(layout) == pytest.approx(flops(one_gpu), rel=1e-3)
    row = fp8_gemms.markdown_row("moe3b", "experts fc2", "", {"bf16": (2.0, 4.0), "FP8 current": (4.0, 8.0),
                                                              "current, cast": (5.0, 9.0)})
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert len(cells) == len(fp8_gemms.HEADER_CELLS) == fp8_gemms.HEADER[1].count("|") - 1
    by_header = dict(zip(fp8_gemms.HEADER_CELLS, cells))
    assert by_header["bf16 / current"] == "0.50" and by_header["FP8 blockwise"] == "" and by_header["host: bf16"] == "4.000"
