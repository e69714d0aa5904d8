"""`convert from-hf`: Granite / GraniteMoe weights -> a checkpoint that training starts from.

The model is built by the trainer's own code (one process); each of its sharded tensors takes
its part of the global tensor that the table assembles from the Hugging Face tensors, read one
at a time from the safetensors files. It is saved with `checkpoint.save`, so its keys are
exactly those a training run of any layout loads (`checkpoint.init_from=OUT`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from megatron_power.config import as_name, load_config, to_yaml
from megatron_power.convert import granite
from megatron_power.convert.output import check_writable, staged
from megatron_power.convert.to_hf import HF_FILES_DIR, WEIGHT_SUFFIXES, single_process
from megatron_power.errors import ConfigError, ConversionError
from megatron_power.training import checkpoint, mup
from megatron_power.training.model import model_differences

INDEX = "model.safetensors.index.json"
# Tensors some Hugging Face checkpoints carry that are not weights.
IGNORED = ("rotary_emb.inv_freq",)


class HFWeights:
    """Tensors of a Hugging Face directory's safetensors files, read on demand."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        if (hf_dir / INDEX).is_file():
            files = sorted(set(json.loads((hf_dir / INDEX).read_text())["weight_map"].values()))
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ConversionError(f"{hf_dir} holds no safetensors weights (expected model.safetensors or {INDEX}; "
                                  f"PyTorch .bin files are not read)")
        self.handles = {}
        self.location: Dict[str, tuple] = {}
        for name in files:
            if not (hf_dir / name).is_file():
                raise ConversionError(f"{hf_dir / INDEX} names {name}, which does not exist")
            handle = self.handles[name] = safe_open(str(hf_dir / name), framework="pt")
            for key in handle.keys():
                self.location[granite.canonical_hf_name(key)] = (handle, key)
        self.used = set()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise ConversionError(f"the Hugging Face weights lack {name}")
        handle, key = self.location[name]
        self.used.add(name)
        return handle.get_tensor(key)

    def unused(self) -> List[str]:
        return sorted(n for n in self.location if n not in self.used and not n.endswith(IGNORED))


def read_hf_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory (expected a Hugging Face model directory)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def target_config(hf: dict, recipe: Optional[str], name: str):
    """The recipe (default: proxy) with the Hugging Face model's shape; a named recipe must
    already have that shape."""
    settings = granite.model_settings(hf)
    overrides = [f"{section}.{k}={'null' if v is None else v}"
                 for section, values in settings.items() for k, v in values.items()]
    if recipe is None and "max_position_embeddings" in hf:  # a recipe names its own context length
        overrides.append(f"model.seq_length={hf['max_position_embeddings']}")
    try:
        imported = load_config(recipe or "proxy", overrides + [f"name={name}"], check_paths=False)
        depth_factor = mup.residual_mult(imported) / imported.mup.residual_mult if imported.mup.enabled else 1.0
        if depth_factor != 1.0:  # Granite's one multiplier holds the recipe's depth factor already
            imported = replace(imported, mup=replace(imported.mup, residual_mult=imported.mup.residual_mult / depth_factor))
        if recipe is not None:
            recipe_config = load_config(recipe, check_paths=False)
            problems = model_differences(recipe_config, imported)
            if recipe_config.model.vocab_size not in (None, imported.model.vocab_size):
                problems.append(f"model.vocab_size: expected {recipe_config.model.vocab_size}, "
                                f"found {imported.model.vocab_size}")
            if problems:
                raise ConversionError(f"recipe {recipe} does not match the weights: " + "; ".join(problems))
    except ConfigError as e:
        raise ConversionError(" / ".join(str(e).splitlines())) from None
    return imported


@torch.no_grad()
def fill_model(model, weights: HFWeights, config, padded_vocab: int) -> None:
    from megatron_power.training.model import local_part, sharded_tensors

    entries = {e.megatron: e for e in granite.table(config.model)}
    cached = (None, None)
    shards = list(sharded_tensors(model))
    for sh in tqdm(shards, unit="tensor", desc="importing"):
        entry = entries.get(sh.key)
        if entry is None:
            raise ConversionError(f"no Hugging Face tensor maps to {sh.key}")
        layer = sh.global_offset[0] if entry.per_layer else None
        if cached[0] != (sh.key, layer):  # the two SwiGLU halves share one global tensor
            hf = [weights.get(n) for n in granite.hf_names(entry, layer)]
            cached = ((sh.key, layer), granite.from_hf(entry, hf, config.model, padded_vocab))
        full = cached[1]
        expected = tuple(sh.global_shape[1:] if entry.per_layer else sh.global_shape)
        if tuple(full.shape) != expected:
            raise ConversionError(f"{', '.join(granite.hf_names(entry, layer))} give {sh.key} the shape "
                                  f"{tuple(full.shape)}; the model needs {expected}")
        sh.data.copy_(local_part(sh, full, skip_axes=1 if entry.per_layer else 0))
    if config.model.tie_embeddings:
        weights.used.add("lm_head.weight")  # a copy of the embedding, where a file carries it


def convert(hf_dir: Path, out: Path, recipe: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write a checkpoints directory (`latest` -> iter_0000000) holding the imported weights."""
    from megatron_power.training import runtime
    from megatron_power.training.model import build_model, padded_vocab_size

    hf = read_hf_config(hf_dir)
    config = target_config(hf, recipe, name=as_name(hf_dir.resolve().name))
    check_writable(out, overwrite)
    weights = HFWeights(hf_dir)
    built = single_process(config)
    runtime.initialize(built)
    try:
        with staged(out, overwrite) as staging:
            model = build_model(built, config.model.vocab_size, initialize=False)
            fill_model(model, weights, config, padded_vocab_size(config.model.vocab_size, 1))
            unused = weights.unused()
            if unused:
                raise ConversionError(f"the Hugging Face weights hold tensors this model has no place for: "
                                      f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
            checkpoint.save(staging, 0, model, None, {"config": to_yaml(config), "source": str(hf_dir)}, keep=1)
            (staging / HF_FILES_DIR).mkdir()
            for f in hf_dir.iterdir():
                if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy(f, staging / HF_FILES_DIR / f.name)
    finally:
        runtime.shutdown()
    return out
