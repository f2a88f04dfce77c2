"""Stopping a run on SIGTERM / SIGINT within seconds, and deterministic interruptions for tests.

A scheduler's ``timeout``, ``scancel`` or a Ctrl-C in a container sends SIGTERM or SIGINT.
Lightning only *notes* SIGTERM (``trainer.received_sigterm``) and checks it between
training steps, so a run inside a minutes-long evaluation went on for minutes. Here the
signal raises :class:`RunInterrupted` in the main thread at once, wherever the run is
(loading, probing, training, evaluation). It derives from ``BaseException`` so that no
``except Exception`` on the way swallows it; Lightning's handler still tears the trainer
down and finalises the loggers. Nothing is lost: every output file and ``last.ckpt`` are
written atomically (temp file, then rename), so a file is either the previous complete
version or the new complete version. The entry point prints the resume command and exits
with 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

Tests cannot race a kill against a run whose speed depends on the machine, so the points
of interruption are part of the product (``debug:`` in conf/train.yaml):
``debug.stop_after_task=k`` SIGKILLs the run (no cleanup at all) right after task k's
checkpoint is durably on disk; ``debug.signal=TERM debug.signal_at_step=n`` makes the run
send itself the signal right after optimizer step n, through the same handler a real
signal reaches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger("smf_lightning")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEBUG_SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}


class RunInterrupted(BaseException):
    """A stop signal arrived; the run ends, keeping what it has completed."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum, frame) -> None:
    # One signal is enough: further ones during the shutdown are ignored, so cleanup
    # (loggers, Lightning teardown) is not itself interrupted.
    for s in HANDLED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise RunInterrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM and SIGINT raise :class:`RunInterrupted` (main thread only)."""
    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    for s in HANDLED_SIGNALS:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def log_resume_hint(out_dir: Path) -> None:
    """Log the exact command that continues a stopped run from its last completed task."""
    import shlex

    ckpt = Path(out_dir) / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        log.warning("no task was completed (no %s): rerun the same command to start again.", ckpt)
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "debug."))]
    except ValueError:  # not under Hydra (run() called directly)
        overrides = []
    cmd = ["python", "-m", "smf_lightning.train", *overrides, f"ckpt_path={ckpt}"]
    log.warning("resume with:\n  %s", " ".join(shlex.quote(c) for c in cmd))


def fsync_file_and_dir(path: os.PathLike) -> None:
    """Make a renamed file durable: its bytes and the directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def kill_self_hard() -> None:
    """SIGKILL this process: no handler, no cleanup, as the OOM killer or a power cut would."""
    os.kill(os.getpid(), signal.SIGKILL)


class SelfSignal(L.Callback):
    """Sends ``signum`` to this process right after optimizer step ``at_step`` (1-based,
    counted over the whole stream): a deterministic stand-in for an external SIGTERM."""

    def __init__(self, signame: str, at_step: int):
        if signame not in DEBUG_SIGNALS:
            raise ValueError(f"debug.signal={signame!r}; allowed: {', '.join(DEBUG_SIGNALS)}")
        self.signum = DEBUG_SIGNALS[signame]
        self.at_step = int(at_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module._micro == 0 and len(module.updated_params_history) == self.at_step:
            os.kill(os.getpid(), self.signum)
