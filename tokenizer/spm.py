"""Train a sentencepiece tokenizer whose special ids Megatron's datasets rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import sentencepiece as spm

# Fixed ids: <unk> 0, <s> 1, </s> 2 (end of document, Megatron's "eod"), <pad> 3 (never emitted
# by encoding, so GPTDataset's padding mask cannot hide real tokens).
UNK, BOS, EOS, PAD = 0, 1, 2, 3


def train(sentences: Iterable[str], model_prefix: Path, vocab_size: int, model_type: str = "bpe",
          max_sentences: int = 300_000) -> Path:
    """Train on `sentences` (sampled down to `max_sentences`) and write `<model_prefix>.model`."""
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        # Code and prose keep their whitespace; unknown characters fall back to bytes.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=200_000,
        max_sentence_length=8192,
        num_threads=2,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")
