"""Corpus -> sentencepiece tokenizer -> Megatron indexed datasets (.bin/.idx)."""
