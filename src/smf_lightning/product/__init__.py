"""The updated model as a product: open a run or an export (open.py), export it in full or as a
delta (exports.py), forget facts (edit.py), ask it questions and see which taught facts an answer
read (answer.py). The commands are ``python -m smf_lightning.export | forget | ask``; the fact
ledger they read is memory/ledger.py. docs/usage.md, "Using the updated model"."""
