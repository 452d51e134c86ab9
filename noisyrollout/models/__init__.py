"""Models: the embedded tiny Qwen2.5-VL and its tokenizer, loading real checkpoints, prompt-prefix and KV-cache helpers."""
