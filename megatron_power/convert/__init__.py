"""Megatron <-> Hugging Face Granite conversion."""
