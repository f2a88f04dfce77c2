"""The fact stream of a run, assembled from the data layer and the evaluation layer.

``data/`` reads and shapes data (sources, facts, files, documents, rephrasings, rewording
filters) and runs no model; ``eval/`` measures a model on data (metrics, scoring, suites, the
probe of what the base model knows) and may read data. Composing a run's stream needs both
(probe the base model to keep facts it does not know, keep the background corpus apart from the
held-out suites' items, build those suites), so it lives here, above both. Nothing in data/ or
eval/ imports this package. One job per module:

- datamodule.py: FactStreamDataModule, the LightningDataModule of a run; it coordinates the rest;
- options.py: the checks of its options (conf/data/*.yaml keys);
- stream.py: what building a stream yields (Stream), and the synthetic stream; one builder per
  other ``data.facts`` kind: triviaqa_stream.py, file_stream.py, document_stream.py;
- encoding.py: facts -> training sequences under the templates, and which facts fit;
- probing.py: the probe of the base model (cached), under the probe prompt or every template;
- known.py: the known-facts suites' facts (triviaqa_known, file_known);
- rewordings.py: model-written rewordings of questions (training, whitening groups);
- prefixes.py: context prefixes from background passages (data.prefixes);
- augmentation.py: model-written study material from passages (facts=documents, data.augment);
- schedule.py: a task's training batches in order (data.schedule);
- suites.py: the recall, rephrased and held-out suites;
- background.py: the background corpus (items, sequences, batches, template groups).
"""
