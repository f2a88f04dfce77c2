"""Sparse Memory Finetuning of pretrained LLMs (README.md). Training: ``python -m
smf_lightning.train``; using the updated model: ``smf_lightning.load`` and the commands of
docs/usage.md, "Using the updated model". Importing the package loads nothing heavy."""


def load(path, base=None):
    """The updated model of an export (``python -m smf_lightning.export RUN OUT``): a transformers
    PreTrainedModel in eval mode, its memory layers installed by this package (no
    trust_remote_code, no pickle). A delta export is applied to its base model, rebuilt from what
    it records or from ``base`` (a hub id, local directory, offline catalogue name or full
    export) and refused if its fingerprint differs. The tokenizer is in the same directory
    (``AutoTokenizer.from_pretrained(path)``)."""
    from .product.exports import load as load_export

    return load_export(path, base)
