"""Tensors of a `torch_dist` checkpoint, read straight from the page cache.

Megatron-Core's `torch_dist` format is PyTorch Distributed Checkpoint: a `.metadata` file listing,
for every key, the chunks each process saved, and `.distcp` files holding each chunk as one
uncompressed `torch.save` archive. `dist_checkpointing.load` reads a chunk into a fresh buffer,
unpickles it into a second one and copies it into the destination: three passes over the bytes.
Here each chunk is a memory map of its archive's data record, so a tensor costs the one pass
its consumer makes, and memory holds only the chunks being read.
"""

from __future__ import annotations

import math
import mmap
import struct
import warnings
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_power.errors import ConversionError
from megatron_power.training.checkpoint import short_file

# Bytes before a zip member's name in its local header, and where the name and extra-field
# lengths sit in them (PKWARE APPNOTE 4.3.7).
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


class TorchDistCheckpoint:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata = FileSystemReader(str(path)).read_metadata()
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self.storage = {(index.fqn, tuple(index.offset)): info for index, info in self.metadata.storage_data.items()
                        if index.offset is not None}
        short = short_file(self.path, self.metadata)
        if short:
            name, _, end = short
            raise ConversionError(f"{self.path / name} is missing or shorter than the {end} bytes the checkpoint's "
                                  f"metadata lists (an incomplete copy of the checkpoint?)")

    def shape(self, key: str) -> torch.Size:
        return self.tensors[key].size

    def read(self, key: str, layer: Optional[int] = None, start: int = 0, stop: Optional[int] = None,
             meta: bool = False) -> torch.Tensor:
        """Rows `start:stop` of `key`'s global tensor, or of its `layer`-th slice along the first
        axis. With `meta`, an empty tensor of that shape on the meta device, read from nothing."""
        info = self.tensors[key]
        first = [0] * len(info.size)
        size = list(info.size)
        row_axis = 0 if layer is None else 1
        if layer is not None:
            first[0], size[0] = layer, 1
        stop = size[row_axis] if stop is None else stop
        first[row_axis], size[row_axis] = first[row_axis] + start, stop - start
        squeeze = (lambda t: t[0]) if layer is not None else (lambda t: t)
        if meta:
            return squeeze(torch.empty(size, dtype=info.properties.dtype, device="meta"))
        return squeeze(self.region(key, first, size))

    def region(self, key: str, first, size) -> torch.Tensor:
        """The block of `key`'s global tensor that starts at `first` and spans `size`: a view of
        the file where one chunk holds it all; else assembled from the chunks it spans."""
        info = self.tensors[key]
        dtype = info.properties.dtype
        first, size = list(first), list(size)
        spans = [(c, r) for c in info.chunks if (r := _intersection(c.offsets, c.sizes, first, size)) is not None]
        if len(spans) == 1 and [hi - lo for lo, hi in spans[0][1]] == size:
            chunk, ranges = spans[0]
            return _narrow(self._chunk(key, chunk, dtype), ranges, chunk.offsets)
        out = torch.empty(size, dtype=dtype)
        for chunk, ranges in spans:
            _narrow(out, ranges, first).copy_(_narrow(self._chunk(key, chunk, dtype), ranges, chunk.offsets))
        covered = sum(math.prod(hi - lo for lo, hi in ranges) for _, ranges in spans)
        if covered != math.prod(size):
            raise ConversionError(f"{self.path}: the chunks of {key} cover {covered} of the {math.prod(size)} "
                                  f"elements asked for (a damaged checkpoint?)")
        return out

    def _chunk(self, key: str, chunk, dtype: torch.dtype) -> torch.Tensor:
        info = self.storage[(key, tuple(chunk.offsets))]
        if info.transform_descriptors:
            raise ConversionError(f"{self.path}: {key} is stored with {info.transform_descriptors} "
                                  f"(expected plain torch.save chunks, as Megatron-Core writes them)")
        nbytes = math.prod(chunk.sizes) * dtype.itemsize
        aligned = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path / info.relative_path, "rb") as f:
            # Shared and read-only: page faults on a private (copy-on-write) mapping of the page
            # cache cost four times as much.
            view = mmap.mmap(f.fileno(), info.offset + info.length - aligned, offset=aligned,
                             flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        data = _data_record(view, nbytes, f"{info.relative_path} at {info.offset} ({key})")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given buffer is not writable")  # it is only read
            tensor = torch.frombuffer(view, dtype=dtype, count=math.prod(chunk.sizes), offset=data)
        return tensor.view(chunk.sizes)


def _data_record(view: mmap.mmap, nbytes: int, where: str) -> int:
    """Where the one tensor record of a `torch.save` archive starts inside `view`. zipfile finds
    the archive behind the bytes that precede it in the mapping and reports absolute offsets."""
    with zipfile.ZipFile(view) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or records[0].file_size != nbytes:
        raise ConversionError(f"{where}: expected one uncompressed tensor record of {nbytes} bytes, found "
                              f"{[(r.filename, r.file_size) for r in records]}")
    header = records[0].header_offset
    signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(view, header)
    if signature != _LOCAL_SIGNATURE:
        raise ConversionError(f"{where}: no zip local header where the archive's directory points")
    return header + _LOCAL_HEADER.size + name_length + extra_length


def _narrow(tensor: torch.Tensor, ranges, origin) -> torch.Tensor:
    """The part of `tensor` (whose element 0 sits at global `origin`) that covers global `ranges`."""
    for dim, ((lo, hi), o) in enumerate(zip(ranges, origin)):
        tensor = tensor.narrow(dim, lo - o, hi - lo)
    return tensor


def _intersection(offsets, sizes, start, size) -> Optional[List[Tuple[int, int]]]:
    ranges = [(max(o, s), min(o + n, s + m)) for o, n, s, m in zip(offsets, sizes, start, size)]
    return None if any(lo >= hi for lo, hi in ranges) else ranges
