"""What an offline Weights & Biases run recorded, read back from its run-<id>.wandb file: the
records `wandb sync` would upload. The file is a LevelDB-style log (wandb's datastore): a 7-byte
header, then 32 KiB blocks of chunks, each with a 7-byte header (CRC, length, kind), each record
a protobuf `Record` split over one or more chunks."""

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb datastore"
    pos, record = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        record += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed
            record = b""


def history(run_dir: Path) -> list:
    """Each logged row of the run folder's one offline wandb run, as {key: value}."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def config(run_dir: Path) -> dict:
    """The run's config as wandb recorded it."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    (run,) = [r.run for r in records(path) if r.WhichOneof("record_type") == "run"]
    return {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
