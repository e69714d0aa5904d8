"""Training tokens/s of `megatron-power train` against a plain PyTorch loop of the same model.

The baseline is Hugging Face's GraniteForCausalLM with the proxy's dimensions and muP multipliers
(RMSNorm, RoPE, SwiGLU, tied embeddings, no biases), the same global and micro batch, AdamW and gradient
clipping, on the same tokens. Both run in this script, one after the other, on the same threads.
Throughput is measured after the first `--warmup` steps of each.

    .venv/bin/python bench/train_throughput.py [--steps 30] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_power.config import DEFAULT_DATA_DIR, load_config  # noqa: E402
from megatron_power.training.model import padded_vocab_size  # noqa: E402


def megatron_power_tokens_per_s(steps: int, warmup: int, overrides) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).parent / "megatron-power"), "train", "proxy", f"out_dir={out}",
               "name=bench", f"train.tokens={steps * 32 * 256}", "train.eval_interval=100000",
               "checkpoint.interval=100000", *overrides]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    start, end = rows[warmup - 1], rows[-1]
    return (end["tokens"] - start["tokens"]) / (end["time"] - start["time"])


def plain_loop_tokens_per_s(config, steps: int, warmup: int) -> float:
    from transformers import GraniteForCausalLM

    from megatron_power.convert.granite import hf_config

    m, t = config.model, config.train
    hf = hf_config(config, padded_vocab_size(8192, 1))  # same shapes and muP multipliers
    torch.manual_seed(0)
    model = GraniteForCausalLM(hf).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    tokens = np.fromfile(DEFAULT_DATA_DIR / "train.bin", dtype=np.uint16).astype(np.int64)
    n_micro = t.global_batch_size // t.micro_batch_size
    per_step = t.global_batch_size * m.seq_length
    times = []
    for step in range(steps):
        begin = time.time()
        optimizer.zero_grad(set_to_none=True)
        for i in range(n_micro):
            offset = ((step * n_micro + i) * t.micro_batch_size * (m.seq_length + 1)) % (len(tokens) - 10**6)
            chunk = torch.from_numpy(tokens[offset:offset + t.micro_batch_size * (m.seq_length + 1)])
            chunk = chunk.view(t.micro_batch_size, m.seq_length + 1)
            logits = model(input_ids=chunk[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        optimizer.step()
        times.append(time.time() - begin)
    return per_step * (steps - warmup) / sum(times[warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    config = load_config("proxy", args.overrides)
    ours = megatron_power_tokens_per_s(args.steps, args.warmup, args.overrides)
    plain = plain_loop_tokens_per_s(config, args.steps, args.warmup)
    print(f"megatron-power train : {ours:9.0f} tokens/s")
    print(f"plain PyTorch loop   : {plain:9.0f} tokens/s  (HF GraniteForCausalLM, same shapes)")
    print(f"ratio                : {ours / plain:9.3f}")


if __name__ == "__main__":
    main()
