"""Evaluation: benchmarks as local files, scoring on in-memory models, the lm-evaluation-harness
bridge, and the forgetting (retention) metrics of every stage against the base model."""
