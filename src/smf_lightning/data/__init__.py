"""Continual-learning data: benchmark sources, fact-injection streams, the Lightning DataModule."""
