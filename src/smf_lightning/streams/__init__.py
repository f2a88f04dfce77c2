"""The fact stream of a run, assembled from the data layer and the evaluation layer.

``data/`` reads and shapes data (sources, facts, files, documents, rephrasings, rewording
filters) and runs no model; ``eval/`` measures a model on data (metrics, scoring, suites, the
probe of what the base model knows) and may read data. Composing a run's stream needs both
(probe the base model to keep facts it does not know, keep the background corpus apart from the
held-out suites' items, build those suites), so it lives here, above both:
datamodule.py (FactStreamDataModule, the LightningDataModule of a run) and background.py (the
background corpus's items). Nothing in data/ or eval/ imports this package.
"""
