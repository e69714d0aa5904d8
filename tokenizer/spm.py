"""Train a sentencepiece tokenizer whose special ids Megatron's datasets rely on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from megatron_power.errors import DataError

# Fixed ids: <unk> 0, <s> 1, </s> 2 (end of document, Megatron's "eod"), <pad> 3 (never emitted
# by encoding, so GPTDataset's padding mask cannot hide real tokens).
UNK, BOS, EOS, PAD = 0, 1, 2, 3
BYTE_PIECES = 256  # byte_fallback: one piece per byte value, so no text is out of vocabulary


def load(model_file) -> spm.SentencePieceProcessor:
    """The sentencepiece model in `model_file`; a DataError (a ValueError) naming the file when it
    is not one."""
    try:
        return spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{model_file} is not a sentencepiece model ({str(e).splitlines()[0][:80]})") from None


def check_vocab_size(vocab_size: int, special_tokens: Sequence[str] = ()) -> None:
    """One line (a DataError) for a vocabulary too small for the pieces every tokenizer has, before
    any corpus is read: sentencepiece's own check of it is an internal error."""
    fixed = len((UNK, BOS, EOS, PAD)) + BYTE_PIECES + len(special_tokens)
    if vocab_size <= fixed:
        specials = f", {len(special_tokens)} of --special-tokens" if special_tokens else ""
        raise DataError(f"--vocab-size {vocab_size} must be larger than the {fixed} pieces every tokenizer has "
                        f"(4 special ids, {BYTE_PIECES} bytes{specials})")


def paragraphs(texts: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
    """Sentencepiece trains on 'sentences'; blocks of text separated by blank lines serve."""
    for text in texts:
        for block in text.split("\n\n"):
            if block.strip():
                yield block[:max_chars]


def train(sentences: Iterable[str], model_prefix: Path, vocab_size: int, model_type: str = "bpe",
          max_sentences: int = 300_000, special_tokens: Sequence[str] = ()) -> Path:
    """Train on `sentences` and write `<model_prefix>.model`. Sentencepiece keeps a uniform sample
    of `max_sentences` of them (reservoir sampling), so a large corpus is streamed, not loaded.
    `special_tokens` become pieces of their own, never split."""
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
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
            user_defined_symbols=list(special_tokens),
            minloglevel=2,
        )
    except RuntimeError as e:  # sentencepiece's checks, known only once it has read the corpus
        error = _vocabulary_error(str(e), vocab_size)
        if error is None:
            raise
        raise error from None
    return model_path(model_prefix)


def model_path(model_prefix: Path) -> Path:
    """What sentencepiece writes for a prefix (which may hold dots of its own)."""
    return model_prefix.with_name(model_prefix.name + ".model")


def _vocabulary_error(message: str, vocab_size: int):
    """A one-line DataError for a vocabulary size the corpus cannot fill or hold, else None."""
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return DataError(f"--vocab-size {vocab_size}: this corpus gives at most {too_high[1]} pieces "
                         f"(expected a smaller vocabulary, or more text)")
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return DataError(f"--vocab-size {vocab_size}: this corpus needs at least {too_low[1]} pieces "
                         f"(its characters and the special pieces)")
    return None
