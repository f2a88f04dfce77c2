"""The stages a run can be (``stage:`` in conf/train.yaml), one recipe module each, every one
with the same shape (cf. torchtune's recipes): ``setup`` (model, data, what the loop needs),
``run`` (the loop), ``save`` (the run's files, the summary).

- continual.py (``stage: continual``, the default): the fact stream through a Lightning
  Trainer, evaluated before training and after every task;
- heal.py (``stage: heal``, ``experiment=heal``): dense training of replace-mode memory on
  general text until the model's quality returns; its parts: heal_corpus.py (the general
  text), heal_training.py (the frozen-base training loop, held-out perplexity),
  heal_outputs.py (heal_metrics.csv, heal_ppl.png).

Both build their model with models/build.py; train.py validates the config and picks the stage.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def start_run(cfg: DictConfig) -> Path:
    """What every stage does first: the run directory, torch's thread count, the seeds."""
    import lightning as L
    import torch

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return out_dir
