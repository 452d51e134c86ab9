"""Orchestration: the `noisyrollout` CLI, one module per DVC stage, the gate, the registry, the flow, the plots."""
