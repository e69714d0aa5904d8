"""The logits of a checkpoint's model on fixed tokens, as this machine runs it, for the GPU tests.

    python tests/logits_of_checkpoint.py CKPT OUT.pt [--local]

The model is built for this machine (Transformer Engine's layers in bf16 on a GPU that has it,
Megatron's local layers in fp32 on a CPU); `--local` takes Megatron's local layers on a GPU too
(sequential experts instead of TE's grouped GEMM). The logits are saved in fp32 on the CPU.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from megatron_power.convert.to_hf import open_checkpoint, single_process
from megatron_power.training import checkpoint, hardware, runtime
from megatron_power.training.model import build_model

SEQUENCES, LENGTH = 2, 64


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--local", action="store_true")
    args = p.parse_args()
    hw = hardware.detect()
    if args.local:
        hw = replace(hw, transformer_engine=False)
    source = open_checkpoint(args.ckpt)
    config = single_process(source.config)
    tokens = torch.randint(0, source.vocab_size, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(0))
    runtime.initialize(config, hw)
    model = build_model(config, source.vocab_size, hw=hw).eval()
    checkpoint.load(source.path, model, None)
    device = torch.device(hw.device_type, torch.cuda.current_device()) if hw.cuda else torch.device("cpu")
    logits = model(tokens.to(device), torch.arange(LENGTH, device=device).expand(SEQUENCES, -1), None)
    torch.save(logits[..., :source.vocab_size].float().cpu(), args.out)
    runtime.shutdown()


if __name__ == "__main__":
    main()
