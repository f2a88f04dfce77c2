"""Evaluation: pure metrics, batched model scoring, held-out capability suites and fact recall."""
