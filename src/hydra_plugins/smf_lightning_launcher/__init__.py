"""Submitit launchers of ``hydra/launcher=slurm`` and ``hydra/launcher=local`` (conf/hydra/launcher/)
whose jobs resume from their last task checkpoint whenever they run again (a requeue after a
time limit or a preemption): smf_lightning.callbacks.sweep.resume_overrides. Hydra accepts
launcher classes only from the ``hydra_plugins`` namespace package, hence this module."""

from __future__ import annotations

from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import setup_globals
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import open_dict

class _ResumeFromLastTask:
    """Mixin for hydra-submitit-launcher's launchers: every (re)run of a job resumes (resume_overrides)."""

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        # imported in the job only: Hydra imports every hydra_plugins module of every app it starts
        from smf_lightning.callbacks.sweep import resume_overrides

        Singleton.set_state(singleton_state)
        setup_globals()
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = job_num
        job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)  # as Hydra's run_job makes it
        return super().__call__(resume_overrides(job_dir, sweep_overrides), job_dir_key, job_num, job_id,
                                singleton_state)


class ResumingSlurmLauncher(_ResumeFromLastTask, SlurmLauncher):
    """``hydra/launcher=slurm``: one SLURM job per sweep point, resuming after a requeue."""


class ResumingLocalLauncher(_ResumeFromLastTask, LocalLauncher):
    """``hydra/launcher=local``: the same code path as SLURM, jobs as local processes (tests)."""
