"""``taca eval``: T2I-CompBench generation, official scoring and the paper's table."""
