"""Evaluation: pure metrics, batched model scoring, held-out capability suites and fact recall, the
probe of what the base model knows (probe.py). Reads data/ (items, facts); data/ never imports it."""
