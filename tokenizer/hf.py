"""A sentencepiece model as a Hugging Face fast tokenizer that encodes exactly as sentencepiece does.

transformers' Llama conversion gives the vocabulary and merges, but its Metaspace pre-tokenizer
adds the "▁" word prefix only where the text does not already start with one, whereas
sentencepiece always adds it (" our" is "▁▁" "our" there, "▁our" in the Llama form). Prepending
in the normalizer, as sentencepiece does, gives identical ids.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def save_pretrained(model_file: Path, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into out_dir."""
    import json
    import tempfile

    from tokenizers import normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as staging:
        shutil.copy(model_file, Path(staging) / "tokenizer.model")
        (Path(staging) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False}))
        backend = AutoTokenizer.from_pretrained(staging).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL)
    tokenizer.save_pretrained(str(out_dir))
