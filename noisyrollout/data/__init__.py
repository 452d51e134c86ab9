"""Data: the synthetic corpus, the graded out-of-domain shifts, and loaders of every source into one schema."""
