"""Training: the driver, the learners (in-process or Ray + DeepSpeed), one NoisyRollout step, SFT, checkpoints."""
