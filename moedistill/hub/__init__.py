"""Hugging Face checkpoints: the key table, sharded load and streamed save, safetensors checks."""
