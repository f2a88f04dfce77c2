"""Continual-learning data: benchmark sources, facts and templates, facts files, documents,
rephrasings, rewording filters and study material from passages (prompts, filters, cache). Runs
and scores no model and imports nothing from eval/ (which reads data); the LightningDataModule
that composes both is streams/datamodule.py."""
