"""The algorithm core, pure functions: distortions, schedules, advantages, loss, reward (SPEC)."""
