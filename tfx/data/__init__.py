"""Data: tokenizer, sources and the input pipeline."""
