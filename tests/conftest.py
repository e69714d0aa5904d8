"""The suite's setup: CUDA hidden before anything imports torch, the GPUs `gpu` tests may use, and
the default data built once. Helpers the tests share are in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# The suite runs on the CPU in fp32, where losses are compared exactly, even on a GPU host: CUDA
# is hidden from this process and every process it starts, before anything imports torch. Tests
# marked `gpu` hand the GPUs back to the processes they start (GPU_ENV).
# pytest-xdist's workers inherit the hidden value, so what was visible is passed down beside it
# (seen on an H100: under -n 4 every GPU test was skipped).
_SAVED = "MEGATRON_POWER_TESTS_VISIBLE_DEVICES"
os.environ.setdefault(_SAVED, os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
_VISIBLE = None if os.environ[_SAVED] == "<unset>" else os.environ[_SAVED]
os.environ["CUDA_VISIBLE_DEVICES"] = ""
GPU_ENV = {"CUDA_VISIBLE_DEVICES": _VISIBLE}  # None: unset, every GPU visible

import pytest  # noqa: E402

from helpers import BIN, ROOT, environment  # noqa: E402
from megatron_power.config import DEFAULT_DATA_DIR  # noqa: E402


def _count_gpus() -> int:
    """GPUs the processes of `gpu` tests will see (asked of a process of their own)."""
    if _VISIBLE == "" or shutil.which("nvidia-smi") is None:
        return 0
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           env=environment(GPU_ENV), capture_output=True, text=True)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


GPUS = _count_gpus()


@pytest.fixture(scope="session")
def default_data():
    """The default corpus, built by the project's own `data` verb (reused when complete)."""
    subprocess.run([str(BIN / "megatron-power"), "data"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return DEFAULT_DATA_DIR
