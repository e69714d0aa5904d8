"""Hugging Face weights as safetensors shards, each tensor cast straight into its place in the file.

The layout of every shard (names, shapes, offsets) is planned before any data is read, so each
file is created at its final size, its header written first and then mapped into memory:
casting a tensor into the mapping is the only pass over its bytes, where building the shard in
memory and serializing it would be three. Memory holds one shard's pages until it is closed.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length, a JSON header naming each tensor's dtype, shape and [begin, end) data offsets, then
the data. The tests read these files with `safetensors` and `transformers`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

import torch

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
Layout = List[Tuple[str, Tuple[int, ...]]]  # (name, shape) of each tensor of one shard, in file order


def plan(tensors: Iterable[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype, max_bytes: int) -> List[Layout]:
    """Tensors, in order, into shards of at most `max_bytes` (or one tensor, if larger)."""
    shards: List[Layout] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape)))
        size += nbytes
    return shards


def _header(layout: Layout, dtype: torch.dtype) -> bytes:
    entries = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(text)) + text


def file_name(k: int, count: int) -> str:
    return f"model-{k + 1:05d}-of-{count:05d}.safetensors"


def write(out: Path, shards: List[Layout], dtype: torch.dtype, tensors: Iterator[Tuple[str, torch.Tensor]]) -> None:
    """Fill the planned shards from `tensors` (which must come in the planned order and
    shapes, in any dtype) and write `model.safetensors.index.json`."""
    weight_map = {}
    for k, layout in enumerate(shards):
        name = file_name(k, len(shards))
        header = _header(layout, dtype)
        size = len(header) + sum(math.prod(shape) for _, shape in layout) * dtype.itemsize
        with open(out / name, "wb+") as f:
            os.ftruncate(f.fileno(), size)
            mapping = mmap.mmap(f.fileno(), size)
        mapping[:len(header)] = header
        offset = len(header)
        for planned, shape in layout:
            given, tensor = next(tensors)
            if (given, tuple(tensor.shape)) != (planned, shape):
                raise RuntimeError(f"shard plan and tensors disagree: planned {planned} {shape}, "
                                   f"given {given} {tuple(tensor.shape)}")
            count = math.prod(shape)
            torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).view(shape).copy_(tensor)
            offset += count * dtype.itemsize
            weight_map[planned] = name
        mapping.close()
    total = sum(math.prod(shape) for layout in shards for _, shape in layout) * dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
