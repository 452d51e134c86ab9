"""Rollouts: the Engine protocol, prompt encoding, the HF engine (CPU) and the vLLM engine (GPU)."""
