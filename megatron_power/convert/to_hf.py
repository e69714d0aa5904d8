"""`convert to-hf`: a checkpoint saved under any TP / PP / EP layout -> a Hugging Face directory.

Each Hugging Face tensor is read from the page cache as the rows of one layer of a checkpoint
key (assembled from the chunks of whatever layout saved it) and cast straight into its place
in a memory-mapped safetensors shard, so memory holds at most one key's layer and one shard.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
from tqdm import tqdm

from megatron_power.config import Config, ParallelConfig, PrecisionConfig, from_yaml
from megatron_power.convert import granite, safetensors_shards
from megatron_power.convert.output import check_writable, staged
from megatron_power.convert.torch_dist import TorchDistCheckpoint
from megatron_power.errors import CheckpointError, ConversionError, DataError
from megatron_power.training import checkpoint
from tokenizer.spm import load as load_sentencepiece

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest relative logit difference `--verify` accepts. Both models hold the same (rounded)
# weights and compute in fp32, so only summation order differs (seen: about 1e-6).
VERIFY_TOLERANCE = 1e-4
# Files of an imported model that its weights do not cover; `from-hf` keeps them here, beside
# the checkpoints, and `to-hf` carries them back.
HF_FILES_DIR = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass
class Source:
    path: Path  # the iter_* checkpoint directory
    config: Config
    vocab_size: int
    hf_files: Optional[Path]  # an imported model's tokenizer and other files
    tokenizer: Optional[Path]  # else: the sentencepiece model of the run


def open_checkpoint(ckpt: Path, tokenizer: Optional[Path] = None) -> Source:
    """The checkpoint, its config and its tokenizer; every problem raised before any work."""
    try:
        path = checkpoint.resolve(ckpt)
        config = from_yaml(checkpoint.saved_state(path)["config"])
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    hf_files = path.parent / HF_FILES_DIR
    if tokenizer is None and hf_files.is_dir():
        vocab = config.model.vocab_size
        return Source(path, config, vocab, hf_files, None)
    named = "given by --tokenizer" if tokenizer else "named by the checkpoint's config"
    tokenizer = Path(tokenizer or config.data.tokenizer)
    advice = "pass --tokenizer PATH, the sentencepiece model the run trained with"
    if not tokenizer.is_file():
        raise ConversionError(f"tokenizer {tokenizer} ({named}) does not exist ({advice})")
    try:
        model = load_sentencepiece(tokenizer)
    except DataError as e:
        raise ConversionError(f"tokenizer: {e}; {advice}") from None
    return Source(path, config, config.model.vocab_size or model.vocab_size(), None, tokenizer)


def single_process(config: Config) -> Config:
    """The same model, one process, no recompute: how conversion builds and reads it."""
    return replace(config, parallel=ParallelConfig(), precision=PrecisionConfig())


def checked_reader(source: Source) -> TorchDistCheckpoint:
    """The checkpoint's tensors, once it is known to hold every tensor the config describes."""
    backend = json.loads((source.path / "metadata.json").read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(f"{source.path} is a {backend} checkpoint (expected torch_dist, "
                              f"the format megatron-power saves)")
    reader = TorchDistCheckpoint(source.path)
    m = source.config.model
    entries = granite.table(m)
    missing = [e.megatron for e in entries if e.megatron not in reader.tensors]
    if missing:
        raise ConversionError(f"{source.path} lacks {', '.join(missing)} (expected the tensors of a "
                              f"{'MoE' if m.num_experts else 'dense'} GPT model as its config describes)")
    for entry in entries:
        layers = reader.shape(entry.megatron)[0]
        if entry.per_layer and layers != m.num_layers:
            raise ConversionError(f"{entry.megatron} holds {layers} layers; the config says {m.num_layers}")
    return reader


def hf_tensors(source: Source, reader: TorchDistCheckpoint, meta: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every tensor of the model, in the order they are written;
    with `meta`, shapes only."""
    m = source.config.model
    for entry in granite.table(m):
        for layer in range(m.num_layers) if entry.per_layer else [None]:
            def rows(start, stop, entry=entry, layer=layer):
                return reader.read(entry.megatron, layer, start, stop, meta=meta)

            yield from zip(granite.hf_names(entry, layer), granite.to_hf(entry, rows, m, source.vocab_size))


def special_token_ids(source: Source) -> dict:
    if source.hf_files is not None:
        saved = json.loads((source.hf_files / "config.json").read_text())
        return {k: saved.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    sp = load_sentencepiece(source.tokenizer)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def write_side_files(source: Source, out: Path, dtype: torch.dtype) -> None:
    """config.json, generation_config.json and the tokenizer."""
    from transformers import GenerationConfig

    ids = special_token_ids(source)
    hf = granite.hf_config(source.config, source.vocab_size, **ids)
    hf.architectures = ["GraniteMoeForCausalLM" if source.config.model.num_experts else "GraniteForCausalLM"]
    hf.dtype = dtype
    hf.save_pretrained(str(out))
    if source.hf_files is not None:
        for f in source.hf_files.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy(f, out / f.name)
    else:
        from tokenizer import hf as hf_tokenizer

        hf_tokenizer.save_pretrained(source.tokenizer, out)
    if not (out / "generation_config.json").exists():
        GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(str(out))


@torch.no_grad()
def logit_difference(source: Source, hf_dir: Path, dtype: torch.dtype, seq_len: int = 64) -> float:
    """The Megatron model (built here, weights loaded from the checkpoint, rounded to `dtype`)
    against the written directory loaded by `AutoModelForCausalLM`, in fp32 on the same tokens:
    the largest logit difference relative to the largest logit."""
    from transformers import AutoModelForCausalLM

    from megatron_power.training import runtime
    from megatron_power.training.model import build_model

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    seq_len = min(seq_len, source.config.model.seq_length)
    tokens = torch.randint(0, source.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    runtime.initialize(single_process(source.config))
    try:
        model = build_model(single_process(source.config), source.vocab_size, initialize=False).eval()
        checkpoint.load(source.path, model, None)
        for param in model.parameters():
            param.copy_(param.to(dtype).float())
        ours = model(tokens, torch.arange(seq_len).expand(2, -1), None)[..., :source.vocab_size]
    finally:
        runtime.shutdown()
    theirs = hf(input_ids=tokens).logits
    return float((ours - theirs).abs().max() / theirs.abs().max())


def convert(ckpt: Path, out: Path, dtype: str = "bf16", verify: bool = False, overwrite: bool = False,
            tokenizer: Optional[Path] = None, max_shard_bytes: int = 2 * 2**30) -> Optional[float]:
    """Write the Hugging Face directory `out`; return the verified logit difference (if asked)."""
    source = open_checkpoint(ckpt, tokenizer)
    check_writable(out, overwrite)
    torch_dtype = DTYPES[dtype]
    reader = checked_reader(source)
    shards = safetensors_shards.plan(((name, t.shape) for name, t in hf_tensors(source, reader, meta=True)),
                                     torch_dtype, max_shard_bytes)
    with staged(out, overwrite) as staging, ThreadPoolExecutor(1) as side:
        # The config and tokenizer (seconds of imports and tokenizer conversion) are written
        # while the weights stream: casting tensors releases the GIL.
        side_files = side.submit(write_side_files, source, staging, torch_dtype)
        count = sum(len(layout) for layout in shards)
        with tqdm(hf_tensors(source, reader), total=count, unit="tensor", desc=f"writing {out.name}") as tensors:
            safetensors_shards.write(staging, shards, torch_dtype, iter(tensors))
        side_files.result()
        if not verify:
            return None
        difference = logit_difference(source, staging, torch_dtype)
        print(f"verify: largest logit difference {difference:.2e} of the largest logit "
              f"(tolerance {VERIFY_TOLERANCE:.0e})")
        if not difference <= VERIFY_TOLERANCE:
            raise ConversionError(f"verification failed: the converted model's logits differ by "
                                  f"{difference:.2e} (relative), over {VERIFY_TOLERANCE:.0e}; nothing written")
    return difference
